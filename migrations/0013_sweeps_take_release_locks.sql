-- The sweeps take the worker's release locks.
--
-- The worker applies a release's events under a transaction-scoped advisory
-- lock on the release, taken before anything else and, for several
-- releases, in ascending key order, so two of its transactions never wait
-- for each other in a cycle. The sweeps took no such lock. The G4 sweep
-- locked every overdue deployment and then, one release at a time, wrote
-- rows that refer to the release, while a transaction of the worker could
-- hold that release's row (its derivation locks it) and wait for one of
-- those deployments (a health check of it refers to it). PostgreSQL broke
-- the deadlock after `deadlock_timeout` by failing one side: the sweeps
-- until their next run, or a batch of the worker, whose events were then
-- retried.
--
-- Now the sweeps first take the lock of every release they will touch, in
-- the worker's order, and work only on those releases; a release that
-- becomes due meanwhile waits for the next run, and so do releases past the
-- first 200 due (ops.sweep_releases_per_run). A sweep waits for a
-- transaction of the worker on the same release to end, or the other way
-- round, never both. ops.run_sweeps takes the releases of both sweeps at
-- once, since it runs them in one transaction.
--
-- CREATE OR REPLACE resets a function's attributes, so each one restates
-- them (0003: the sweeps run with the owner's rights).

-- The lock of each release, taken in ascending key order, for the worker's
-- transactions (src/ingest.rs, begin_and_lock_sql) and for the sweeps.
CREATE FUNCTION ops.lock_releases(p_release_ids uuid[]) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(keys.key)
    FROM (SELECT DISTINCT hashtextextended(id::text, 0) AS key
          FROM unnest(p_release_ids) AS id
          WHERE id IS NOT NULL
          ORDER BY key) AS keys;
END
$$;

-- A run of a sweep acts on at most this many releases, those due first; the
-- rest wait for the next run. Each release is one lock held to the end of
-- the transaction, and PostgreSQL's lock table is shared and bounded
-- (max_locks_per_transaction x max_connections): after a long outage a
-- single run over thousands of releases could exhaust it, and fail on
-- every try.
CREATE FUNCTION ops.sweep_releases_per_run() RETURNS integer
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$ SELECT 200 $$;

-- The releases ops.sweep_expired_exceptions acts on as of p_now: those with
-- an exception past its expiry, and those with an exception whose window
-- has opened on a gate it does not bypass yet.
CREATE FUNCTION ops.releases_due_for_exception_sweep(p_now timestamptz) RETURNS uuid[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(first.release_id), '{}')
    FROM (
        SELECT due.release_id
        FROM (
            SELECT x.release_id, x.expires_at AS due_at FROM ops.exceptions x
            WHERE x.expired_at IS NULL AND x.expires_at <= p_now
            UNION ALL
            SELECT x.release_id, x.effective_from
            FROM ops.exceptions x
            JOIN ops.release_gates g ON g.release_id = x.release_id AND g.gate_code = ANY (x.impacted_gates)
            WHERE ops.exception_active(x, p_now) AND g.status NOT IN ('passed', 'bypassed')
        ) due
        GROUP BY due.release_id
        ORDER BY min(due.due_at), due.release_id
        LIMIT ops.sweep_releases_per_run()
    ) first
$$;

-- The releases ops.sweep_overdue_g4 acts on as of p_now: those with a
-- deployment whose G4 is still pending past its SLA and not flagged yet.
CREATE FUNCTION ops.releases_due_for_g4_sweep(p_now timestamptz) RETURNS uuid[]
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce(array_agg(first.release_id), '{}')
    FROM (
        SELECT dep.release_id
        FROM ops.deployments dep
        JOIN ops.gate_policies p ON p.gate_code = 'G4' AND p.environment = dep.environment
        WHERE dep.status IN ('succeeded', 'rolled_back') AND dep.g4_status = 'pending' AND dep.g4_overdue_at IS NULL
          AND dep.deployed_at + make_interval(mins => p.sla_minutes) <= p_now
        GROUP BY dep.release_id
        ORDER BY min(dep.deployed_at + make_interval(mins => p.sla_minutes)), dep.release_id
        LIMIT ops.sweep_releases_per_run()
    ) first
$$;

CREATE OR REPLACE FUNCTION ops.sweep_expired_exceptions(p_now timestamptz DEFAULT now()) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    e         record;
    swept     integer := 0;
    releases  uuid[];
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('opsgate.sweep_expired_exceptions'));
    releases := ops.releases_due_for_exception_sweep(p_now);
    PERFORM ops.lock_releases(releases);
    FOR e IN
        SELECT x.exception_id, x.release_id, x.impacted_gates, x.expires_at, r.environment_target
        FROM ops.exceptions x JOIN ops.releases r USING (release_id)
        WHERE x.expired_at IS NULL AND x.expires_at <= p_now AND x.release_id = ANY (releases)
        ORDER BY x.expires_at, x.exception_id
        FOR UPDATE OF x
    LOOP
        UPDATE ops.exceptions SET expired_at = p_now WHERE exception_id = e.exception_id;
        INSERT INTO ops.environment_events
            (environment, event_type, source_system, release_id, payload, idempotency_key, created_by)
        VALUES (e.environment_target, 'exception_expired', 'opsgate', e.release_id,
                jsonb_build_object('exception_id', e.exception_id, 'impacted_gates', e.impacted_gates,
                                   'expires_at', e.expires_at, 'swept_at', p_now),
                'opsgate/exception_expired/' || e.exception_id, 'opsgate')
        ON CONFLICT (idempotency_key) DO NOTHING;
        PERFORM ops.refresh_release(e.release_id, p_now);
        swept := swept + 1;
    END LOOP;

    -- Exceptions whose window has opened since they were recorded bypass now.
    PERFORM ops.refresh_release(x.release_id, p_now)
    FROM (
        SELECT DISTINCT x.release_id
        FROM ops.exceptions x
        JOIN ops.release_gates g ON g.release_id = x.release_id AND g.gate_code = ANY (x.impacted_gates)
        WHERE ops.exception_active(x, p_now) AND g.status NOT IN ('passed', 'bypassed')
          AND x.release_id = ANY (releases)
    ) x;
    RETURN swept;
