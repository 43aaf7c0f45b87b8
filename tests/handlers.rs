//! The domain handlers against the real database: each event's facts land in
//! the right rows, derived state follows, and every refusal rule answers with
//! the right error and writes nothing.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::TestDb;
use common::seed::{self, Ts};
use opsgate::envelope::Envelope;
use opsgate::handlers::{HandlerError, dispatch};
use opsgate::ingest::{self, IngestOptions, Next, Outcome, Status};
use opsgate::ledger::{self, NextAction};
use serde_json::{Value, json};
use uuid::Uuid;

const SHA: &str = "abc123";
const SOURCE: &str = "producer-x";

// --- Helpers ----------------------------------------------------------------

fn envelope_at(
    event_type: &str,
    release_id: Uuid,
    gate_code: Option<&str>,
    payload: Value,
    emitted_at: DateTime<Utc>,
) -> Envelope {
    let body = json!({
        "schema_version": "v1.0",
        "idempotency_key": format!("test/{event_type}/{}", Uuid::new_v4()),
        "event_type": event_type,
        "source_system": SOURCE,
        "release_id": release_id,
        "gate_code": gate_code,
        "payload": payload,
        "emitted_at": emitted_at.to_rfc3339(),
    });
    opsgate::envelope::parse(&serde_json::to_vec(&body).unwrap(), 1 << 20).unwrap()
}

fn envelope(event_type: &str, release_id: Uuid, gate_code: Option<&str>, payload: Value) -> Envelope {
    envelope_at(event_type, release_id, gate_code, payload, seed::now())
}

/// Dispatches in a transaction of its own, committed when the handler
/// succeeds, and returns the result as the ledger stores it (which adds the
/// reported gate's derived status).
async fn apply(db: &TestDb, envelope: &Envelope) -> Result<Value, HandlerError> {
    // As the worker's transactions: facts derived once, before the result is stored.
    let mut tx = db.pool.begin().await.unwrap();
    seed::derive_at_end(&mut *tx).await;
    let hash = envelope.payload_hash();
    let NextAction::StartProcessing { ingest_id } =
        ledger::try_processing(&mut tx, envelope, &hash, 1, "test")
            .await
            .unwrap()
    else {
        panic!("the key of {} was claimed before", envelope.idempotency_key);
    };
    let handled = dispatch(&mut tx, envelope).await?;
    opsgate::handlers::derive_pending(&mut tx, None).await.unwrap();
    let result = ledger::save_result(&mut tx, ingest_id, &handled.result, handled.reports)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    Ok(result)
}

async fn ok(db: &TestDb, event_type: &str, release_id: Uuid, gate: Option<&str>, payload: Value) -> Value {
    apply(db, &envelope(event_type, release_id, gate, payload))
        .await
        .unwrap_or_else(|error| panic!("{event_type} failed: {error:?}"))
}

async fn fails(
    db: &TestDb,
    event_type: &str,
    release_id: Uuid,
    gate: Option<&str>,
    payload: Value,
) -> HandlerError {
    match apply(db, &envelope(event_type, release_id, gate, payload)).await {
        Ok(result) => panic!("{event_type} succeeded: {result}"),
        Err(error) => error,
    }
}

