-- A rollback is recorded against the release it rolls back.
--
-- ops.derive_release_status turns a release rolled_back when a succeeded
-- deployment's rollback_of points at one of its deployments, and the
-- deployment refresh re-derives the release the rollback belongs to. A
-- rollback_of that pointed at another release's deployment left that
-- release's status as it was (and the worker refuses it with 409). The
-- database refuses it too, for whoever writes there directly.
ALTER TABLE ops.deployments
    ADD CONSTRAINT deployments_id_release_key UNIQUE (deployment_id, release_id);
ALTER TABLE ops.deployments
    ADD CONSTRAINT deployments_rollback_of_same_release
    FOREIGN KEY (rollback_of, release_id) REFERENCES ops.deployments (deployment_id, release_id);