END
$$;

CREATE OR REPLACE FUNCTION ops.sweep_overdue_g4(p_now timestamptz DEFAULT now()) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d         record;
    swept     integer := 0;
    releases  uuid[];
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('opsgate.sweep_overdue_g4'));
    releases := ops.releases_due_for_g4_sweep(p_now);
    PERFORM ops.lock_releases(releases);
    FOR d IN
        SELECT dep.deployment_id, dep.release_id, dep.environment, dep.deployed_at, p.sla_minutes, p.overdue_action
        FROM ops.deployments dep
        JOIN ops.gate_policies p ON p.gate_code = 'G4' AND p.environment = dep.environment
        WHERE dep.status IN ('succeeded', 'rolled_back') AND dep.g4_status = 'pending' AND dep.g4_overdue_at IS NULL
          AND dep.deployed_at + make_interval(mins => p.sla_minutes) <= p_now
          AND dep.release_id = ANY (releases)
        ORDER BY dep.deployed_at, dep.deployment_id
        FOR UPDATE OF dep
    LOOP
        -- A flag marks the row whatever the policy, so the next run skips it.
        UPDATE ops.deployments SET g4_overdue_at = p_now WHERE deployment_id = d.deployment_id;
        INSERT INTO ops.environment_events
            (environment, event_type, source_system, release_id, deployment_id, payload, idempotency_key, created_by)
        VALUES (d.environment, 'g4_overdue', 'opsgate', d.release_id, d.deployment_id,
                jsonb_build_object('deployed_at', d.deployed_at, 'sla_minutes', d.sla_minutes,
                                   'action', d.overdue_action, 'swept_at', p_now),
                'opsgate/g4_overdue/' || d.deployment_id, 'opsgate')
        ON CONFLICT (idempotency_key) DO NOTHING;
        PERFORM ops.refresh_release(d.release_id, p_now);
        swept := swept + 1;
    END LOOP;
    RETURN swept;
END
$$;

-- Both sweeps in one transaction: the releases of both are locked first, so
-- the second sweep does not lock a release out of order. Every sweep takes
-- its own lock before any release's, as each sweep function does: two
-- workers running the sweeps wait for each other there, never in a cycle.
CREATE OR REPLACE FUNCTION ops.run_sweeps(p_now timestamptz DEFAULT now()) RETURNS jsonb
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('opsgate.sweep_expired_exceptions'));
    PERFORM pg_advisory_xact_lock(hashtext('opsgate.sweep_overdue_g4'));
    PERFORM ops.lock_releases(ops.releases_due_for_exception_sweep(p_now) || ops.releases_due_for_g4_sweep(p_now));
    RETURN jsonb_build_object(
        'expired_exceptions', ops.sweep_expired_exceptions(p_now),
        'overdue_g4', ops.sweep_overdue_g4(p_now));
END
$$;

REVOKE EXECUTE ON FUNCTION ops.lock_releases(uuid[]), ops.releases_due_for_exception_sweep(timestamptz),
    ops.releases_due_for_g4_sweep(timestamptz), ops.sweep_releases_per_run() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION ops.lock_releases(uuid[]) TO opsgate_worker;