/// The code and message of a permanent refusal.
fn rejected(error: HandlerError) -> (u16, String) {
    match error {
        HandlerError::Rejected { code, message } => (code, message),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

/// Asserts a refusal with `code` whose message contains `needle`.
fn assert_rejected(error: HandlerError, code: u16, needle: &str) {
    let (actual, message) = rejected(error);
    assert_eq!(actual, code, "{message}");
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
}

fn assert_unknown(error: HandlerError, expected_kind: &str, expected_id: Uuid) {
    match error {
        HandlerError::UnknownReference { kind, id } => {
            assert_eq!((kind, id), (expected_kind, expected_id))
        }
        other => panic!("expected UnknownReference, got {other:?}"),
    }
}

fn id_of(value: &Value) -> Uuid {
    value
        .as_str()
        .and_then(|text| Uuid::parse_str(text).ok())
        .unwrap_or_else(|| panic!("not a UUID: {value}"))
}

async fn count(db: &TestDb, sql: &'static str, id: Uuid) -> i64 {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

/// A production-targeted release of `SHA`, initiated by dev-1, created by the handler.
async fn release(db: &TestDb) -> Uuid {
    let id = Uuid::new_v4();
    ok(
        db,
        "release_created",
        id,
        None,
        json!({
            "project": "acme/odoo",
            "release_name": format!("v{}", id.simple()),
            "environment_target": "production",
            "source_ref": SHA,
            "initiating_actor": "dev-1",
        }),
    )
    .await;
    id
}

async fn pass_g1_g2(db: &TestDb, r: Uuid) {
    ok(
        db,
        "check_result",
        r,
        Some("G1"),
        json!({"check_name": "unit_tests", "status": "pass"}),
    )
    .await;
    ok(
        db,
        "evidence_attached",
        r,
        None,
        json!({"artifact_type": "test_result", "artifact_url": "https://ci/tests"}),
    )
    .await;
    ok(
        db,
        "gate_signoff",
        r,
        Some("G2"),
        json!({"approver_id": "qa-1", "persona_role": "qa_tester", "decision": "approved"}),
    )
    .await;
}

/// G1..G3 passed and the source_ref succeeded in staging: eligible for production.
async fn eligible_release(db: &TestDb) -> Uuid {
    let r = release(db).await;
    pass_g1_g2(db, r).await;
    ok(
        db,
        "evidence_attached",
        r,
        None,
        json!({"artifact_type": "rollback_plan", "artifact_url": "https://plan"}),
    )
    .await;
    ok(
        db,
        "gate_signoff",
        r,
        Some("G3"),
        json!({"approver_id": "rm-1", "persona_role": "release_manager", "decision": "approved"}),
    )
    .await;
    deploy(db, r, Uuid::new_v4(), "staging", "succeeded").await;
    assert!(seed::eligible(&db.pool, r, "production", None).await);
    r
}

async fn deploy(db: &TestDb, r: Uuid, deployment_id: Uuid, environment: &str, status: &str) -> Value {
    ok(
        db,
        "deployment_event",
        r,
        None,
        json!({"deployment_id": deployment_id, "environment": environment, "status": status, "deployed_by": "sre-1"}),
    )
    .await
}

fn exception_payload(approver: &str, expires_at: DateTime<Utc>) -> Value {
    json!({
        "exception_type": "gate_bypass",
        "impacted_gates": ["G3"],
        "reason": "hotfix",
        "risk_statement": "rollback ready",
        "approver_id": approver,
        "expires_at": expires_at,
        "compensating_controls": {"monitoring": "paged"},
    })
}

// --- release_created --------------------------------------------------------

/// One first delivery of `envelope` through the whole ingest path, ledger
/// included: the outcome a producer is answered with.
async fn ingest_once(db: &TestDb, envelope: &Envelope) -> Outcome {
    let body = serde_json::to_vec(envelope).unwrap();
    let options = IngestOptions {
        max_body_bytes: 1 << 20,
        writer: "test".into(),
    };
    ingest::process(&db.pool, &body, 1, true, &options)
        .await
        .expect("PostgreSQL is up")
}

/// (processing_status, response_code, error_detail) of each attempt of `key`.
async fn ledger_rows(db: &TestDb, key: &str) -> Vec<(String, i16, Option<String>)> {
    sqlx::query_as(
        "SELECT processing_status::text, response_code, error_detail FROM ops.event_ingest_log
         WHERE idempotency_key = $1 ORDER BY received_at",
    )
    .bind(key)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Asserts that `envelope` is refused for good with `code` and an error
/// containing `needle`: dead-lettered, and recorded so in the ledger.
async fn assert_refused(db: &TestDb, envelope: &Envelope, code: u16, needle: &str) {
    let outcome = ingest_once(db, envelope).await;
    assert_eq!(
        (outcome.status, outcome.code, outcome.next, &outcome.result),
        (Status::Rejected, code, Next::DeadLetter, &None),
        "{outcome:?}"
    );
    let error = outcome.error.unwrap_or_default();
    assert!(error.contains(needle), "{needle:?} not in {error:?}");
    assert_eq!(
        ledger_rows(db, &envelope.idempotency_key).await,
        [("rejected".to_owned(), i16::try_from(code).unwrap(), Some(error))]
    );
}

fn release_payload(project: &str, release_name: &str, source_ref: &str) -> Value {
    json!({"project": project, "release_name": release_name, "environment_target": "production",
           "source_ref": source_ref, "initiating_actor": "dev-1"})
}

/// (project, release_name, environment_target, source_ref, initiating_actor,
/// scope_metadata, status, created_by)
type ReleaseRow = (String, String, String, String, String, Value, String, String);

async fn release_row(db: &TestDb, release_id: Uuid) -> Option<ReleaseRow> {
    sqlx::query_as(
        "SELECT project, release_name, environment_target::text, source_ref, initiating_actor, scope_metadata,
                status::text, created_by
         FROM ops.releases WHERE release_id = $1",
    )
    .bind(release_id)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn release_created_records_the_release_and_its_four_pending_gates() {
    let db = TestDb::new().await;
    let r = Uuid::new_v4();
    let result = ok(
        &db,
        "release_created",
        r,
        None,
        json!({"project": "acme/crm", "release_name": "v2026.02.4", "environment_target": "staging",
               "source_ref": "release/v2026.02.4", "initiating_actor": "alice",
               "scope_metadata": {"modules": ["sale", "stock"]}}),
    )
    .await;
    assert_eq!(
        result,
        json!({"release_id": r, "project": "acme/crm", "release_name": "v2026.02.4", "status": "draft",
               "gates": ["G1", "G2", "G3", "G4"]})
    );
    assert_eq!(
        release_row(&db, r).await,
        Some((
            "acme/crm".to_owned(),
            "v2026.02.4".to_owned(),
            "staging".to_owned(),
            "release/v2026.02.4".to_owned(),
            "alice".to_owned(),
            json!({"modules": ["sale", "stock"]}),
            "draft".to_owned(),
            SOURCE.to_owned()
        ))
    );
    assert_eq!(
        seed::gate_statuses(&db.pool, r).await,
        ["G1", "G2", "G3", "G4"].map(|gate| (gate.to_owned(), "pending".to_owned()))
    );

    let other = Uuid::new_v4();
    let mut bad_target = release_payload("acme/crm", "v2", SHA);
    bad_target["environment_target"] = json!("qa");
    assert_rejected(
        fails(&db, "release_created", other, None, bad_target).await,
        400,
        "environment_target \"qa\"",
    );
    assert_eq!(release_row(&db, other).await, None);
}

/// A release id, and a release name within its project, are taken once: a
/// second release_created under either is a final 409 that changes nothing.
#[tokio::test]
async fn release_created_refuses_a_known_release_id_or_a_taken_name_with_409() {
    let db = TestDb::new().await;
    let r = Uuid::new_v4();
    let first = envelope(
        "release_created",
        r,
        None,
        release_payload("acme/odoo", "v1", SHA),
    );
    assert_eq!(ingest_once(&db, &first).await.status, Status::Accepted);
    let stored = release_row(&db, r).await.expect("the release was created");

    // The same id under a new key, with another project, name and commit, or
    // with the very same payload.
    let known_id = format!("release {r} already exists as acme/odoo/v1");
    for payload in [
        release_payload("acme/crm", "v9", "f00dfeed"),
        release_payload("acme/odoo", "v1", SHA),
    ] {
        assert_refused(
            &db,
            &envelope("release_created", r, None, payload),
            409,
            &known_id,
        )
        .await;
    }

    // The same project and name under another id.
    let second = Uuid::new_v4();
    assert_refused(
        &db,
        &envelope(
            "release_created",
            second,
            None,
            release_payload("acme/odoo", "v1", "f00dfeed"),
        ),
        409,
        &format!("acme/odoo/v1 is already release {r}"),
    )
    .await;
    assert_eq!(release_row(&db, second).await, None);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.release_gates WHERE release_id = $1",
            second
        )
        .await,
        0
    );

    // The name is unique within its project only; a known id is reported
    // before a name taken by another release.
    let elsewhere = Uuid::new_v4();
    ok(
        &db,
        "release_created",
        elsewhere,
        None,
        release_payload("acme/crm", "v1", SHA),
    )
    .await;
    assert_refused(
        &db,
        &envelope(
            "release_created",
            elsewhere,
            None,
            release_payload("acme/odoo", "v1", SHA),
        ),
        409,
        &format!("release {elsewhere} already exists as acme/crm/v1"),
    )
    .await;

    assert_eq!(release_row(&db, r).await, Some(stored));
    assert_eq!(
        ledger_rows(&db, &first.idempotency_key).await,
        [("accepted".to_owned(), 200, None)]
    );
}

// --- build_complete ---------------------------------------------------------

const GIT_SHA: &str = "9fceb02d0ae598e95dc970b74767f19372d61af8";

/// (release_id, git_sha, branch, commit_message, author, built_at,
/// image_digest, lock_file_hashes, ci_run_url, created_by)
type BuildRow = (
    Uuid,
    String,
    String,
    String,
    String,
    Ts,
    Option<String>,
    Value,
    Option<String>,
    String,
);

async fn build_row(db: &TestDb, build_id: Uuid) -> BuildRow {
    sqlx::query_as(
        "SELECT release_id, git_sha, branch, commit_message, author, built_at, image_digest, lock_file_hashes,
                ci_run_url, created_by
         FROM ops.builds WHERE build_id = $1",
    )
    .bind(build_id)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// (release_id, gate_code, check_name, source_system, status, artifact_ref,
/// deployment_id, observed_at, metadata, created_by)
type CheckRow = (
    Uuid,
    String,
    String,
    String,
    String,
    Option<String>,
    Option<Uuid>,
    Ts,
    Value,
    String,
);

async fn check_row(db: &TestDb, check_id: Uuid) -> CheckRow {
    sqlx::query_as(
        "SELECT g.release_id, g.gate_code::text, c.check_name, c.source_system, c.status::text, c.artifact_ref,
                c.deployment_id, c.observed_at, c.metadata, c.created_by
         FROM ops.gate_checks c JOIN ops.release_gates g USING (gate_id) WHERE c.check_id = $1",
    )
    .bind(check_id)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// (release_id, gate_id, check_id, deployment_id, environment, artifact_type,
/// source_system, artifact_url, sha256, metadata, created_by)
type EvidenceRow = (
    Option<Uuid>,
    Option<Uuid>,
    Option<Uuid>,
    Option<Uuid>,
    Option<String>,
    String,
    String,
    String,
    Option<String>,
    Value,
    String,
);

const CHECKS_OF_RELEASE: &str =
    "SELECT count(*) FROM ops.gate_checks c JOIN ops.release_gates g USING (gate_id) WHERE g.release_id = $1";

#[tokio::test]
async fn build_complete_records_the_manifest_its_g1_check_and_the_build_log() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let digest = format!("sha256:{}", "4c".repeat(32));
    let lock_hash = "0b".repeat(32);
    let log_sha = "c".repeat(64);
    let built_at = seed::now() - Duration::minutes(10);
    let build = envelope(
        "build_complete",
        r,
        Some("G1"),
        json!({
            "status": "pass",
            "check_name": "compile",
            "git_sha": GIT_SHA,
            "branch": "release/v1",
            "commit_message": "Release v1",
            "author": "alice",
            "built_at": built_at,
            "image_digest": digest,
            "lock_file_hashes": {"requirements.txt": lock_hash},
            "ci_run_url": "https://ci/runs/4711",
            "build_log_url": "https://ci/runs/4711/logs",
            "build_log_sha256": log_sha,
            "metadata": {"runner": "ubuntu-24.04"},
        }),
    );
    let result = apply(&db, &build).await.unwrap();
    assert_eq!(
        (&result["gate_code"], &result["gate_status"]),
        (&json!("G1"), &json!("passed"))
    );
    let build_id = id_of(&result["build_id"]);
    let check_id = id_of(&result["check_id"]);
    let artifact_id = id_of(&result["artifact_id"]);

    assert_eq!(
        build_row(&db, build_id).await,
        (
            r,
            GIT_SHA.to_owned(),
            "release/v1".to_owned(),
            "Release v1".to_owned(),
            "alice".to_owned(),
            built_at,
            Some(digest),
            json!({"requirements.txt": lock_hash}),
            Some("https://ci/runs/4711".to_owned()),
            SOURCE.to_owned()
        )
    );
    // Observed when the build finished, pointing at the CI run, naming its build.
    assert_eq!(
        check_row(&db, check_id).await,
        (
            r,
            "G1".to_owned(),
            "compile".to_owned(),
            SOURCE.to_owned(),
            "pass".to_owned(),
            Some("https://ci/runs/4711".to_owned()),
            None,
            built_at,
            json!({"runner": "ubuntu-24.04", "build_id": build_id, "git_sha": GIT_SHA}),
            SOURCE.to_owned()
        )
    );
    let evidence: EvidenceRow = sqlx::query_as(
        "SELECT release_id, gate_id, check_id, deployment_id, environment::text, artifact_type::text,
                source_system, artifact_url, sha256::text, metadata, created_by
         FROM ops.evidence_artifacts WHERE artifact_id = $1",
    )
    .bind(artifact_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        evidence,
        (
            Some(r),
            Some(seed::gate(&db.pool, r, "G1").await),
            Some(check_id),
            None,
            None,
            "build_log".to_owned(),
            SOURCE.to_owned(),
            "https://ci/runs/4711/logs".to_owned(),
            Some(log_sha),
            json!({"build_id": build_id}),
            SOURCE.to_owned()
        )
    );
    for table in [
        "SELECT count(*) FROM ops.builds WHERE release_id = $1",
        CHECKS_OF_RELEASE,
        "SELECT count(*) FROM ops.evidence_artifacts WHERE release_id = $1",
    ] {
        assert_eq!(count(&db, table, r).await, 1, "{table}");
    }
}

/// Without build_log_url no evidence is written and artifact_id is null (a
/// build_log_sha256 alone is refused, not dropped); the optional fields take
/// their documented defaults.
#[tokio::test]
async fn a_build_without_a_log_url_writes_no_evidence_and_takes_the_defaults() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let git_sha = "ab".repeat(32);
    assert_rejected(
        fails(
            &db,
            "build_complete",
            r,
            None,
            json!({"status": "fail", "git_sha": git_sha, "branch": "main", "author": "bob",
                   "build_log_sha256": "d".repeat(64)}),
        )
        .await,
        400,
        "build_log_sha256 is given without build_log_url",
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM ops.builds WHERE release_id = $1", r).await,
        0
    );
    let build = envelope(
        "build_complete",
        r,
        None,
        json!({"status": "fail", "git_sha": git_sha, "branch": "main", "author": "bob"}),
    );
    let result = apply(&db, &build).await.unwrap();
    assert_eq!(result.get("artifact_id"), Some(&Value::Null), "{result}");
    assert_eq!(
        (&result["gate_code"], &result["gate_status"]),
        (&json!("G1"), &json!("failed"))
    );
    let build_id = id_of(&result["build_id"]);
    assert_eq!(
        build_row(&db, build_id).await,
        (
            r,
            git_sha.clone(),
            "main".to_owned(),
            String::new(),
            "bob".to_owned(),
            build.emitted_at,
            None,
            json!({}),
            None,
            SOURCE.to_owned()
        )
    );
    assert_eq!(
        check_row(&db, id_of(&result["check_id"])).await,
        (
            r,
            "G1".to_owned(),
            "build".to_owned(),
            SOURCE.to_owned(),
            "fail".to_owned(),
            None,
            None,
            build.emitted_at,
            json!({"build_id": build_id, "git_sha": git_sha}),
            SOURCE.to_owned()
        )
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.evidence_artifacts WHERE release_id = $1",
            r
        )
        .await,
        0
    );

    // With only the log URL, the check points at the log; the later pass of
    // the same check name passes G1.
    let logged = ok(
        &db,
        "build_complete",
        r,
        None,
        json!({"status": "pass", "git_sha": git_sha, "branch": "main", "author": "bob",
               "build_log_url": "https://ci/log"}),
    )
    .await;
    assert_eq!(logged["gate_status"], "passed");
    let check = check_row(&db, id_of(&logged["check_id"])).await;
    assert_eq!(check.5.as_deref(), Some("https://ci/log"));
    let log: (String, Option<String>) = sqlx::query_as(
        "SELECT artifact_url, sha256::text FROM ops.evidence_artifacts WHERE artifact_id = $1",
    )
    .bind(id_of(&logged["artifact_id"]))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(log, ("https://ci/log".to_owned(), None));
}

#[tokio::test]
async fn build_complete_is_refused_for_another_gate_and_for_malformed_values() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let valid = json!({"status": "pass", "git_sha": GIT_SHA, "branch": "main", "author": "alice"});
    let with = |field: &str, value: Value| {
        let mut payload = valid.clone();
        payload[field] = value;
        payload
    };
    for gate in ["G2", "G3", "G4"] {
        assert_rejected(
            fails(&db, "build_complete", r, Some(gate), valid.clone()).await,
            400,
            "build_complete is a G1 event",
        );
    }
    assert_rejected(
        fails(&db, "build_complete", r, None, with("status", json!("done"))).await,
        400,
        "check status \"done\"",
    );
    assert_rejected(
        fails(
            &db,
            "build_complete",
            r,
            None,
            with("built_at", json!(Utc::now() + Duration::hours(1))),
        )
        .await,
        422,
        "built_at",
    );

    // Values the schema refuses: 422, naming the constraint. The later ones
    // fail after the build row was written, which goes too.
    let mut bad_log_sha = with("build_log_url", json!("https://ci/log"));
    bad_log_sha["build_log_sha256"] = json!("xyz");
    for (payload, constraint) in [
        (
            with("git_sha", json!(GIT_SHA.to_uppercase())),
            "builds_git_sha_check",
        ),
        (with("git_sha", json!("9fceb02")), "builds_git_sha_check"),
        (
            with("image_digest", json!("4c".repeat(32))),
            "builds_image_digest_check",
        ),
        (
            with("lock_file_hashes", json!({"Cargo.lock": "abc"})),
            "builds_lock_file_hashes_sha256",
        ),
        (with("branch", json!("\t")), "builds_branch_check"),
        (with("author", json!(" ")), "builds_author_check"),
        (with("check_name", json!(" ")), "gate_checks_check_name_check"),
        (
            with("build_log_url", json!(" ")),
            "evidence_artifacts_artifact_url_check",
        ),
        (bad_log_sha, "sha256_hex_check"),
    ] {
        assert_refused(
            &db,
            &envelope("build_complete", r, None, payload),
            422,
            constraint,
        )
        .await;
    }

    for table in [
        "SELECT count(*) FROM ops.builds WHERE release_id = $1",
        CHECKS_OF_RELEASE,
        "SELECT count(*) FROM ops.evidence_artifacts WHERE release_id = $1",
    ] {
        assert_eq!(count(&db, table, r).await, 0, "{table}");
    }
    assert_eq!(seed::gate_status(&db.pool, r, "G1").await, "pending");
}

// --- check_result -----------------------------------------------------------

/// A check lands on the gate it names and that gate alone follows: a pass is
/// a fact (in progress), a failing check fails it.
#[tokio::test]
async fn check_result_on_g2_and_g3_is_stored_on_that_gate_and_decides_it() {
    let db = TestDb::new().await;
    for gate in ["G2", "G3"] {
        let r = release(&db).await;
        let observed_at = seed::now() - Duration::minutes(3);
        let passed = ok(
            &db,
            "check_result",
            r,
            Some(gate),
            json!({"check_name": "e2e", "status": "pass", "artifact_ref": "https://ci/e2e",
                   "observed_at": observed_at, "metadata": {"tests": 12}}),
        )
        .await;
        assert_eq!(
            (&passed["gate_code"], &passed["gate_status"]),
            (&json!(gate), &json!("in_progress")),
            "{gate}"
        );
        assert_eq!(
            check_row(&db, id_of(&passed["check_id"])).await,
            (
                r,
                gate.to_owned(),
                "e2e".to_owned(),
                SOURCE.to_owned(),
                "pass".to_owned(),
                Some("https://ci/e2e".to_owned()),
                None,
                observed_at,
                json!({"tests": 12}),
                SOURCE.to_owned()
            )
        );

        let failed = ok(
            &db,
            "check_result",
            r,
            Some(gate),
            json!({"check_name": "security_scan", "status": "fail"}),
        )
        .await;
        assert_eq!(failed["gate_status"], "failed", "{gate}");
        let expected: Vec<(String, String)> = ["G1", "G2", "G3", "G4"]
            .into_iter()
            .map(|code| {
                let status = if code == gate { "failed" } else { "pending" };
                (code.to_owned(), status.to_owned())
            })
            .collect();
        assert_eq!(seed::gate_statuses(&db.pool, r).await, expected);
    }
}

/// A G4 check counts as a health check of the deployment it names; one that
/// names no deployment confirms nothing.
#[tokio::test]
async fn check_result_on_g4_is_a_health_check_of_its_deployment() {
    let db = TestDb::new().await;
    let r = eligible_release(&db).await;
    let d = Uuid::new_v4();
    deploy(&db, r, d, "production", "succeeded").await;
    let g4_of = |deployment_id: Uuid| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT g4_status::text FROM ops.deployments WHERE deployment_id = $1",
            )
            .bind(deployment_id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    let unattached = ok(
        &db,
        "check_result",
        r,
        Some("G4"),
        json!({"check_name": "http_probe", "status": "pass"}),
    )
    .await;
    assert_eq!(unattached["gate_status"], "in_progress");
    assert_eq!(g4_of(d).await, "pending");

    let probe = envelope(
        "check_result",
        r,
        Some("G4"),
        json!({"check_name": "http_probe", "status": "pass", "deployment_id": d,
               "artifact_ref": "https://grafana/probe"}),
    );
    let result = apply(&db, &probe).await.unwrap();
    assert_eq!(
        (&result["gate_code"], &result["gate_status"]),
        (&json!("G4"), &json!("passed"))
    );
    assert_eq!(g4_of(d).await, "passed");
    assert_eq!(
        check_row(&db, id_of(&result["check_id"])).await,
        (
            r,
            "G4".to_owned(),
            "http_probe".to_owned(),
            SOURCE.to_owned(),
            "pass".to_owned(),
            Some("https://grafana/probe".to_owned()),
            Some(d),
            probe.emitted_at,
            json!({}),
            SOURCE.to_owned()
        )
    );

    // Another release's deployment is a conflict; an unknown one may still arrive.
    let other = release(&db).await;
    assert_rejected(
        fails(
            &db,
            "check_result",
            other,
            Some("G4"),
            json!({"check_name": "http_probe", "status": "pass", "deployment_id": d}),
        )
        .await,
        409,
        "belongs to release",
    );
    let unknown = Uuid::new_v4();
    assert_unknown(
        fails(
            &db,
            "check_result",
            r,
            Some("G4"),
            json!({"check_name": "http_probe", "status": "pass", "deployment_id": unknown}),
        )
        .await,
        "deployment",
        unknown,
    );
    assert_eq!(count(&db, CHECKS_OF_RELEASE, other).await, 0);
}

#[tokio::test]
async fn check_result_without_gate_code_or_with_an_unknown_status_is_refused() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    assert_rejected(
        fails(
            &db,
            "check_result",
            r,
            None,
            json!({"check_name": "lint", "status": "pass"}),
        )
        .await,
        400,
        "check_result needs gate_code",
    );
    assert_rejected(
        fails(
            &db,
            "check_result",
            r,
            Some("G2"),
            json!({"check_name": "lint", "status": "green"}),
        )
        .await,
        400,
        "check status \"green\"",
    );
    assert_eq!(count(&db, CHECKS_OF_RELEASE, r).await, 0);
    assert_eq!(
        seed::gate_statuses(&db.pool, r).await,
        ["G1", "G2", "G3", "G4"].map(|gate| (gate.to_owned(), "pending".to_owned()))
    );
}

