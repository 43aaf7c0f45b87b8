//! Deliveries processed together (`ingest::process_batch`): one transaction
//! when they all succeed, and exactly the single-message outcomes when one
//! of them does not.

mod common;

use common::worker::*;
use common::{TestDb, free_release_lock, hold_release_lock};
use opsgate::ingest::{self, Attempt, IngestOptions, Next, Outcome, Status};
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

fn options() -> IngestOptions {
    IngestOptions {
        max_body_bytes: 1 << 20,
        writer: "batch-test".into(),
    }
}

fn bodies(envelopes: &[Value]) -> Vec<Vec<u8>> {
    envelopes.iter().map(|e| serde_json::to_vec(e).unwrap()).collect()
}

/// First deliveries of `bodies`.
fn first_attempts(bodies: &[Vec<u8>]) -> Vec<Attempt<'_>> {
    bodies
        .iter()
        .map(|body| Attempt {
            body,
            attempt: 1,
            retries_left: true,
        })
        .collect()
}

async fn process(pool: &PgPool, bodies: &[Vec<u8>]) -> Vec<Outcome> {
    ingest::process_batch(pool, &first_attempts(bodies), &options())
        .await
        .expect("PostgreSQL is up")
}

/// How many transactions wrote the ledger rows (rows of one transaction
/// share their xmin).
async fn ledger_transactions(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM ops.event_ingest_log")
        .fetch_one(pool)
        .await
        .unwrap()
}

fn g1_check(release_id: Uuid, name: &str, status: &str) -> Value {
    envelope(
        "check_result",
        release_id,
        Some("G1"),
        json!({"check_name": name, "status": status}),
    )
}

