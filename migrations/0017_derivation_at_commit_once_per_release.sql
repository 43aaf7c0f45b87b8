-- What is left pending is derived at commit once per release, not once per
-- fact.
--
-- 0016 queued a deferred constraint trigger for every fact inserted with
-- `opsgate.derive_at_end` on; each ran ops.derive_pending() at commit, two
-- SECURITY DEFINER calls and a DELETE over the transaction's pending rows,
-- even when the worker had already derived everything (it always has: it
-- derives before it stores its results). About 100 µs per fact of a slow
-- machine's commit, for nothing.
--
-- The deferred trigger now sits on ops.pending_derivations: a row there is
-- inserted once per release and transaction (later facts of the release
-- merge into it), so its events number the releases, not the facts. The
-- first one that finds its row still pending derives everything pending, in
-- key order as before; the others find their row gone, one primary-key
-- probe each.
--
-- Skipping derivation is no easier than before: a fact inserted with the
-- setting on records its release here (the WHEN clauses of 0016 choose that
-- when the row is written), the insert here queues the deferred trigger,
-- and nobody has any right on this table or can drop the trigger but its
-- owner.

DO $$
DECLARE
    tbl text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['gate_checks', 'approvals', 'evidence_artifacts', 'exceptions', 'deployments'] LOOP
        EXECUTE format('DROP TRIGGER %I ON ops.%I', tbl || '_refresh_at_commit', tbl);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION ops.derive_pending_at_commit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM ops.pending_derivations d
               WHERE d.xact_id = NEW.xact_id AND d.release_id = NEW.release_id) THEN
        PERFORM ops.derive_pending();
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.derive_pending_at_commit() FROM PUBLIC;

CREATE CONSTRAINT TRIGGER pending_derivations_derive_at_commit
    AFTER INSERT ON ops.pending_derivations
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
    EXECUTE FUNCTION ops.derive_pending_at_commit();