// --- gate_signoff -----------------------------------------------------------

#[tokio::test]
async fn gate_signoff_records_a_gate_approval_and_the_gate_follows() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let evidence = ok(
        &db,
        "evidence_attached",
        r,
        None,
        json!({"artifact_type": "uat_summary", "artifact_url": "https://uat"}),
    )
    .await;
    assert_eq!(evidence["gate_status"], Value::Null);

    let signoff = envelope(
        "gate_signoff",
        r,
        Some("G2"),
        json!({
            "approver_id": "qa-1",
            "persona_role": "qa_tester",
            "decision": "approved",
            "rationale_structured": {"uat": "done"},
            "rationale_text": "all green",
        }),
    );
    let result = apply(&db, &signoff).await.unwrap();
    assert_eq!(
        (&result["gate_code"], &result["gate_status"]),
        (&json!("G2"), &json!("passed"))
    );
    let row: (Uuid, String, String, String, String, Value, Option<String>, Ts, String) = sqlx::query_as(
        "SELECT a.release_id, g.gate_code::text, a.approver_id, a.persona_role::text || '/' || a.decision::text,
                a.scope::text, a.rationale_structured, a.rationale_text, a.decided_at, a.created_by
         FROM ops.approvals a JOIN ops.release_gates g USING (gate_id) WHERE a.approval_id = $1",
    )
    .bind(id_of(&result["approval_id"]))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            r,
            "G2".to_owned(),
            "qa-1".to_owned(),
            "qa_tester/approved".to_owned(),
            "gate".to_owned(),
            json!({"uat": "done"}),
            Some("all green".to_owned()),
            signoff.emitted_at,
            SOURCE.to_owned()
        )
    );

    // A later rejection by the same role fails the gate.
    let rejection = ok(
        &db,
        "gate_signoff",
        r,
        Some("G2"),
        json!({"approver_id": "qa-2", "persona_role": "qa_tester", "decision": "rejected",
               "decided_at": Utc::now() + Duration::seconds(5)}),
    )
    .await;
    assert_eq!(rejection["gate_status"], "failed");

    let base = json!({"approver_id": "qa-1", "persona_role": "qa_tester", "decision": "approved"});
    assert_rejected(
        fails(&db, "gate_signoff", r, None, base.clone()).await,
        400,
        "needs gate_code",
    );
    let mut bad_role = base.clone();
    bad_role["persona_role"] = json!("boss");
    assert_rejected(
        fails(&db, "gate_signoff", r, Some("G2"), bad_role).await,
        400,
        "persona_role \"boss\"",
    );
    let mut bad_decision = base.clone();
    bad_decision["decision"] = json!("maybe");
    assert_rejected(
        fails(&db, "gate_signoff", r, Some("G2"), bad_decision).await,
        400,
        "decision \"maybe\"",
    );
    assert_eq!(
        count(&db, "SELECT count(*) FROM ops.approvals WHERE release_id = $1", r).await,
        2
    );
}