#[tokio::test]
async fn deliveries_that_all_succeed_share_one_transaction() {
    let db = TestDb::new().await;
    let release = fresh_release();
    let envelopes = vec![
        release_created(release, "v1"),
        g1_check(release, "unit_tests", "pass"),
        g1_check(release, "lint", "fail"),
    ];
    let outcomes = process(&db.pool, &bodies(&envelopes)).await;

    for (outcome, envelope) in outcomes.iter().zip(&envelopes) {
        assert_eq!(outcome.status, Status::Accepted, "{outcome:?}");
        assert_eq!(outcome.next, Next::Ack);
        assert_eq!(
            outcome.idempotency_key.as_deref(),
            Some(key_of(envelope).as_str())
        );
    }
    // The release is derived once, after both checks: each result reports
    // the gate the transaction commits, never the `passed` between them.
    assert_eq!(outcomes[1].result.as_ref().unwrap()["gate_status"], "failed");
    assert_eq!(outcomes[2].result.as_ref().unwrap()["gate_status"], "failed");
    let g1_changes: Vec<Value> = sqlx::query_scalar(
        "SELECT l.changes -> 'status' FROM ops.change_log l
         JOIN ops.release_gates g ON g.gate_id::text = l.row_key
         WHERE l.table_name = 'release_gates' AND g.gate_code = 'G1' AND l.changes ? 'status'",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(g1_changes, vec![json!({"from": "pending", "to": "failed"})]);
    assert_eq!(
        ledger_transactions(&db.pool).await,
        1,
        "one transaction for the batch"
    );
    let checks: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.gate_checks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(checks, 2);
    // The stored result is the one returned.
    let stored: Value = sqlx::query_scalar(
        "SELECT result FROM ops.event_ingest_log WHERE idempotency_key = $1 AND processing_status = 'accepted'",
    )
    .bind(key_of(&envelopes[2]))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(Some(stored), outcomes[2].result);
}

#[tokio::test]
async fn the_same_key_twice_in_a_batch_is_applied_once() {
    let db = TestDb::new().await;
    let release = release_created(fresh_release(), "v1");
    let outcomes = process(&db.pool, &bodies(&[release.clone(), release.clone()])).await;

    assert_eq!(outcomes[0].status, Status::Accepted);
    assert_eq!(outcomes[1].status, Status::Duplicate);
    assert_eq!(outcomes[1].result, outcomes[0].result, "the original result");
    assert_eq!(
        ledger(&db.pool, &key_of(&release)).await,
        vec![("accepted".to_owned(), 200), ("duplicate".to_owned(), 200)]
    );
    let releases: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.releases")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(releases, 1);
    assert_eq!(ledger_transactions(&db.pool).await, 1);
}

#[tokio::test]
async fn duplicates_of_earlier_and_of_same_batch_keys_are_answered_in_the_shared_transaction() {
    let db = TestDb::new().await;
    let first = fresh_release();
    let second = fresh_release();
    let created = release_created(first, "v1");
    let earlier = process(&db.pool, &bodies(std::slice::from_ref(&created))).await;
    assert_eq!(earlier[0].status, Status::Accepted);

    let check = g1_check(first, "unit_tests", "pass");
    let other = release_created(second, "v2");
    let other_check = g1_check(second, "lint", "fail");
    let outcomes = process(
        &db.pool,
        &bodies(&[
            check.clone(),
            created.clone(),
            other.clone(),
            check.clone(),
            other_check.clone(),
        ]),
    )
    .await;
    let statuses: Vec<Status> = outcomes.iter().map(|o| o.status).collect();
    assert_eq!(
        statuses,
        vec![
            Status::Accepted,
            Status::Duplicate,
            Status::Accepted,
            Status::Duplicate,
            Status::Accepted
        ]
    );
    assert_eq!(
        outcomes[1].result, earlier[0].result,
        "the result accepted before"
    );
    assert_eq!(
        outcomes[3].result, outcomes[0].result,
        "the result accepted in the batch"
    );
    assert_eq!(outcomes[0].result.as_ref().unwrap()["gate_status"], "passed");
    assert_eq!(outcomes[4].result.as_ref().unwrap()["gate_status"], "failed");
    assert_eq!(
        ledger_transactions(&db.pool).await,
        2,
        "the earlier transaction and one for the whole batch"
    );
    assert_eq!(
        ledger(&db.pool, &key_of(&created)).await,
        vec![("accepted".to_owned(), 200), ("duplicate".to_owned(), 200)]
    );
    assert_eq!(
        ledger(&db.pool, &key_of(&check)).await,
        vec![("accepted".to_owned(), 200), ("duplicate".to_owned(), 200)]
    );
    // Every stored result is the one returned, duplicates included.
    let stored: Vec<(String, String, Value)> = sqlx::query_as(
        "SELECT idempotency_key, processing_status::text, result FROM ops.event_ingest_log
         WHERE xmin::text <> (SELECT xmin::text FROM ops.event_ingest_log WHERE idempotency_key = $1
                              AND processing_status = 'accepted')",
    )
    .bind(key_of(&created))
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored.len(), 5);
    for (envelope, outcome) in [&check, &created, &other, &check, &other_check]
        .iter()
        .zip(&outcomes)
    {
        let status = if outcome.status == Status::Accepted {
            "accepted"
        } else {
            "duplicate"
        };
        assert!(
            stored.iter().any(|(key, s, result)| key == &key_of(envelope)
                && s == status
                && Some(result) == outcome.result.as_ref()),
            "{status} row of {} stores {:?}",
            key_of(envelope),
            outcome.result
        );
    }
    let checks: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.gate_checks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(checks, 2, "no second effect");
}

#[tokio::test]
async fn a_key_reused_inside_a_batch_is_rejected_like_a_single_message() {
    let db = TestDb::new().await;
    let release = fresh_release();
    let created = release_created(release, "v1");
    let mut reused = g1_check(release, "lint", "pass");
    reused["idempotency_key"] = created["idempotency_key"].clone();
    let outcomes = process(&db.pool, &bodies(&[created.clone(), reused])).await;
    let summary: Vec<(Status, u16)> = outcomes.iter().map(|o| (o.status, o.code)).collect();
    assert_eq!(summary, vec![(Status::Accepted, 200), (Status::Rejected, 422)]);
    let checks: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.gate_checks")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(checks, 0);
}

