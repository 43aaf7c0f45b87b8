-- A transaction that asks for it derives each release once, at its end,
-- instead of once per fact.
--
-- Every fact re-derives what it can reach (ops.refresh_on_fact). A worker
-- transaction that applies several events of one release (a batch, or a
-- build_complete with its check and its evidence) derived the release as
-- many times, each derivation overtaken by the next. With
-- `opsgate.derive_at_end` set to 'on' for the transaction
-- (set_config(..., true)), an inserted fact only records what it reaches in
-- ops.pending_derivations, merged per release; ops.derive_pending() derives
-- those releases and forgets them. The worker calls it before it reads
-- derived state (the results it stores, a production deployment's
-- eligibility); whatever is still pending when the transaction commits is
-- derived then, by a deferred constraint trigger, so no fact committed with
-- the setting on is left underived.
--
-- The setting cannot be used to skip derivation: for each inserted row,
-- exactly one of two triggers fires, chosen by WHEN clauses evaluated
-- together when the row is inserted: the immediate refresh, or the record
-- of what is pending plus the deferred derivation at commit (a deferred
-- trigger's event is queued when its row is written, whatever the setting
-- is by commit time). ops.pending_derivations is written only by these
-- SECURITY DEFINER functions; nobody else has any right on it.
--
-- Derivation is a function of the facts (and of the time for G4 and
-- exceptions), so deriving after the last of a transaction's facts gives
-- what deriving after each would have given last. What is not recorded is
-- a state no other transaction could ever see: a gate that was in_progress
-- only between two statements of one transaction does not appear in
-- ops.change_log.
--
-- UPDATE and DELETE of facts keep the immediate refresh (the worker only
-- inserts facts; its deployment updates are rare).

-- Always empty outside a transaction: rows are inserted and deleted by the
-- same transaction, and a rolled-back one leaves nothing. UNLOGGED: nothing
-- in it needs to survive a crash, so it costs no WAL.
CREATE UNLOGGED TABLE ops.pending_derivations (
    xact_id     xid8 NOT NULL,
    release_id  uuid NOT NULL,
    gates       ops.ops_gate_code[] NOT NULL,
    -- The deployments whose G4 state to re-derive; NULL: all of the release's.
    deployments uuid[],
    PRIMARY KEY (xact_id, release_id)
);
ALTER TABLE ops.pending_derivations ENABLE ROW LEVEL SECURITY;
ALTER TABLE ops.pending_derivations FORCE ROW LEVEL SECURITY;
DO $$
BEGIN
    EXECUTE format('CREATE POLICY owner_all ON ops.pending_derivations TO %I USING (true) WITH CHECK (true)',
                   current_user);
END
$$;
REVOKE ALL ON ops.pending_derivations FROM PUBLIC;

-- The INSERT branch of 0012, with one argument: 'at_end' records what the
-- fact reaches instead of deriving it now. UPDATE and DELETE as in 0012.
CREATE OR REPLACE FUNCTION ops.refresh_on_fact() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    affected    uuid[];
    gates       ops.ops_gate_code[];
    deployments uuid[];
    fact_release uuid;
    target      ops.ops_environment;
    code        ops.ops_gate_code;