#[tokio::test]
async fn a_fact_dated_in_the_future_is_refused() {
    // The latest check or decision wins: one dated 2099 would outvote every
    // real one until then.
    let db = TestDb::new().await;
    let r = release(&db).await;
    assert_rejected(
        fails(
            &db,
            "check_result",
            r,
            Some("G1"),
            json!({"check_name": "unit", "status": "pass", "observed_at": "2099-01-01T00:00:00Z"}),
        )
        .await,
        422,
        "observed_at 2099-01-01T00:00:00+00:00 is more than 5 minutes in the future",
    );
    let soon = Utc::now() + Duration::minutes(30);
    assert_rejected(
        fails(
            &db,
            "gate_signoff",
            r,
            Some("G2"),
            json!({"approver_id": "qa-1", "persona_role": "qa_tester", "decision": "approved",
                   "decided_at": soon}),
        )
        .await,
        422,
        "decided_at",
    );
    // A little ahead of our clock is a producer's drift, not an error.
    ok(
        &db,
        "check_result",
        r,
        Some("G1"),
        json!({"check_name": "unit", "status": "pass",
               "observed_at": Utc::now() + Duration::seconds(30)}),
    )
    .await;
    assert_eq!(
        count(&db, "SELECT count(*) FROM ops.approvals WHERE release_id = $1", r).await,
        0
    );
}

#[tokio::test]
async fn a_later_deployment_event_dated_in_the_future_is_refused_too() {
    // Only the first event of a deployment sets deployed_at, but a later one
    // that names a time past the worker's clock is as wrong: 422, not ignored.
    let db = TestDb::new().await;
    let r = release(&db).await;
    let deployment_id = Uuid::new_v4();
    deploy(&db, r, deployment_id, "staging", "in_progress").await;
    assert_rejected(
        fails(
            &db,
            "deployment_event",
            r,
            None,
            json!({"deployment_id": deployment_id, "environment": "staging", "status": "succeeded",
                   "deployed_by": "sre-1", "deployed_at": "2099-01-01T00:00:00Z"}),
        )
        .await,
        422,
        "deployed_at 2099-01-01T00:00:00+00:00 is more than 5 minutes in the future",
    );
    let status: String =
        sqlx::query_scalar("SELECT status::text FROM ops.deployments WHERE deployment_id = $1")
            .bind(deployment_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "in_progress", "the refused event advanced nothing");
}

// --- evidence_attached ------------------------------------------------------

#[tokio::test]
async fn evidence_attached_links_gate_check_and_deployment_of_the_release() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let other = release(&db).await;
    let check = ok(
        &db,
        "check_result",
        r,
        Some("G1"),
        json!({"check_name": "lint", "status": "pass"}),
    )
    .await;
    let check_id = id_of(&check["check_id"]);
    let deployment_id = Uuid::new_v4();
    deploy(&db, r, deployment_id, "staging", "in_progress").await;
    let sha = "a".repeat(64);

    let result = ok(
        &db,
        "evidence_attached",
        r,
        Some("G1"),
        json!({
            "artifact_type": "build_log",
            "artifact_url": "https://ci/log",
            "sha256": sha,
            "check_id": check_id,
            "deployment_id": deployment_id,
            "environment": "staging",
            "metadata": {"size": 10},
        }),
    )
    .await;
    assert_eq!(result["gate_status"], "passed");
    let row: (
        Uuid,
        Uuid,
        Uuid,
        Uuid,
        String,
        String,
        String,
        String,
        Value,
        String,
    ) = sqlx::query_as(
        "SELECT ea.release_id, ea.gate_id, ea.check_id, ea.deployment_id, ea.environment::text,
                ea.artifact_type::text, ea.artifact_url, ea.sha256::text, ea.metadata, ea.created_by
         FROM ops.evidence_artifacts ea WHERE ea.artifact_id = $1",
    )
    .bind(id_of(&result["artifact_id"]))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            r,
            seed::gate(&db.pool, r, "G1").await,
            check_id,
            deployment_id,
            "staging".to_owned(),
            "build_log".to_owned(),
            "https://ci/log".to_owned(),
            sha,
            json!({"size": 10}),
            SOURCE.to_owned()
        )
    );

    let evidence = |extra: Value| {
        let mut payload = json!({"artifact_type": "reference", "artifact_url": "https://x"});
        for (key, value) in extra.as_object().unwrap() {
            payload[key] = value.clone();
        }
        payload
    };
    // A check or deployment of another release is a conflict; an unknown one may still arrive.
    assert_rejected(
        fails(
            &db,
            "evidence_attached",
            other,
            None,
            evidence(json!({"check_id": check_id})),
        )
        .await,
        409,
        "belongs to release",
    );
    assert_rejected(
        fails(
            &db,
            "evidence_attached",
            other,
            None,
            evidence(json!({"deployment_id": deployment_id})),
        )
        .await,
        409,
        "belongs to release",
    );
    let unknown = Uuid::new_v4();
    assert_unknown(
        fails(
            &db,
            "evidence_attached",
            r,
            None,
            evidence(json!({"check_id": unknown})),
        )
        .await,
        "check",
        unknown,
    );
    assert_unknown(
        fails(
            &db,
            "evidence_attached",
            r,
            None,
            evidence(json!({"deployment_id": unknown})),
        )
        .await,
        "deployment",
        unknown,
    );
    assert_rejected(
        fails(
            &db,
            "evidence_attached",
            r,
            None,
            evidence(json!({"artifact_type": "screenshot"})),
        )
        .await,
        400,
        "artifact_type \"screenshot\"",
    );
    assert_rejected(
        fails(
            &db,
            "evidence_attached",
            r,
            None,
            evidence(json!({"sha256": "xyz"})),
        )
        .await,
        400,
        "sha256 \"xyz\"",
    );
    assert_rejected(
        fails(
            &db,
            "evidence_attached",
            r,
            None,
            evidence(json!({"environment": "qa"})),
        )
        .await,
        400,
        "environment \"qa\"",
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.evidence_artifacts WHERE release_id = $1",
            other
        )
        .await,
        0
    );
}

// --- exception_granted / exception_reviewed ---------------------------------

#[tokio::test]
async fn exception_granted_bypasses_its_gates_and_names_itself_after_the_key() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    pass_g1_g2(&db, r).await;
    let expires_at = seed::now() + Duration::hours(1);
    let grant = envelope(
        "exception_granted",
        r,
        None,
        exception_payload("rm-1", expires_at),
    );
    let result = apply(&db, &grant).await.unwrap();

    let exception_id = Uuid::new_v5(&Uuid::NAMESPACE_OID, grant.idempotency_key.as_bytes());
    assert_eq!(id_of(&result["exception_id"]), exception_id);
    assert_eq!(result["impacted_gates"], json!(["G3"]));
    assert_eq!(result["gate_statuses"], json!({"G3": "bypassed"}));
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "bypassed");
    let row: (Uuid, Vec<String>, String, Ts, Ts, Value, String, String) = sqlx::query_as(
        "SELECT release_id, impacted_gates::text[], approver_id, effective_from, expires_at, compensating_controls,
                post_review_status::text, created_by
         FROM ops.exceptions WHERE exception_id = $1",
    )
    .bind(exception_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            r,
            vec!["G3".to_owned()],
            "rm-1".to_owned(),
            grant.emitted_at,
            expires_at,
            json!({"monitoring": "paged"}),
            "pending".to_owned(),
            SOURCE.to_owned()
        )
    );
    assert!(seed::eligible(&db.pool, r, "staging", None).await);

    // A producer-chosen id is kept; the same id again is a conflict.
    let chosen = Uuid::new_v4();
    let mut payload = exception_payload("rm-2", expires_at);
    payload["exception_id"] = json!(chosen);
    payload["impacted_gates"] = json!(["G4", "G2", "G4"]);
    let second = ok(&db, "exception_granted", r, None, payload.clone()).await;
    assert_eq!(id_of(&second["exception_id"]), chosen);
    assert_eq!(second["impacted_gates"], json!(["G2", "G4"]));
    assert_rejected(
        fails(&db, "exception_granted", r, None, payload).await,
        409,
        "already exists",
    );
}

#[tokio::test]
async fn exception_granted_refuses_unbounded_expired_backwards_and_self_approved_exceptions() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let later = seed::now() + Duration::hours(1);

    let mut unbounded = exception_payload("rm-1", later);
    unbounded.as_object_mut().unwrap().remove("expires_at");
    assert_rejected(
        fails(&db, "exception_granted", r, None, unbounded).await,
        400,
        "expires_at",
    );

    let past = seed::now() - Duration::minutes(1);
    assert_rejected(
        fails(&db, "exception_granted", r, None, exception_payload("rm-1", past)).await,
        422,
        "is not in the future",
    );

    let mut backwards = exception_payload("rm-1", later);
    backwards["effective_from"] = json!(later + Duration::hours(1));
    assert_rejected(
        fails(&db, "exception_granted", r, None, backwards).await,
        422,
        "is not after effective_from",
    );

    // dev-1 initiated the release.
    assert_rejected(
        fails(
            &db,
            "exception_granted",
            r,
            None,
            exception_payload("dev-1", later),
        )
        .await,
        409,
        "separation of duties",
    );

    let mut no_gates = exception_payload("rm-1", later);
    no_gates["impacted_gates"] = json!([]);
    assert_rejected(
        fails(&db, "exception_granted", r, None, no_gates).await,
        400,
        "impacted_gates",
    );
    let mut bad_gate = exception_payload("rm-1", later);
    bad_gate["impacted_gates"] = json!(["G5"]);
    assert_rejected(
        fails(&db, "exception_granted", r, None, bad_gate).await,
        400,
        "\"G5\"",
    );

    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.exceptions WHERE release_id = $1",
            r
        )
        .await,
        0
    );
    assert_eq!(seed::gate_status(&db.pool, r, "G3").await, "pending");
}