#[tokio::test]
async fn a_failing_delivery_leaves_every_other_outcome_as_if_processed_alone() {
    let db = TestDb::new().await;
    let known = fresh_release();
    let unknown = fresh_release();
    let created = release_created(known, "v1");
    let mut reused = release_created(known, "v1-other");
    reused["idempotency_key"] = created["idempotency_key"].clone();
    let check = g1_check(known, "unit_tests", "pass");

    let mut all = bodies(&[
        created.clone(),
        g1_check(unknown, "unit_tests", "pass"),
        check.clone(),
        reused,
        created.clone(),
    ]);
    all.insert(2, b"{not json".to_vec());
    let outcomes = process(&db.pool, &all).await;
    let summary: Vec<(Status, u16, Next)> = outcomes.iter().map(|o| (o.status, o.code, o.next)).collect();
    assert_eq!(
        summary,
        vec![
            (Status::Accepted, 200, Next::Ack),
            // Its release_created may still come: retried first.
            (Status::Error, 409, Next::Retry),
            (Status::Rejected, 400, Next::DeadLetter),
            (Status::Accepted, 200, Next::Ack),
            (Status::Rejected, 422, Next::DeadLetter),
            (Status::Duplicate, 200, Next::Ack),
        ]
    );
    assert_eq!(
        ledger(&db.pool, &key_of(&created)).await,
        vec![
            ("accepted".to_owned(), 200),
            ("rejected".to_owned(), 422),
            ("duplicate".to_owned(), 200)
        ]
    );
    assert_eq!(
        ledger(&db.pool, &key_of(&check)).await,
        vec![("accepted".to_owned(), 200)]
    );
    let (releases, checks): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM ops.releases), (SELECT count(*) FROM ops.gate_checks)")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!((releases, checks), (1, 1), "every effect exactly once");
}

#[tokio::test]
async fn an_unreachable_database_holds_the_whole_batch() {
    let settings = opsgate::config::DatabaseSettings {
        url: opsgate::config::SecretUrl::new("postgres://postgres@127.0.0.1:1/none".to_owned()),
        max_connections: 2,
        acquire_timeout_secs: 1,
    };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(settings.acquire_timeout())
        .connect_lazy(settings.url.expose())
        .unwrap();
    let release = fresh_release();
    let all = bodies(&[
        release_created(release, "v1"),
        g1_check(release, "unit_tests", "pass"),
    ]);
    let result = ingest::process_batch(&pool, &first_attempts(&all), &options()).await;
    assert!(
        result.is_err(),
        "nothing is decided while PostgreSQL is down: {result:?}"
    );
}

#[tokio::test]
async fn a_release_lock_that_times_out_is_retried_and_leaves_the_connection_usable() {
    let db = TestDb::new().await;
    // One connection, on which waiting for a lock gives up quickly.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET lock_timeout = '200ms'").execute(conn).await?;
                Ok(())
            })
        })
        .connect(db.settings.url.expose())
        .await
        .unwrap();
    let release = fresh_release();
    let created = release_created(release, "v1");
    let outcomes = process(&pool, &bodies(std::slice::from_ref(&created))).await;
    assert_eq!(outcomes[0].status, Status::Accepted);

    let holder = hold_release_lock(&db, release).await;
    let check = g1_check(release, "lint", "pass");
    let outcomes = process(&pool, &bodies(std::slice::from_ref(&check))).await;
    assert_eq!(
        (outcomes[0].status, outcomes[0].code, outcomes[0].next),
        (Status::Error, 503, Next::Retry),
        "{outcomes:?}"
    );
    assert!(
        outcomes[0].error.as_deref().unwrap_or("").contains("lock"),
        "{outcomes:?}"
    );
    free_release_lock(holder, release).await;

    // The same (only) connection works for the next delivery.
    let outcomes = process(&pool, &bodies(std::slice::from_ref(&check))).await;
    assert_eq!(outcomes[0].status, Status::Accepted, "{outcomes:?}");
}

#[tokio::test]
async fn the_release_lock_is_held_until_the_transaction_ends() {
    let db = TestDb::new().await;
    let release = fresh_release();
    let created = release_created(release, "v1");
    process(&db.pool, &bodies(std::slice::from_ref(&created))).await;
    // Make the handler's write slow, to look at the lock while it runs.
    sqlx::raw_sql(
        "CREATE FUNCTION public.slow_down() RETURNS trigger LANGUAGE plpgsql AS
             $$ BEGIN PERFORM pg_sleep(3); RETURN NEW; END $$;
         CREATE TRIGGER slow_down BEFORE INSERT ON ops.gate_checks
             FOR EACH ROW EXECUTE FUNCTION public.slow_down();",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let pool = db.pool.clone();
    let check = bodies(&[g1_check(release, "lint", "pass")]);
    let running = tokio::spawn(async move { process(&pool, &check).await });
    // Looked at while the handler sleeps in its write (3 s), without taking it.
    let mut held_while_running = false;
    while !running.is_finished() && !held_while_running {
        held_while_running = sqlx::query_scalar(
            // A bigint key shows as its high and low 32 bits.
            "SELECT EXISTS (SELECT 1 FROM pg_locks
                            WHERE locktype = 'advisory' AND granted AND objsubid = 1
                              AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                              AND (classid::bigint << 32) | objid::bigint = hashtextextended($1::text, 0))",
        )
        .bind(release)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(held_while_running, "the handler runs under the release lock");
    let outcomes = running.await.unwrap();
    assert_eq!(outcomes[0].status, Status::Accepted);
    let mut conn = db.pool.acquire().await.unwrap();
    let free_after: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1::text, 0))")
        .bind(release)
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert!(free_after, "the commit releases it");
}