BEGIN
    -- Which gates a fact can change: its own gate (checks, approvals), for an
    -- approval also the gates that apply separation of duties to it, the
    -- gates an exception impacts, for evidence the gates whose policy asks
    -- for evidence and the gate it is attached to, G4 for deployments;
    -- ops.refresh_release adds the gates that require a gate whose status
    -- changed. Which deployments' G4 a fact can change: a deployment's own,
    -- a health check's deployment.
    IF TG_OP = 'INSERT' THEN
        IF TG_TABLE_NAME = 'gate_checks' THEN
            SELECT rg.release_id, rg.gate_code INTO fact_release, code
            FROM ops.release_gates rg WHERE rg.gate_id = NEW.gate_id;
            gates := ARRAY[code];
            deployments := CASE WHEN NEW.deployment_id IS NULL THEN '{}'::uuid[] ELSE ARRAY[NEW.deployment_id] END;
        ELSIF TG_TABLE_NAME = 'approvals' THEN
            SELECT rg.release_id, rg.gate_code, r.environment_target INTO fact_release, code, target
            FROM ops.release_gates rg JOIN ops.releases r ON r.release_id = rg.release_id
            WHERE rg.gate_id = NEW.gate_id;
            -- With separation of duties, a gate ignores approvals by whoever
            -- approved a gate it requires: an approval of G2 can change G3.
            gates := ARRAY[code] || ARRAY(
                SELECT p.gate_code FROM ops.gate_policies p
                WHERE p.environment = target AND code = ANY (p.requires_gates)
                  AND p.separation_of_duties AND cardinality(p.approver_roles) > 0);
        ELSIF TG_TABLE_NAME = 'evidence_artifacts' THEN
            fact_release := NEW.release_id;
            gates := ARRAY(
                SELECT p.gate_code
                FROM ops.releases r
                JOIN ops.gate_policies p ON p.environment = r.environment_target
                WHERE r.release_id = fact_release
                  AND NEW.artifact_type = ANY (p.evidence_any_of || p.evidence_all_of));
            IF NEW.gate_id IS NOT NULL THEN
                SELECT g.gate_code INTO code FROM ops.release_gates g WHERE g.gate_id = NEW.gate_id;
                IF FOUND THEN
                    gates := gates || code;
                END IF;
            END IF;
        ELSIF TG_TABLE_NAME = 'exceptions' THEN
            fact_release := NEW.release_id;
            gates := NEW.impacted_gates;
        ELSE
            fact_release := NEW.release_id;
            gates := '{G4}';
            deployments := ARRAY[NEW.deployment_id];
        END IF;
        IF fact_release IS NULL THEN
            RETURN NULL;
        END IF;
        gates := coalesce(gates, '{}');
        IF TG_NARGS > 0 AND TG_ARGV[0] = 'at_end' THEN
            -- Deployments matter only to G4; NULL (all of them) stays NULL
            -- when merged.
            IF NOT 'G4' = ANY (gates) THEN
                deployments := '{}';
            END IF;
            INSERT INTO ops.pending_derivations AS p (xact_id, release_id, gates, deployments)
            VALUES (pg_current_xact_id(), fact_release, gates, deployments)
            ON CONFLICT (xact_id, release_id) DO UPDATE
            SET gates = p.gates || EXCLUDED.gates,
                deployments = CASE WHEN p.deployments IS NOT NULL AND EXCLUDED.deployments IS NOT NULL
                                   THEN p.deployments || EXCLUDED.deployments END;
        ELSE
            PERFORM ops.refresh_release(fact_release, statement_timestamp(), gates, deployments);
        END IF;
        RETURN NULL;
    END IF;

    IF TG_TABLE_NAME IN ('gate_checks', 'approvals') THEN
        SELECT array_agg(DISTINCT rg.release_id), array_agg(DISTINCT rg.gate_code) INTO affected, gates
        FROM ops.release_gates rg
        WHERE rg.gate_id IN (
            CASE WHEN TG_OP <> 'DELETE' THEN NEW.gate_id END,
            CASE WHEN TG_OP <> 'INSERT' THEN OLD.gate_id END);
        IF TG_TABLE_NAME = 'approvals' THEN
            gates := gates || ARRAY(
                SELECT p.gate_code
                FROM unnest(affected) AS a(release_id)
                JOIN ops.releases r ON r.release_id = a.release_id
                JOIN ops.gate_policies p ON p.environment = r.environment_target
                WHERE p.requires_gates && gates
                  AND p.separation_of_duties AND cardinality(p.approver_roles) > 0);
        END IF;
    ELSE
        affected := ARRAY[
            CASE WHEN TG_OP <> 'DELETE' THEN NEW.release_id END,
            CASE WHEN TG_OP <> 'INSERT' THEN OLD.release_id END];
        -- (Separate branches: a record field is resolved when its expression runs.)
        IF TG_TABLE_NAME = 'exceptions' AND TG_OP = 'UPDATE' THEN
            gates := NEW.impacted_gates || OLD.impacted_gates;
        ELSIF TG_TABLE_NAME = 'exceptions' THEN
            gates := OLD.impacted_gates;
        ELSIF TG_TABLE_NAME = 'evidence_artifacts' THEN
            SELECT array_agg(p.gate_code) INTO gates
            FROM unnest(affected) AS a(release_id)
            JOIN ops.releases r ON r.release_id = a.release_id
            JOIN ops.gate_policies p ON p.environment = r.environment_target
            WHERE CASE WHEN TG_OP <> 'DELETE' THEN NEW.artifact_type END = ANY (p.evidence_any_of || p.evidence_all_of)
               OR OLD.artifact_type = ANY (p.evidence_any_of || p.evidence_all_of);
            gates := coalesce(gates, '{}') || ARRAY(
                SELECT g.gate_code FROM ops.release_gates g
                WHERE g.gate_id IN (CASE WHEN TG_OP <> 'DELETE' THEN NEW.gate_id END, OLD.gate_id));
        ELSE
            gates := '{G4}';
        END IF;
    END IF;
    IF TG_TABLE_NAME IN ('gate_checks', 'deployments') THEN
        deployments := ARRAY(
            SELECT DISTINCT id
            FROM unnest(ARRAY[CASE WHEN TG_OP <> 'DELETE' THEN NEW.deployment_id END, OLD.deployment_id]) AS id
            WHERE id IS NOT NULL);
    END IF;
    PERFORM ops.refresh_release(id, statement_timestamp(), coalesce(gates, '{}'), deployments)
    FROM (SELECT DISTINCT id FROM unnest(affected) AS id WHERE id IS NOT NULL) ids;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.refresh_on_fact() FROM PUBLIC;

