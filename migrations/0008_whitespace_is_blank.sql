-- Blank means whitespace of any kind, and identities have none around them.
--
-- The schema's "not blank" rules were btrim(x) <> '', and btrim removes
-- spaces only: a project, check name or actor made of tabs or newlines was
-- accepted. They now ask for a character that is not whitespace.
--
-- Separation of duties compares identities exactly (an approver against the
-- release's initiator and the approvers of required gates), so "alice " was
-- someone else than "alice". The columns that name who initiated, approved or
-- granted now refuse surrounding whitespace.
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT con.conrelid::regclass AS table_name, con.conname,
               substring(pg_get_constraintdef(con.oid) FROM '^CHECK \(\(btrim\(([a-z_]+)\) <> ''''::text\)\)$') AS column_name
        FROM pg_constraint con
        WHERE con.connamespace = 'ops'::regnamespace AND con.contype = 'c'
          AND pg_get_constraintdef(con.oid) ~ '^CHECK \(\(btrim\([a-z_]+\) <> ''''::text\)\)$'
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.table_name, c.conname);
        EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I CHECK (%I ~ %L)', c.table_name, c.conname,
                       c.column_name, '[^[:space:]]');
    END LOOP;
END
$$;

ALTER TABLE ops.releases ADD CONSTRAINT releases_initiating_actor_trimmed
    CHECK (initiating_actor !~ '^[[:space:]]|[[:space:]]$');
ALTER TABLE ops.approvals ADD CONSTRAINT approvals_approver_id_trimmed
    CHECK (approver_id !~ '^[[:space:]]|[[:space:]]$');
ALTER TABLE ops.exceptions ADD CONSTRAINT exceptions_approver_id_trimmed
    CHECK (approver_id !~ '^[[:space:]]|[[:space:]]$');