#[tokio::test]
async fn exception_reviewed_sets_the_review_and_records_an_exception_approval() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let other = release(&db).await;
    let granted = ok(
        &db,
        "exception_granted",
        r,
        None,
        exception_payload("rm-1", seed::now() + Duration::hours(2)),
    )
    .await;
    let exception_id = id_of(&granted["exception_id"]);

    let review = envelope(
        "exception_reviewed",
        r,
        None,
        json!({"exception_id": exception_id, "post_review_status": "complete", "reviewer_id": "rm-2",
               "rationale_text": "hotfix verified"}),
    );
    let result = apply(&db, &review).await.unwrap();
    assert_eq!(
        (&result["exception_id"], &result["post_review_status"]),
        (&json!(exception_id), &json!("complete"))
    );
    let status: String =
        sqlx::query_scalar("SELECT post_review_status::text FROM ops.exceptions WHERE exception_id = $1")
            .bind(exception_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "complete");
    let approval: (Uuid, Option<Uuid>, Option<Uuid>, String, String, String, String, Ts, String) =
        sqlx::query_as(
            "SELECT release_id, exception_id, gate_id, approver_id, persona_role::text, decision::text, scope::text,
                    decided_at, created_by
             FROM ops.approvals WHERE approval_id = $1",
        )
        .bind(id_of(&result["approval_id"]))
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        approval,
        (
            r,
            Some(exception_id),
            None,
            "rm-2".to_owned(),
            "release_manager".to_owned(),
            "approved".to_owned(),
            "exception".to_owned(),
            review.emitted_at,
            SOURCE.to_owned()
        )
    );

    let payload = |id: Uuid, status: &str| json!({"exception_id": id, "post_review_status": status, "reviewer_id": "rm-2"});
    let unknown = Uuid::new_v4();
    assert_unknown(
        fails(&db, "exception_reviewed", r, None, payload(unknown, "waived")).await,
        "exception",
        unknown,
    );
    assert_rejected(
        fails(
            &db,
            "exception_reviewed",
            other,
            None,
            payload(exception_id, "waived"),
        )
        .await,
        409,
        "belongs to release",
    );
    assert_rejected(
        fails(
            &db,
            "exception_reviewed",
            r,
            None,
            payload(exception_id, "pending"),
        )
        .await,
        400,
        "post_review_status \"pending\"",
    );
}

// --- deployment_event -------------------------------------------------------

/// (event_type, idempotency_key, payload.status) of a deployment's environment events.
async fn environment_events(db: &TestDb, deployment_id: Uuid) -> Vec<(String, String, Value)> {
    sqlx::query_as(
        "SELECT event_type, idempotency_key, payload -> 'status' FROM ops.environment_events
         WHERE deployment_id = $1 ORDER BY created_at, event_type",
    )
    .bind(deployment_id)
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn deployment_events_record_then_advance_a_deployment() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let d = Uuid::new_v4();
    let start = envelope(
        "deployment_event",
        r,
        None,
        json!({"deployment_id": d, "environment": "staging", "status": "in_progress", "deployed_by": "sre-1",
               "metadata": {"run": 1}}),
    );
    let started = apply(&db, &start).await.unwrap();
    assert_eq!(
        (
            &started["status"],
            &started["previous_status"],
            &started["policy_violation"]
        ),
        (&json!("in_progress"), &Value::Null, &json!(false))
    );
    assert_eq!(
        (&started["g4_status"], &started["release_status"]),
        (&json!("pending"), &json!("in_progress"))
    );
    let row: (Uuid, String, String, String, String, Ts, Value, String) = sqlx::query_as(
        "SELECT release_id, environment::text, status::text, deployed_by, source_ref, deployed_at, metadata, created_by
         FROM ops.deployments WHERE deployment_id = $1",
    )
    .bind(d)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            r,
            "staging".to_owned(),
            "in_progress".to_owned(),
            "sre-1".to_owned(),
            SHA.to_owned(),
            start.emitted_at,
            json!({"run": 1}),
            SOURCE.to_owned()
        )
    );

    let complete = envelope(
        "deployment_event",
        r,
        None,
        json!({"deployment_id": d, "environment": "staging", "status": "succeeded", "deployed_by": "sre-1",
               "metadata": {"duration_s": 42}}),
    );
    let completed = apply(&db, &complete).await.unwrap();
    assert_eq!(
        (&completed["status"], &completed["previous_status"]),
        (&json!("succeeded"), &json!("in_progress"))
    );
    let metadata: Value = sqlx::query_scalar("SELECT metadata FROM ops.deployments WHERE deployment_id = $1")
        .bind(d)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(metadata, json!({"run": 1, "duration_s": 42}));

    // The same status again changes nothing; going backwards is refused.
    let again = deploy(&db, r, d, "staging", "succeeded").await;
    assert_eq!(
        (&again["status"], &again["previous_status"]),
        (&json!("succeeded"), &json!("succeeded"))
    );
    // Each environment event describes the deployment as stored by its step.
    let described: Vec<(String, bool)> = sqlx::query_as(
        "SELECT e.payload ->> 'status',
                (e.payload ->> 'deployed_at')::timestamptz = d.deployed_at
                AND e.payload ->> 'source_ref' = d.source_ref AND e.payload ->> 'deployed_by' = d.deployed_by
                AND e.payload ->> 'environment' = d.environment::text AND e.payload -> 'rollback_of' = 'null'
         FROM ops.environment_events e JOIN ops.deployments d USING (deployment_id)
         WHERE e.deployment_id = $1 ORDER BY e.created_at",
    )
    .bind(d)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        described,
        [("in_progress", true), ("succeeded", true), ("succeeded", true)]
            .map(|(status, same)| (status.to_owned(), same))
    );
    let payload = |status: &str, environment: &str| json!({"deployment_id": d, "environment": environment, "status": status, "deployed_by": "sre-1"});
    assert_rejected(
        fails(
            &db,
            "deployment_event",
            r,
            None,
            payload("in_progress", "staging"),
        )
        .await,
        409,
        &format!("cannot move deployment {d} from succeeded to in_progress"),
    );
    assert_rejected(
        fails(&db, "deployment_event", r, None, payload("failed", "staging")).await,
        409,
        "from succeeded to failed",
    );
    assert_rejected(
        fails(
            &db,
            "deployment_event",
            r,
            None,
            payload("succeeded", "production"),
        )
        .await,
        409,
        "staging deployment",
    );
    let other = release(&db).await;
    assert_rejected(
        fails(
            &db,
            "deployment_event",
            other,
            None,
            payload("succeeded", "staging"),
        )
        .await,
        409,
        "belongs to release",
    );
    assert_rejected(
        fails(&db, "deployment_event", r, None, payload("succeeded", "dev")).await,
        400,
        "environment \"dev\"",
    );
    assert_rejected(
        fails(&db, "deployment_event", r, None, payload("done", "staging")).await,
        400,
        "status \"done\"",
    );
    // An ill-typed field is named, however deep the reason.
    let mut no_offset = payload("succeeded", "staging");
    no_offset["deployed_at"] = json!("2026-11-24T10:00:00");
    assert_rejected(
        fails(&db, "deployment_event", r, None, no_offset).await,
        400,
        "invalid deployment_event payload: payload.deployed_at: ",
    );
    let mut not_a_uuid = payload("succeeded", "staging");
    not_a_uuid["deployment_id"] = json!("DEP-42");
    assert_rejected(
        fails(&db, "deployment_event", r, None, not_a_uuid).await,
        400,
        "payload.deployment_id: ",
    );
    let mut missing = payload("succeeded", "staging");
    missing.as_object_mut().unwrap().remove("deployed_by");
    assert_rejected(
        fails(&db, "deployment_event", r, None, missing).await,
        400,
        "invalid deployment_event payload: missing field `deployed_by`",
    );

    let failed = Uuid::new_v4();
    deploy(&db, r, failed, "staging", "in_progress").await;
    let result = deploy(&db, r, failed, "staging", "failed").await;
    assert_eq!(result["status"], "failed");
    assert_rejected(
        fails(
            &db,
            "deployment_event",
            r,
            None,
            json!({"deployment_id": failed, "environment": "staging", "status": "succeeded", "deployed_by": "sre-1"}),
        )
        .await,
        409,
        &format!("cannot move deployment {failed} from failed to succeeded"),
    );

    let events = environment_events(&db, d).await;
    assert_eq!(
        events,
        vec![
            (
                "deploy_start".to_owned(),
                start.idempotency_key.clone(),
                json!("in_progress")
            ),
            (
                "deploy_complete".to_owned(),
                complete.idempotency_key.clone(),
                json!("succeeded")
            ),
            (
                "deploy_complete".to_owned(),
                events[2].1.clone(),
                json!("succeeded")
            ),
        ]
    );
    let kinds: Vec<String> = environment_events(&db, failed)
        .await
        .into_iter()
        .map(|(kind, _, _)| kind)
        .collect();
    assert_eq!(kinds, ["deploy_start", "deploy_failed"]);
}