/// A value past one of PostgreSQL's limits (here the size of an index entry)
/// fails the same way on every attempt: it is refused at once, not retried
/// for twelve minutes as if the database were in trouble.
#[tokio::test]
async fn a_value_past_a_postgresql_limit_is_rejected_not_retried() {
    let db = TestDb::new().await;
    let release = fresh_release();
    let created = process(&db.pool, &bodies(&[release_created(release, "v1")])).await;
    assert_eq!(created[0].status, Status::Accepted);

    // Random hex does not compress below the btree entry limit (~2.7 kB).
    let huge_name: String = (0..250).map(|_| Uuid::new_v4().simple().to_string()).collect();
    let outcomes = process(&db.pool, &bodies(&[g1_check(release, &huge_name, "pass")])).await;
    let outcome = &outcomes[0];
    assert_eq!(outcome.status, Status::Rejected, "{outcome:?}");
    assert_eq!(outcome.code, 422, "{outcome:?}");
    assert_eq!(outcome.next, Next::DeadLetter);
}

/// A key too long to accept is refused with 400, and its attempt still
/// leaves a ledger row: the row keeps the key's first 512 bytes, since the
/// whole key would not fit the ledger's key index.
#[tokio::test]
async fn an_oversized_idempotency_key_is_rejected_and_recorded() {
    let db = TestDb::new().await;
    let release = fresh_release();
    let mut event = g1_check(release, "unit-tests", "pass");
    // Random hex does not compress below the btree entry limit (~2.7 kB).
    let huge_key: String = (0..250).map(|_| Uuid::new_v4().simple().to_string()).collect();
    event["idempotency_key"] = json!(huge_key);

    let outcomes = process(&db.pool, &bodies(&[event])).await;
    let outcome = &outcomes[0];
    assert_eq!(outcome.status, Status::Rejected, "{outcome:?}");
    assert_eq!(outcome.code, 400, "{outcome:?}");
    assert_eq!(outcome.next, Next::DeadLetter);
    let replied_key = outcome.idempotency_key.as_deref().unwrap_or_default();
    assert!(
        replied_key.len() <= 512,
        "the reply and the log carry {} bytes of key",
        replied_key.len()
    );

    let rows: Vec<(String, i16, String)> = sqlx::query_as(
        "SELECT idempotency_key, response_code, processing_status::text FROM ops.event_ingest_log",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "one ledger row for the attempt: {rows:?}");
    let (stored_key, code, status) = &rows[0];
    assert_eq!((*code, status.as_str()), (400, "rejected"));
    assert!(
        stored_key.len() <= 512,
        "stored key is {} bytes",
        stored_key.len()
    );
    let kept = stored_key.trim_end_matches('…');
    assert!(
        huge_key.starts_with(kept),
        "the stored key is the key's beginning"
    );
}

/// Makes every insert into ops.gate_checks fail with the SQLSTATE in
/// `public.injected_fault` (none while that table is empty).
async fn inject_check_faults(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE public.injected_fault (sqlstate text NOT NULL);
         CREATE FUNCTION public.inject_fault() RETURNS trigger LANGUAGE plpgsql AS
             $$ DECLARE code text;
                BEGIN
                    SELECT sqlstate INTO code FROM public.injected_fault;
                    IF code IS NOT NULL THEN
                        RAISE EXCEPTION 'injected %', code
                            USING ERRCODE = code, DETAIL = 'detail of ' || code, HINT = 'hint of ' || code;
                    END IF;
                    RETURN NEW;
                END $$;
         CREATE TRIGGER inject_fault BEFORE INSERT ON ops.gate_checks
             FOR EACH ROW EXECUTE FUNCTION public.inject_fault();",
    )
    .execute(pool)
    .await
    .unwrap();
}

