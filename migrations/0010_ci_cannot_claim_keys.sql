-- What a CI role writes directly cannot stand in for the worker.
--
-- The worker answers a key that has an `accepted` ledger row as a duplicate
-- and applies nothing: a CI login that inserted such a row for a key it
-- expects someone else to send (an n8n sign-off, say) would have that event
-- silently dropped. CI may still record attempts of its own, but not claim a
-- key. Keys starting with `opsgate/` name the worker's and the sweeps' own
-- environment events (policy violations, overdue G4, expired exceptions);
-- taken in advance, they would hide those events.
ALTER POLICY ci_insert_own ON ops.event_ingest_log
    WITH CHECK (created_by = ops.acting_identity() AND processing_status <> 'accepted');
ALTER POLICY ci_insert_own ON ops.environment_events
    WITH CHECK (created_by = ops.acting_identity() AND idempotency_key NOT LIKE 'opsgate/%');