#[tokio::test]
async fn a_succeeded_rollback_rolls_the_release_back() {
    let db = TestDb::new().await;
    let r = eligible_release(&db).await;
    let production = Uuid::new_v4();
    let promoted = deploy(&db, r, production, "production", "succeeded").await;
    assert_eq!(
        (&promoted["release_status"], &promoted["policy_violation"]),
        (&json!("promoted"), &json!(false))
    );
    assert_eq!(promoted["blockers"], json!([]));

    let unknown = Uuid::new_v4();
    let rollback = |target: Uuid, environment: &str| {
        json!({"deployment_id": Uuid::new_v4(), "environment": environment, "status": "succeeded",
               "deployed_by": "sre-2", "source_ref": "previous", "rollback_of": target})
    };
    assert_unknown(
        fails(&db, "deployment_event", r, None, rollback(unknown, "production")).await,
        "deployment",
        unknown,
    );
    assert_rejected(
        fails(&db, "deployment_event", r, None, rollback(production, "staging")).await,
        409,
        "production deployment",
    );
    // A rollback belongs to the release it rolls back: pointing at another
    // release's deployment would skip the production guard for this one and
    // leave the other's status as it was.
    let other = eligible_release(&db).await;
    assert_rejected(
        fails(
            &db,
            "deployment_event",
            other,
            None,
            rollback(production, "production"),
        )
        .await,
        409,
        &format!("is a deployment of release {r}, not of release {other}"),
    );

    let payload = rollback(production, "production");
    let rollback_id = id_of(&payload["deployment_id"]);
    let result = ok(&db, "deployment_event", r, None, payload).await;
    assert_eq!(
        (
            &result["release_status"],
            &result["rollback_of"],
            &result["policy_violation"]
        ),
        (&json!("rolled_back"), &json!(production), &json!(false))
    );
    let kinds: Vec<String> = environment_events(&db, rollback_id)
        .await
        .into_iter()
        .map(|(kind, _, _)| kind)
        .collect();
    assert_eq!(kinds, ["rollback_trigger"]);

    // The rolled-back deployment itself may be marked so.
    let marked = deploy(&db, r, production, "production", "rolled_back").await;
    assert_eq!(marked["status"], "rolled_back");
    let kinds: Vec<String> = environment_events(&db, production)
        .await
        .into_iter()
        .map(|(kind, _, _)| kind)
        .collect();
    assert_eq!(kinds, ["deploy_complete", "rollback_trigger"]);
}

#[tokio::test]
async fn a_production_deployment_of_an_ineligible_release_is_recorded_and_flagged() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    pass_g1_g2(&db, r).await;
    let expected_blockers = seed::blockers(&db.pool, r, "production").await;
    assert!(!expected_blockers.is_empty());

    // Staging is not subject to the production policy.
    let staging = deploy(&db, r, Uuid::new_v4(), "staging", "in_progress").await;
    assert_eq!(staging["policy_violation"], false);

    let d = Uuid::new_v4();
    let started = deploy(&db, r, d, "production", "in_progress").await;
    assert_eq!(started["policy_violation"], true);
    assert_eq!(started["blockers"], json!(expected_blockers));
    assert!(
        expected_blockers
            .iter()
            .any(|b| b.starts_with("G3 Promotion Readiness")),
        "{expected_blockers:?}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.deployments WHERE deployment_id = $1",
            d
        )
        .await,
        1
    );

    let completed = deploy(&db, r, d, "production", "succeeded").await;
    assert_eq!(
        (&completed["policy_violation"], &completed["status"]),
        (&json!(true), &json!("succeeded"))
    );
    let violations: Vec<(String, String, Value, String)> = sqlx::query_as(
        "SELECT environment::text, idempotency_key, payload, source_system FROM ops.environment_events
         WHERE event_type = 'policy_violation' AND release_id = $1",
    )
    .bind(r)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(violations.len(), 1, "{violations:?}");
    let (environment, key, payload, source) = &violations[0];
    assert_eq!(
        (environment.as_str(), key.clone()),
        ("production", format!("opsgate/policy_violation/{d}"))
    );
    assert_eq!(
        (&payload["deployment_id"], &payload["blockers"]),
        (&json!(d), &json!(expected_blockers))
    );
    assert_eq!(source, "opsgate");

    // A failed production deployment is not a promotion: no flag.
    let failed = Uuid::new_v4();
    let result = deploy(&db, r, failed, "production", "failed").await;
    assert_eq!(result["policy_violation"], false);
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.environment_events WHERE event_type = 'policy_violation' AND deployment_id = $1",
            failed
        )
        .await,
        0
    );
}

// --- health_check -----------------------------------------------------------

#[tokio::test]
async fn a_health_check_decides_g4_of_its_deployment() {
    let db = TestDb::new().await;
    let r = eligible_release(&db).await;
    let d = Uuid::new_v4();
    let deployed = deploy(&db, r, d, "production", "succeeded").await;
    assert_eq!(deployed["g4_status"], "pending");

    let result = ok(
        &db,
        "health_check",
        r,
        None,
        json!({"deployment_id": d, "status": "pass", "artifact_ref": "https://probe"}),
    )
    .await;
    assert_eq!(
        (&result["g4_status"], &result["gate_code"], &result["gate_status"]),
        (&json!("passed"), &json!("G4"), &json!("passed"))
    );
    let row: (String, String, Option<Uuid>, Option<String>, String, String) = sqlx::query_as(
        "SELECT g.gate_code::text, c.check_name, c.deployment_id, c.artifact_ref, c.status::text, c.created_by
         FROM ops.gate_checks c JOIN ops.release_gates g USING (gate_id) WHERE c.check_id = $1",
    )
    .bind(id_of(&result["check_id"]))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "G4".to_owned(),
            "health_check".to_owned(),
            Some(d),
            Some("https://probe".to_owned()),
            "pass".to_owned(),
            SOURCE.to_owned()
        )
    );

    let with_g4 = ok(
        &db,
        "health_check",
        r,
        Some("G4"),
        json!({"deployment_id": d, "status": "warning", "check_name": "smoke"}),
    )
    .await;
    assert_eq!(with_g4["g4_status"], "passed");
    assert_rejected(
        fails(
            &db,
            "health_check",
            r,
            Some("G2"),
            json!({"deployment_id": d, "status": "pass"}),
        )
        .await,
        400,
        "G4 event",
    );
    assert_rejected(
        fails(
            &db,
            "health_check",
            r,
            None,
            json!({"deployment_id": d, "status": "ok"}),
        )
        .await,
        400,
        "\"ok\"",
    );
    let unknown = Uuid::new_v4();
    assert_unknown(
        fails(
            &db,
            "health_check",
            r,
            None,
            json!({"deployment_id": unknown, "status": "pass"}),
        )
        .await,
        "deployment",
        unknown,
    );
    let other = release(&db).await;
    assert_rejected(
        fails(
            &db,
            "health_check",
            other,
            None,
            json!({"deployment_id": d, "status": "pass"}),
        )
        .await,
        409,
        "belongs to release",
    );
}

#[tokio::test]
async fn a_failing_health_check_fails_g4() {
    let db = TestDb::new().await;
    let r = eligible_release(&db).await;
    let d = Uuid::new_v4();
    deploy(&db, r, d, "production", "succeeded").await;
    let result = ok(
        &db,
        "health_check",
        r,
        None,
        json!({"deployment_id": d, "status": "fail"}),
    )
    .await;
    assert_eq!(
        (&result["g4_status"], &result["gate_status"]),
        (&json!("failed"), &json!("failed"))
    );
}

// --- environment_event ------------------------------------------------------

#[tokio::test]
async fn environment_event_appends_to_the_log() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let d = Uuid::new_v4();
    deploy(&db, r, d, "staging", "in_progress").await;
    let event = envelope(
        "environment_event",
        r,
        None,
        json!({"environment": "staging", "event_type": "config_change", "payload": {"key": "workers"},
               "deployment_id": d}),
    );
    let result = apply(&db, &event).await.unwrap();
    let row: (String, String, String, Option<Uuid>, Option<Uuid>, Value, String, String) = sqlx::query_as(
        "SELECT environment::text, event_type, source_system, release_id, deployment_id, payload, idempotency_key,
                created_by
         FROM ops.environment_events WHERE event_id = $1",
    )
    .bind(id_of(&result["event_id"]))
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "staging".to_owned(),
            "config_change".to_owned(),
            SOURCE.to_owned(),
            Some(r),
            Some(d),
            json!({"key": "workers"}),
            event.idempotency_key.clone(),
            SOURCE.to_owned()
        )
    );

    assert_rejected(
        fails(
            &db,
            "environment_event",
            r,
            None,
            json!({"environment": "staging", "event_type": " "}),
        )
        .await,
        400,
        "event_type must not be blank",
    );
    assert_rejected(
        fails(
            &db,
            "environment_event",
            r,
            None,
            json!({"environment": "qa", "event_type": "x"}),
        )
        .await,
        400,
        "environment \"qa\"",
    );
    let other = release(&db).await;
    assert_rejected(
        fails(
            &db,
            "environment_event",
            other,
            None,
            json!({"environment": "staging", "event_type": "x", "deployment_id": d}),
        )
        .await,
        409,
        "belongs to release",
    );
    let unknown = Uuid::new_v4();
    assert_unknown(
        fails(
            &db,
            "environment_event",
            r,
            None,
            json!({"environment": "staging", "event_type": "x", "deployment_id": unknown}),
        )
        .await,
        "deployment",
        unknown,
    );
}

// --- incidents and drills ---------------------------------------------------