async fn set_injected_fault(pool: &PgPool, sqlstate: &str) {
    sqlx::query("DELETE FROM public.injected_fault")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO public.injected_fault VALUES ($1)")
        .bind(sqlstate)
        .execute(pool)
        .await
        .unwrap();
}

async fn count(pool: &PgPool, query: &'static str) -> i64 {
    sqlx::query_scalar(query).fetch_one(pool).await.unwrap()
}

/// Real database errors, raised where a handler writes, are answered by
/// their class: transient ones are retried (or dead-lettered once no retry
/// is left) and leave nothing behind, permanent ones are refused at once.
/// Each comes in a batch with an event that succeeds, so the shared
/// transaction fails first and both are then processed alone.
#[tokio::test]
async fn database_errors_are_answered_by_their_class() {
    let db = TestDb::new().await;
    let release = fresh_release();
    let created = process(&db.pool, &bodies(&[release_created(release, "v1")])).await;
    assert_eq!(created[0].status, Status::Accepted, "{created:?}");
    inject_check_faults(&db.pool).await;

    let cases: [(&str, Status, u16, Next, &str); 10] = [
        // Serialization failure, deadlock, canceled, out of memory.
        ("40001", Status::Error, 503, Next::Retry, "error"),
        ("40P01", Status::Error, 503, Next::Retry, "error"),
        ("57014", Status::Error, 503, Next::Retry, "error"),
        ("53200", Status::Error, 503, Next::Retry, "error"),
        // Unique and foreign-key violations.
        ("23505", Status::Rejected, 409, Next::DeadLetter, "rejected"),
        ("23503", Status::Rejected, 409, Next::DeadLetter, "rejected"),
        // Check violation, bad value, a PostgreSQL limit, a trigger's rule.
        ("23514", Status::Rejected, 422, Next::DeadLetter, "rejected"),
        ("22P02", Status::Rejected, 422, Next::DeadLetter, "rejected"),
        ("54000", Status::Rejected, 422, Next::DeadLetter, "rejected"),
        ("P0001", Status::Rejected, 422, Next::DeadLetter, "rejected"),
    ];
    let mut checks = Vec::new();
    for (sqlstate, status, code, next, row) in cases {
        set_injected_fault(&db.pool, sqlstate).await;
        let check = g1_check(release, &format!("check_{sqlstate}"), "pass");
        let other = release_created(fresh_release(), &format!("other-{sqlstate}"));
        let outcomes = process(&db.pool, &bodies(&[other.clone(), check.clone()])).await;
        assert_eq!(
            (outcomes[0].status, outcomes[0].next),
            (Status::Accepted, Next::Ack),
            "{sqlstate}: the other event is applied alone: {outcomes:?}"
        );
        let outcome = &outcomes[1];
        assert_eq!(
            (outcome.status, outcome.code, outcome.next),
            (status, code, next),
            "{sqlstate}: {outcome:?}"
        );
        assert_eq!(outcome.idempotency_key.as_deref(), Some(key_of(&check).as_str()));
        let error = outcome.error.as_deref().unwrap_or_default();
        assert!(
            error.contains("insert the check") && error.contains(&format!("injected {sqlstate}")),
            "{sqlstate}: {error}"
        );
        assert!(!error.contains("retries exhausted"), "{sqlstate}: {error}");
        // The server's message and code, not sqlx's prefix or the line of
        // PostgreSQL's own source that raised it.
        assert!(
            error.ends_with(&format!(
                "[SQLSTATE {sqlstate}] (detail of {sqlstate}) hint: hint of {sqlstate}"
            )),
            "{sqlstate}: {error}"
        );
        assert!(
            !error.contains(" at line ") && !error.contains("error returned from database"),
            "{error}"
        );
        assert_eq!(
            ledger(&db.pool, &key_of(&check)).await,
            vec![(row.to_owned(), code as i16)],
            "{sqlstate}: one ledger row for the attempt"
        );
        assert_eq!(
            ledger(&db.pool, &key_of(&other)).await,
            vec![("accepted".to_owned(), 200)],
            "{sqlstate}"
        );
        checks.push(check);
    }

    // No retry left: a transient fault is dead-lettered, and says why.
    set_injected_fault(&db.pool, "40001").await;
    let last = g1_check(release, "check_last_attempt", "pass");
    let body = bodies(std::slice::from_ref(&last));
    let attempts = [Attempt {
        body: &body[0],
        attempt: 6,
        retries_left: false,
    }];
    let outcomes = ingest::process_batch(&db.pool, &attempts, &options())
        .await
        .expect("PostgreSQL is up");
    let outcome = &outcomes[0];
    assert_eq!(
        (outcome.status, outcome.code, outcome.next),
        (Status::Error, 503, Next::DeadLetter),
        "{outcome:?}"
    );
    let error = outcome.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("injected 40001") && error.contains("retries exhausted"),
        "{error}"
    );
    assert_eq!(
        ledger(&db.pool, &key_of(&last)).await,
        vec![("error".to_owned(), 503)]
    );
    let attempt: i32 =
        sqlx::query_scalar("SELECT attempt FROM ops.event_ingest_log WHERE idempotency_key = $1")
            .bind(key_of(&last))
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(attempt, 6, "the ledger row names the attempt");
    checks.push(last);

    // Nothing of a failed attempt stayed.
    assert_eq!(count(&db.pool, "SELECT count(*) FROM ops.gate_checks").await, 0);
    assert_eq!(
        count(
            &db.pool,
            "SELECT count(*) FROM ops.event_ingest_log WHERE processing_status = 'accepted'
             AND event_type = 'check_result'"
        )
        .await,
        0
    );

    // Once the fault is gone the very same events are accepted, together.
    sqlx::raw_sql("DROP TRIGGER inject_fault ON ops.gate_checks")
        .execute(&db.pool)
        .await
        .unwrap();
    let outcomes = process(&db.pool, &bodies(&checks)).await;
    for (outcome, check) in outcomes.iter().zip(&checks) {
        assert_eq!(
            (outcome.status, outcome.code, outcome.next),
            (Status::Accepted, 200, Next::Ack),
            "{outcome:?}"
        );
        assert_eq!(
            ledger(&db.pool, &key_of(check)).await.last(),
            Some(&("accepted".to_owned(), 200))
        );
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM ops.gate_checks").await,
        checks.len() as i64
    );
}

