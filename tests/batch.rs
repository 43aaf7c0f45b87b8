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
    // Each result reports the gate as derived right after its own event.
    assert_eq!(outcomes[1].result.as_ref().unwrap()["gate_status"], "passed");
    assert_eq!(outcomes[2].result.as_ref().unwrap()["gate_status"], "failed");
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
             $$ BEGIN PERFORM pg_sleep(0.5); RETURN NEW; END $$;
         CREATE TRIGGER slow_down BEFORE INSERT ON ops.gate_checks
             FOR EACH ROW EXECUTE FUNCTION public.slow_down();",
    )
    .execute(&db.pool)
    .await
    .unwrap();

    let pool = db.pool.clone();
    let check = bodies(&[g1_check(release, "lint", "pass")]);
    let running = tokio::spawn(async move { process(&pool, &check).await });
    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    let free_while_running: bool =
        sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1::text, 0))")
            .bind(release)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(!free_while_running, "the handler runs under the release lock");
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