#[tokio::test]
async fn an_incident_opens_once_resolves_once_and_its_postmortem_goes_on() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let d = Uuid::new_v4();
    deploy(&db, r, d, "production", "succeeded").await;
    let incident_id = Uuid::new_v4();
    let detected_at = seed::now() - Duration::minutes(30);
    let opened = json!({"incident_id": incident_id, "severity": "sev2", "title": "checkout errors",
                        "deployment_id": d, "detected_at": detected_at, "timeline": [{"at": "t0", "note": "paged"}]});
    let result = ok(&db, "incident_opened", r, None, opened.clone()).await;
    assert_eq!(result["environment"], "production");
    // (release, deployment, environment / severity, title, created_by)
    let links: (Option<Uuid>, Option<Uuid>, String, String, String) = sqlx::query_as(
        "SELECT release_id, deployment_id, environment::text || '/' || severity::text, title, created_by
         FROM ops.incidents WHERE incident_id = $1",
    )
    .bind(incident_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        links,
        (
            Some(r),
            Some(d),
            "production/sev2".to_owned(),
            "checkout errors".to_owned(),
            SOURCE.to_owned()
        )
    );
    let state: (Ts, bool, Value, String) = sqlx::query_as(
        "SELECT detected_at, resolved_at IS NULL, timeline, postmortem_status::text
         FROM ops.incidents WHERE incident_id = $1",
    )
    .bind(incident_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        state,
        (
            detected_at,
            true,
            json!([{"at": "t0", "note": "paged"}]),
            "pending".to_owned()
        )
    );
    assert_rejected(
        fails(&db, "incident_opened", r, None, opened).await,
        409,
        "already exists",
    );
    assert_rejected(
        fails(
            &db,
            "incident_opened",
            r,
            None,
            json!({"incident_id": Uuid::new_v4(), "severity": "sev5", "title": "x"}),
        )
        .await,
        400,
        "severity \"sev5\"",
    );

    let too_early = json!({"incident_id": incident_id, "resolved_at": detected_at - Duration::minutes(1)});
    assert_rejected(
        fails(&db, "incident_resolved", r, None, too_early).await,
        422,
        "before the incident's detected_at",
    );
    let resolve = json!({"incident_id": incident_id, "root_cause": "bad migration", "postmortem_status": "in_progress"});
    let resolved = apply(&db, &envelope("incident_resolved", r, None, resolve.clone()))
        .await
        .unwrap();
    assert_eq!(resolved["postmortem_status"], "in_progress");
    let row: (Option<Ts>, Option<String>, String) = sqlx::query_as(
        "SELECT resolved_at, root_cause, postmortem_status::text FROM ops.incidents WHERE incident_id = $1",
    )
    .bind(incident_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(row.0.is_some());
    assert_eq!(
        (row.1.as_deref(), row.2.as_str()),
        (Some("bad migration"), "in_progress")
    );
    // Later events carry the postmortem on, and cannot move resolved_at.
    let moved = json!({"incident_id": incident_id, "resolved_at": row.0.unwrap() + Duration::minutes(5)});
    assert_rejected(
        fails(&db, "incident_resolved", r, None, moved).await,
        409,
        "resolved_at cannot move",
    );
    let completed = ok(
        &db,
        "incident_resolved",
        r,
        None,
        json!({"incident_id": incident_id, "root_cause": "a migration locked the table",
               "postmortem_status": "complete"}),
    )
    .await;
    assert_eq!(completed["postmortem_status"], "complete");
    assert_eq!(completed["resolved_at"], resolved["resolved_at"]);
    let after: (Option<Ts>, Option<String>) =
        sqlx::query_as("SELECT resolved_at, root_cause FROM ops.incidents WHERE incident_id = $1")
            .bind(incident_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(after, (row.0, Some("a migration locked the table".to_owned())));

    let unknown = Uuid::new_v4();
    assert_unknown(
        fails(&db, "incident_resolved", r, None, json!({"incident_id": unknown})).await,
        "incident",
        unknown,
    );
    let other = release(&db).await;
    let second = Uuid::new_v4();
    ok(
        &db,
        "incident_opened",
        r,
        None,
        json!({"incident_id": second, "severity": "sev4", "title": "slow"}),
    )
    .await;
    assert_rejected(
        fails(
            &db,
            "incident_resolved",
            other,
            None,
            json!({"incident_id": second}),
        )
        .await,
        409,
        "belongs to release",
    );
    assert_unknown(
        fails(
            &db,
            "incident_opened",
            r,
            None,
            json!({"incident_id": Uuid::new_v4(), "severity": "sev3", "title": "x",
                                                     "deployment_id": unknown}),
        )
        .await,
        "deployment",
        unknown,
    );
}

#[tokio::test]
async fn a_recovery_drill_is_recorded_with_its_evidence() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let sha = "b".repeat(64);
    let drill = envelope(
        "recovery_drill",
        r,
        None,
        json!({"environment": "staging", "drill_type": "database_restore", "executed_by": "sre-1",
               "outcome": "succeeded", "restore_validated": true, "evidence_url": "https://drills/1",
               "evidence_sha256": sha}),
    );
    let result = apply(&db, &drill).await.unwrap();
    let drill_id = Uuid::new_v5(&Uuid::NAMESPACE_OID, drill.idempotency_key.as_bytes());
    assert_eq!(id_of(&result["drill_id"]), drill_id);
    let artifact_id = id_of(&result["evidence_artifact_id"]);
    let row: (String, String, String, Ts, String, bool, Option<Uuid>, String) = sqlx::query_as(
        "SELECT environment::text, drill_type, executed_by, executed_at, outcome::text, restore_validated,
                evidence_artifact_id, created_by
         FROM ops.recovery_drills WHERE drill_id = $1",
    )
    .bind(drill_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "staging".to_owned(),
            "database_restore".to_owned(),
            "sre-1".to_owned(),
            drill.emitted_at,
            "succeeded".to_owned(),
            true,
            Some(artifact_id),
            SOURCE.to_owned()
        )
    );
    let artifact: (Option<Uuid>, String, String, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT release_id, artifact_type::text, artifact_url, sha256::text, environment::text
         FROM ops.evidence_artifacts WHERE artifact_id = $1",
    )
    .bind(artifact_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        artifact,
        (
            Some(r),
            "restore_drill".to_owned(),
            "https://drills/1".to_owned(),
            Some(sha),
            Some("staging".to_owned())
        )
    );

    let chosen = Uuid::new_v4();
    let plain = json!({"drill_id": chosen, "environment": "production", "drill_type": "failover",
                       "executed_by": "sre-2", "outcome": "partial", "restore_validated": false});
    let result = ok(&db, "recovery_drill", r, None, plain.clone()).await;
    assert_eq!(
        (id_of(&result["drill_id"]), &result["evidence_artifact_id"]),
        (chosen, &Value::Null)
    );
    assert_rejected(
        fails(&db, "recovery_drill", r, None, plain.clone()).await,
        409,
        "already exists",
    );
    let mut bad = plain;
    bad["drill_id"] = json!(Uuid::new_v4());
    bad["outcome"] = json!("ok");
    assert_rejected(
        fails(&db, "recovery_drill", r, None, bad).await,
        400,
        "outcome \"ok\"",
    );
}

// --- Unknown releases -------------------------------------------------------