/// `classify` on errors PostgreSQL really returns, and on the client's own.
#[tokio::test]
async fn classify_sorts_sqlstates_into_unavailable_transient_and_permanent() {
    use opsgate::ingest::{Fault, classify};
    let db = TestDb::new().await;
    let cases = [
        ("08006", Fault::Unavailable),
        ("57P01", Fault::Unavailable),
        ("57P03", Fault::Unavailable),
        ("40001", Fault::Transient),
        ("40P01", Fault::Transient),
        ("55P03", Fault::Transient),
        ("57014", Fault::Transient),
        ("53100", Fault::Unavailable),
        ("25006", Fault::Unavailable),
        ("42501", Fault::Unavailable),
        ("42P01", Fault::Unavailable),
        ("42703", Fault::Unavailable),
        ("42883", Fault::Unavailable),
        ("42704", Fault::Unavailable),
        ("3F000", Fault::Unavailable),
        ("53200", Fault::Transient),
        ("53300", Fault::Transient),
        ("23505", Fault::Permanent(409)),
        ("23503", Fault::Permanent(409)),
        ("23502", Fault::Permanent(422)),
        ("23514", Fault::Permanent(422)),
        ("22001", Fault::Permanent(422)),
        ("22P02", Fault::Permanent(422)),
        ("54000", Fault::Permanent(422)),
        ("P0001", Fault::Permanent(422)),
    ];
    for (sqlstate, fault) in cases {
        let error = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{sqlstate}'; END $$"
        )))
        .execute(&db.pool)
        .await
        .expect_err("raised");
        assert_eq!(
            error.as_database_error().and_then(|e| e.code()).as_deref(),
            Some(sqlstate)
        );
        assert_eq!(classify(&error), fault, "{sqlstate}");
    }
    assert_eq!(classify(&sqlx::Error::PoolTimedOut), Fault::Unavailable);
    assert_eq!(classify(&sqlx::Error::PoolClosed), Fault::Unavailable);
    assert_eq!(
        classify(&sqlx::Error::Io(std::io::Error::from(
            std::io::ErrorKind::ConnectionReset
        ))),
        Fault::Unavailable
    );
}

