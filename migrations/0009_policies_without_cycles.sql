-- Gate policies may not require each other in a cycle.
--
-- A gate that requires itself was already refused (0002). G1 requiring G2
-- while G2 requires G1 was not: neither gate could ever pass, and evaluating
-- either afresh (`opsgate release show`) recursed until the stack ran out.
-- Checked per statement, so a file applied in one transaction may reorder
-- requirements freely as long as the result has no cycle.
CREATE FUNCTION ops.check_policy_cycles() RETURNS trigger
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    cycle record;
BEGIN
    WITH RECURSIVE walk (environment, start_gate, gate, path) AS (
        SELECT p.environment, p.gate_code, r.req, ARRAY[p.gate_code, r.req]
        FROM ops.gate_policies p CROSS JOIN unnest(p.requires_gates) AS r (req)
        UNION ALL
        SELECT w.environment, w.start_gate, r.req, w.path || r.req
        FROM walk w
        JOIN ops.gate_policies p ON p.environment = w.environment AND p.gate_code = w.gate
        CROSS JOIN unnest(p.requires_gates) AS r (req)
        -- Stop at a gate already on the path (the cycle is then reported).
        WHERE NOT (w.gate = ANY (w.path[1:cardinality(w.path) - 1]))
    )
    SELECT environment, path INTO cycle FROM walk WHERE gate = start_gate LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'gate policies of % require each other in a cycle: %', cycle.environment,
            array_to_string(cycle.path, ' requires ')
            USING ERRCODE = 'check_violation',
                  HINT = 'A gate may require only gates that do not require it, directly or not.';
    END IF;
    RETURN NULL;
END
$$;
REVOKE EXECUTE ON FUNCTION ops.check_policy_cycles() FROM PUBLIC;
-- Named to fire before gate_policies_refresh (AFTER triggers run in name order).
CREATE TRIGGER gate_policies_acyclic AFTER INSERT OR UPDATE ON ops.gate_policies
    FOR EACH STATEMENT EXECUTE FUNCTION ops.check_policy_cycles();