#[tokio::test]
async fn every_handler_waits_for_an_unknown_release() {
    let db = TestDb::new().await;
    let missing = Uuid::new_v4();
    let some = Uuid::new_v4();
    let later = seed::now() + Duration::hours(1);
    let events: [(&str, Option<&str>, Value); 12] = [
        (
            "build_complete",
            Some("G1"),
            json!({"status": "pass", "git_sha": GIT_SHA, "branch": "main", "author": "alice"}),
        ),
        (
            "check_result",
            Some("G1"),
            json!({"check_name": "lint", "status": "pass"}),
        ),
        (
            "evidence_attached",
            None,
            json!({"artifact_type": "test_result", "artifact_url": "https://x"}),
        ),
        (
            "gate_signoff",
            Some("G2"),
            json!({"approver_id": "qa-1", "persona_role": "qa_tester", "decision": "approved"}),
        ),
        ("exception_granted", None, exception_payload("rm-1", later)),
        (
            "exception_reviewed",
            None,
            json!({"exception_id": some, "post_review_status": "complete", "reviewer_id": "rm-2"}),
        ),
        (
            "deployment_event",
            None,
            json!({"deployment_id": some, "environment": "staging", "status": "in_progress", "deployed_by": "sre-1"}),
        ),
        (
            "health_check",
            None,
            json!({"deployment_id": some, "status": "pass"}),
        ),
        (
            "environment_event",
            None,
            json!({"environment": "staging", "event_type": "x"}),
        ),
        (
            "incident_opened",
            None,
            json!({"incident_id": some, "severity": "sev3", "title": "x"}),
        ),
        ("incident_resolved", None, json!({"incident_id": some})),
        (
            "recovery_drill",
            None,
            json!({"environment": "staging", "drill_type": "restore", "executed_by": "sre-1",
                                        "outcome": "succeeded", "restore_validated": true}),
        ),
    ];
    for (event_type, gate, payload) in events {
        match fails(&db, event_type, missing, gate, payload).await {
            HandlerError::UnknownRelease(id) => assert_eq!(id, missing, "{event_type}"),
            other => panic!("{event_type}: expected UnknownRelease, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_backdated_deployment_neither_hides_the_violation_nor_revives_an_expired_exception() {
    // G3 is covered only by an exception that has expired; the production
    // deployment claims a deployed_at inside its window. Promotion time is
    // when the database recorded the deployment, so the exception stays
    // expired and the violation is flagged.
    let db = TestDb::new().await;
    let r = release(&db).await;
    pass_g1_g2(&db, r).await;
    deploy(&db, r, Uuid::new_v4(), "staging", "succeeded").await;
    let now = seed::now();
    seed::exception(
        &db.pool,
        r,
        &["G3"],
        "rm-1",
        now - Duration::hours(3),
        now - Duration::hours(1),
    )
    .await;
    assert!(!seed::eligible(&db.pool, r, "production", None).await);

    let d = Uuid::new_v4();
    let result = ok(
        &db,
        "deployment_event",
        r,
        None,
        json!({"deployment_id": d, "environment": "production", "status": "succeeded", "deployed_by": "sre-1",
               "deployed_at": now - Duration::hours(2)}),
    )
    .await;
    assert_eq!(result["policy_violation"], true);
    assert!(!seed::eligible(&db.pool, r, "production", None).await);
    assert_ne!(seed::gate_status(&db.pool, r, "G3").await, "bypassed");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.environment_events WHERE event_type = 'policy_violation' AND deployment_id = $1",
            d
        )
        .await,
        1
    );
}

/// A rollback is exempt from the production guard, so it must undo a
/// deployment that went live: naming a failed one would let any deployment
/// of an ineligible release skip the guard by calling itself a rollback.
#[tokio::test]
async fn only_a_deployment_that_succeeded_can_be_rolled_back() {
    let db = TestDb::new().await;
    let r = release(&db).await; // not eligible for production
    let failed = Uuid::new_v4();
    let attempt = deploy(&db, r, failed, "production", "failed").await;
    assert_eq!(attempt["status"], "failed");

    let disguised = json!({"deployment_id": Uuid::new_v4(), "environment": "production", "status": "succeeded",
                           "deployed_by": "sre-2", "rollback_of": failed});
    assert_rejected(
        fails(&db, "deployment_event", r, None, disguised).await,
        409,
        "only a deployment that succeeded can be rolled back",
    );
    let deployments: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.deployments WHERE release_id = $1")
        .bind(r)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(deployments, 1, "the disguised deployment was not recorded");

    // A deployment still in progress may have its `succeeded` on the way:
    // its rollback is retried, not refused.
    let running = Uuid::new_v4();
    deploy(&db, r, running, "production", "in_progress").await;
    let early = json!({"deployment_id": Uuid::new_v4(), "environment": "production", "status": "succeeded",
                       "deployed_by": "sre-2", "rollback_of": running});
    match fails(&db, "deployment_event", r, None, early).await {
        HandlerError::NotYet(message) => assert!(message.contains("is in_progress"), "{message}"),
        other => panic!("expected a retry, got {other:?}"),
    }
}

/// Eligibility is the release's, for its source_ref: a production
/// deployment of other code under the release's name is flagged.
#[tokio::test]
async fn a_production_deployment_of_another_source_ref_is_a_policy_violation() {
    let db = TestDb::new().await;
    let r = eligible_release(&db).await;
    let other_code = json!({"deployment_id": Uuid::new_v4(), "environment": "production", "status": "succeeded",
                            "deployed_by": "sre-1", "source_ref": "f00dfeed"});
    let result = ok(&db, "deployment_event", r, None, other_code).await;
    assert_eq!(result["policy_violation"], json!(true), "{result}");
    let blockers = result["blockers"].as_array().unwrap();
    assert_eq!(blockers.len(), 1, "{result}");
    assert!(
        blockers[0]
            .as_str()
            .unwrap()
            .contains("deploys f00dfeed, not the release's source_ref"),
        "{result}"
    );

    // The release's own code is not flagged.
    let own_code = deploy(&db, r, Uuid::new_v4(), "production", "succeeded").await;
    assert_eq!(own_code["policy_violation"], json!(false), "{own_code}");
}

/// The post-review checks the grant: neither the exception's approver nor
/// the release's initiator may give it.
#[tokio::test]
async fn an_exception_is_not_reviewed_by_its_approver_or_the_initiator() {
    let db = TestDb::new().await;
    let r = release(&db).await; // initiated by dev-1
    let granted = ok(
        &db,
        "exception_granted",
        r,
        None,
        exception_payload("rm-1", seed::now() + Duration::hours(2)),
    )
    .await;
    let exception_id = id_of(&granted["exception_id"]);
    let review = |reviewer: &str| json!({"exception_id": exception_id, "post_review_status": "complete", "reviewer_id": reviewer});
    for (reviewer, why) in [
        ("rm-1", "who approved it"),
        ("dev-1", "who initiated the release"),
    ] {
        assert_rejected(
            fails(&db, "exception_reviewed", r, None, review(reviewer)).await,
            409,
            why,
        );
    }
    let status: String =
        sqlx::query_scalar("SELECT post_review_status::text FROM ops.exceptions WHERE exception_id = $1")
            .bind(exception_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "pending", "no refused review changed it");

    // The database holds the rule for direct writers too.
    for reviewer in ["rm-1", "dev-1"] {
        let direct = sqlx::query(
            "INSERT INTO ops.approvals (release_id, exception_id, approver_id, persona_role, decision, scope,
                                        decided_at, created_by)
             VALUES ($1, $2, $3, 'release_manager', 'approved', 'exception', now(), 'rm')",
        )
        .bind(r)
        .bind(exception_id)
        .bind(reviewer)
        .execute(&db.pool)
        .await;
        assert_eq!(common::sqlstate(direct), "23514", "{reviewer}");
    }
    ok(&db, "exception_reviewed", r, None, review("rm-2")).await;
}

/// Facts dated more than five minutes ahead are refused everywhere, so a
/// wrong clock cannot skew the time to restore or a drill's date.
#[tokio::test]
async fn incident_and_drill_times_in_the_future_are_refused() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let future = seed::now() + Duration::hours(1);
    let incident_id = Uuid::new_v4();
    assert_rejected(
        fails(
            &db,
            "incident_opened",
            r,
            None,
            json!({"incident_id": incident_id, "severity": "sev2", "title": "x", "detected_at": future}),
        )
        .await,
        422,
        "detected_at",
    );
    ok(
        &db,
        "incident_opened",
        r,
        None,
        json!({"incident_id": incident_id, "severity": "sev2", "title": "x"}),
    )
    .await;
    assert_rejected(
        fails(
            &db,
            "incident_resolved",
            r,
            None,
            json!({"incident_id": incident_id, "resolved_at": future}),
        )
        .await,
        422,
        "resolved_at",
    );
    assert_rejected(
        fails(
            &db,
            "recovery_drill",
            r,
            None,
            json!({"environment": "staging", "drill_type": "database_restore", "executed_by": "sre-1",
                   "executed_at": future, "outcome": "succeeded", "restore_validated": true}),
        )
        .await,
        422,
        "executed_at",
    );
}

/// An incident caused by a deployment happened where it was deployed.
#[tokio::test]
async fn an_incident_of_a_deployment_is_filed_in_its_environment() {
    let db = TestDb::new().await;
    let r = release(&db).await;
    let staging = Uuid::new_v4();
    deploy(&db, r, staging, "staging", "succeeded").await;
    let opened = ok(
        &db,
        "incident_opened",
        r,
        None,
        json!({"incident_id": Uuid::new_v4(), "severity": "sev3", "title": "500s", "deployment_id": staging}),
    )
    .await;
    assert_eq!(opened["environment"], "staging");
    assert_rejected(
        fails(
            &db,
            "incident_opened",
            r,
            None,
            json!({"incident_id": Uuid::new_v4(), "severity": "sev3", "title": "500s",
                   "deployment_id": staging, "environment": "production"}),
        )
        .await,
        409,
        "is a staging deployment",
    );
    let unattributed = ok(
        &db,
        "incident_opened",
        r,
        None,
        json!({"incident_id": Uuid::new_v4(), "severity": "sev3", "title": "slow"}),
    )
    .await;
    assert_eq!(unattributed["environment"], "production");
}

/// Each step of a deployment names who reported it, and a release whose
/// gates were judged for another target is not eligible for production.
#[tokio::test]
async fn deployment_steps_name_their_reporter_and_targets_are_kept() {
    let db = TestDb::new().await;
    let r = eligible_release(&db).await;
    let production = Uuid::new_v4();
    deploy(&db, r, production, "production", "succeeded").await; // by sre-1
    ok(
        &db,
        "deployment_event",
        r,
        None,
        json!({"deployment_id": production, "environment": "production", "status": "rolled_back",
               "deployed_by": "sre-bob"}),
    )
    .await;
    let reporters: Vec<(String, String)> = sqlx::query_as(
        "SELECT payload ->> 'deployed_by', payload ->> 'actor' FROM ops.environment_events
         WHERE deployment_id = $1 ORDER BY created_at",
    )
    .bind(production)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        reporters,
        [
            ("sre-1".to_owned(), "sre-1".to_owned()),
            ("sre-1".to_owned(), "sre-bob".to_owned())
        ]
    );

    let staging_only = Uuid::new_v4();
    ok(
        &db,
        "release_created",
        staging_only,
        None,
        json!({"project": "acme/odoo", "release_name": "staging-only", "environment_target": "staging",
               "source_ref": SHA, "initiating_actor": "dev-1"}),
    )
    .await;
    let result = deploy(&db, staging_only, Uuid::new_v4(), "production", "succeeded").await;
    assert_eq!(result["policy_violation"], json!(true), "{result}");
    assert!(
        result["blockers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b.as_str().unwrap().contains("the release targets staging")),
        "{result}"
    );
}

// --- errors ----------------------------------------------------------------

/// An error quotes at most 100 characters of the value it refuses (it travels
/// into replies, the ledger and dead-letter headers): a SHA-256, an approver
/// who initiated the release, an idempotency key reused for another payload.
#[tokio::test]
async fn refused_values_are_quoted_at_most_100_characters() {
    let db = TestDb::new().await;
    let long = "a".repeat(300);
    let cut = format!("\"{}\"… (300 bytes)", "a".repeat(100));

    let r = release(&db).await;
    assert_rejected(
        fails(
            &db,
            "evidence_attached",
            r,
            None,
            json!({"artifact_type": "test_result", "artifact_url": "https://ci/tests", "sha256": long}),
        )
        .await,
        400,
        &format!("sha256 {cut} is not a SHA-256"),
    );

    let initiated = Uuid::new_v4();
    let mut created = release_payload("acme/odoo", "quoted", SHA);
    created["initiating_actor"] = json!(long);
    ok(&db, "release_created", initiated, None, created).await;
    assert_rejected(
        fails(
            &db,
            "exception_granted",
            initiated,
            None,
            exception_payload(&long, seed::now() + Duration::hours(4)),
        )
        .await,
        409,
        &format!("separation of duties: approver_id {cut} initiated release"),
    );

    let mut first = envelope(
        "evidence_attached",
        r,
        None,
        json!({"artifact_type": "test_result", "artifact_url": "https://ci/one"}),
    );
    first.idempotency_key = long.clone();
    assert_eq!(ingest_once(&db, &first).await.status, Status::Accepted);
    let mut reused = first.clone();
    reused
        .payload
        .insert("artifact_url".to_owned(), json!("https://ci/two"));
    let outcome = ingest_once(&db, &reused).await;
    assert_eq!(
        (outcome.status, outcome.code),
        (Status::Rejected, 422),
        "{outcome:?}"
    );
    let error = outcome.error.unwrap_or_default();
    let needle = format!("idempotency key {cut} was already accepted for a different payload");
    assert!(error.contains(&needle), "{needle:?} not in {error:?}");
}