/// When PostgreSQL goes away part way through a batch processed one by one,
/// the deliveries already committed keep their outcomes; only the rest are
/// processed again. (Processed again, a committed one would be answered
/// "duplicate" the first time its producer hears of it, and a failure would
/// be recorded twice for one attempt.)
#[tokio::test]
async fn a_batch_interrupted_by_a_lost_database_keeps_what_was_settled() {
    let db = TestDb::new().await;
    // The release named "lost" fails the shared transaction the first time
    // (so each delivery is processed alone), ends its own session the second
    // time (PostgreSQL "goes away" after the first delivery committed) and
    // goes in the third.
    sqlx::raw_sql(
        "CREATE SEQUENCE public.lost_tries;
         CREATE FUNCTION public.lose_the_session() RETURNS trigger
         LANGUAGE plpgsql SECURITY DEFINER AS $$
         BEGIN
             CASE nextval('public.lost_tries')
                 WHEN 1 THEN RAISE EXCEPTION 'not together';
                 WHEN 2 THEN PERFORM pg_terminate_backend(pg_backend_pid());
                 ELSE NULL;
             END CASE;
             RETURN NEW;
         END $$;
         CREATE TRIGGER lose_the_session BEFORE INSERT ON ops.releases
             FOR EACH ROW WHEN (NEW.release_name = 'lost') EXECUTE FUNCTION public.lose_the_session();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let first = release_created(fresh_release(), "kept");
    let lost = release_created(fresh_release(), "lost");
    let all = bodies(&[first.clone(), lost.clone()]);

    let interrupted = ingest::process_batch(&db.pool, &first_attempts(&all), &options())
        .await
        .expect_err("the second delivery's session was ended");
    assert_eq!(settled(&interrupted), [Some((Status::Accepted, 200)), None]);

    // The rest, once the database answers again.
    let rest = process(&db.pool, &all[1..]).await;
    assert_eq!(rest[0].status, Status::Accepted, "{rest:?}");
    assert_eq!(
        ledger(&db.pool, &key_of(&first)).await,
        vec![("accepted".to_owned(), 200)]
    );
    assert_eq!(
        ledger(&db.pool, &key_of(&lost)).await,
        vec![("accepted".to_owned(), 200)]
    );
}

/// (status, code) of each delivery an interrupted batch had settled.
fn settled(interrupted: &ingest::Interrupted) -> Vec<Option<(Status, u16)>> {
    interrupted
        .settled
        .iter()
        .map(|outcome| outcome.as_ref().map(|outcome| (outcome.status, outcome.code)))
        .collect()
}

/// The deliveries committed together are settled too when PostgreSQL goes
/// away while a delivery that could not join them (not an envelope) is
/// recorded afterwards: those after it are not processed again either.
#[tokio::test]
async fn a_batch_interrupted_after_its_shared_transaction_keeps_all_it_committed() {
    let db = TestDb::new().await;
    // The first refusal recorded ends its own session.
    sqlx::raw_sql(
        "CREATE SEQUENCE public.refusals;
         CREATE FUNCTION public.lose_the_session() RETURNS trigger
         LANGUAGE plpgsql SECURITY DEFINER AS $$
         BEGIN
             IF nextval('public.refusals') = 1 THEN
                 PERFORM pg_terminate_backend(pg_backend_pid());
             END IF;
             RETURN NEW;
         END $$;
         CREATE TRIGGER lose_the_session BEFORE INSERT ON ops.event_ingest_log
             FOR EACH ROW WHEN (NEW.processing_status = 'rejected') EXECUTE FUNCTION public.lose_the_session();",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (first, last) = (
        release_created(fresh_release(), "first"),
        release_created(fresh_release(), "last"),
    );
    let all = vec![
        serde_json::to_vec(&first).unwrap(),
        b"not json".to_vec(),
        serde_json::to_vec(&last).unwrap(),
    ];

    let interrupted = ingest::process_batch(&db.pool, &first_attempts(&all), &options())
        .await
        .expect_err("the refusal's session was ended");
    assert_eq!(
        settled(&interrupted),
        [Some((Status::Accepted, 200)), None, Some((Status::Accepted, 200))]
    );
    let rest = process(&db.pool, &all[1..2]).await;
    assert_eq!(
        (rest[0].status, rest[0].code),
        (Status::Rejected, 400),
        "{rest:?}"
    );
    for created in [&first, &last] {
        assert_eq!(
            ledger(&db.pool, &key_of(created)).await,
            vec![("accepted".to_owned(), 200)]
        );
    }
}