-- Derives the releases this transaction's facts left pending (only
-- p_release_id's when given), each once, in key order (the order the
-- worker's release locks are taken in), and forgets them. Returns how many
-- releases it derived.
CREATE FUNCTION ops.derive_pending(p_release_id uuid DEFAULT NULL) RETURNS integer
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pending record;
    derived integer := 0;
BEGIN
    FOR pending IN
        WITH taken AS (
            DELETE FROM ops.pending_derivations d
            WHERE d.xact_id = pg_current_xact_id_if_assigned()
              AND (p_release_id IS NULL OR d.release_id = p_release_id)
            RETURNING d.release_id, d.gates, d.deployments)
        SELECT * FROM taken ORDER BY release_id
    LOOP
        PERFORM ops.refresh_release(pending.release_id, statement_timestamp(), pending.gates, pending.deployments);
        derived := derived + 1;
    END LOOP;
    RETURN derived;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.derive_pending(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ops.derive_pending(uuid)
    TO opsgate_worker, ci_service_role, release_manager, qa_tester, sre;

CREATE FUNCTION ops.derive_pending_at_commit() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM ops.derive_pending();
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.derive_pending_at_commit() FROM PUBLIC;

-- Each fact table: UPDATE and DELETE refresh at once as before; an INSERT
-- either refreshes at once or, with opsgate.derive_at_end on, is recorded
-- and derived by the end of its transaction.
DO $$
DECLARE
    tbl text;
    updates text;
BEGIN
    FOREACH tbl IN ARRAY ARRAY['gate_checks', 'approvals', 'evidence_artifacts', 'exceptions', 'deployments'] LOOP
        -- Only the reported columns of a deployment; refresh itself writes g4_status.
        updates := CASE WHEN tbl = 'deployments'
            THEN 'UPDATE OF release_id, environment, deployed_at, source_ref, status, rollback_of'
            ELSE 'UPDATE' END;
        EXECUTE format('DROP TRIGGER %I ON ops.%I', tbl || '_refresh', tbl);
        EXECUTE format('CREATE TRIGGER %I AFTER DELETE OR %s ON ops.%I
                            FOR EACH ROW EXECUTE FUNCTION ops.refresh_on_fact()',
                       tbl || '_refresh', updates, tbl);
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON ops.%I FOR EACH ROW
                            WHEN (current_setting(''opsgate.derive_at_end'', true) IS DISTINCT FROM ''on'')
                            EXECUTE FUNCTION ops.refresh_on_fact()',
                       tbl || '_refresh_insert', tbl);
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON ops.%I FOR EACH ROW
                            WHEN (current_setting(''opsgate.derive_at_end'', true) = ''on'')
                            EXECUTE FUNCTION ops.refresh_on_fact(''at_end'')',
                       tbl || '_refresh_insert_at_end', tbl);
        EXECUTE format('CREATE CONSTRAINT TRIGGER %I AFTER INSERT ON ops.%I
                            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                            WHEN (current_setting(''opsgate.derive_at_end'', true) = ''on'')
                            EXECUTE FUNCTION ops.derive_pending_at_commit()',
                       tbl || '_refresh_at_commit', tbl);
    END LOOP;
END
$$;
