//! The event types that tests/worker.rs does not send through the real queue
//! (exception_granted, exception_reviewed, environment_event, incident_opened,
//! incident_resolved, recovery_drill, and a deployment's rollback), each in a
//! realistic sequence and applied by the real worker, whose connections run
//! as the restricted role `opsgate_worker`: its grants and row-level security
//! meet every write here, which tests/handlers.rs (run as the superuser)
//! never shows. Results are read back with the test's own superuser pool.

mod common;

use chrono::{DateTime, Duration as Span, SecondsFormat, SubsecRound, Utc};
use common::worker::*;
use common::*;
use serde_json::{Value, json};
use uuid::Uuid;

/// The initiating actor of `release_created`.
const INITIATOR: &str = "dev-1";

/// A worker on its own database and namespace, with the worker's connections
/// set to the restricted role (the default, checked so that the tests below
/// cannot silently run as the superuser).
async fn running() -> (TestDb, Producer, RunningWorker) {
    let db = TestDb::new().await;
    let settings = settings_for(&db, &[]);
    assert_eq!(settings.worker.database_role, "opsgate_worker");
    let producer = Producer::new(&settings).await;
    let worker = start_worker(&settings);
    (db, producer, worker)
}

async fn finish(producer: Producer, worker: RunningWorker) {
    worker.stop().await;
    producer.finish().await;
}

/// Sends `envelope`, expects `accepted` (200) and returns the result.
async fn accept(producer: &Producer, envelope: &Value) -> Value {
    let (reply, _) = producer.request(envelope).await;
    assert_eq!(reply["status"], "accepted", "{envelope}\n-> {reply}");
    assert_eq!(reply["code"], 200, "{reply}");
    assert_eq!(reply["idempotency_key"], envelope["idempotency_key"], "{reply}");
    assert!(reply["error"].is_null(), "{reply}");
    reply["result"].clone()
}

/// Sends `envelope`, expects `rejected` with `code` and returns the error;
/// the ledger holds the rejection and no accepted row for the key.
async fn reject(db: &TestDb, producer: &Producer, envelope: &Value, code: i64) -> String {
    let (reply, _) = producer.request(envelope).await;
    assert_eq!(reply["status"], "rejected", "{envelope}\n-> {reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert!(reply["result"].is_null(), "{reply}");
    assert_eq!(
        ledger(&db.pool, &key_of(envelope)).await,
        vec![("rejected".to_owned(), code as i16)],
        "{reply}"
    );
    reply["error"].as_str().expect("an error text").to_owned()
}

/// Whole seconds, so that what is sent, stored and returned compare equal.
fn at(offset: Span) -> DateTime<Utc> {
    (Utc::now() + offset).trunc_subsecs(0)
}

fn text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A timestamp of a result.
fn time_of(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().unwrap_or_else(|| panic!("a timestamp: {value}")))
        .unwrap_or_else(|error| panic!("{value}: {error}"))
        .with_timezone(&Utc)
}

fn uuid_of(value: &Value) -> Uuid {
    value
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("a UUID: {value}"))
}

/// An envelope from `source` (stored as the rows' created_by/source_system).
fn from(source: &str, mut envelope: Value) -> Value {
    envelope["source_system"] = json!(source);
    envelope
}

fn deployment(release: Uuid, id: Uuid, environment: &str, status: &str) -> Value {
    envelope(
        "deployment_event",
        release,
        None,
        json!({"deployment_id": id, "environment": environment, "status": status, "deployed_by": "ci"}),
    )
}

/// A staging deployment of `release` that succeeded.
async fn deployed_to_staging(producer: &Producer, release: Uuid) -> Uuid {
    let id = Uuid::new_v4();
    for status in ["in_progress", "succeeded"] {
        let result = accept(producer, &deployment(release, id, "staging", status)).await;
        assert_eq!(result["status"], status);
    }
    id
}

/// A release of the worker's making (release_created through the queue).
async fn created(producer: &Producer, name: &str) -> Uuid {
    let release = fresh_release();
    let result = accept(producer, &release_created(release, name)).await;
    assert_eq!(result["release_id"], json!(release));
    release
}

async fn gate_status(db: &TestDb, release: Uuid, gate: &str) -> (String, Option<Uuid>) {
    sqlx::query_as(
        "SELECT status::text, exception_id FROM ops.release_gates
         WHERE release_id = $1 AND gate_code = $2::ops.ops_gate_code",
    )
    .bind(release)
    .bind(gate)
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// The change log's entries of a row: (changes, changed_by), in order.
async fn changes(db: &TestDb, table: &str, key: Uuid) -> Vec<(Value, String)> {
    sqlx::query_as(
        "SELECT changes, changed_by FROM ops.change_log WHERE table_name = $1 AND row_key = $2 ORDER BY change_id",
    )
    .bind(table)
    .bind(key.to_string())
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

async fn count(db: &TestDb, query: &'static str, id: Uuid) -> i64 {
    sqlx::query_scalar(query)
        .bind(id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

// --- Exceptions -----------------------------------------------------------

fn exception_granted(release: Uuid, approver: &str, gates: &[&str], expires_at: DateTime<Utc>) -> Value {
    from(
        "n8n",
        envelope(
            "exception_granted",
            release,
            None,
            json!({
                "exception_type": "gate_bypass",
                "impacted_gates": gates,
                "reason": "Security fix must ship before the CAB meets.",
                "risk_statement": "Rollback plan is reviewed after the deployment.",
                "approver_id": approver,
                "effective_from": text(at(Span::minutes(-1))),
                "expires_at": text(expires_at),
                "compensating_controls": {"monitoring": "error-rate alert at 1%", "on_call": "sre-team"},
            }),
        ),
    )
}

fn exception_reviewed(release: Uuid, exception: Uuid, reviewer: &str) -> Value {
    from(
        "n8n",
        envelope(
            "exception_reviewed",
            release,
            None,
            json!({
                "exception_id": exception,
                "post_review_status": "complete",
                "reviewer_id": reviewer,
                "persona_role": "sre",
                "rationale_text": "Rollback plan attached afterwards.",
            }),
        ),
    )
}

/// An exception granted by a release manager other than the initiator
/// bypasses G1-G3, so the production deployment is eligible; a third person
/// then reviews it. Every write is the worker role's.
#[tokio::test]
async fn an_exception_is_granted_then_reviewed_through_the_queue() {
    let (db, producer, worker) = running().await;
    let release = created(&producer, "v2026.03.1").await;

    // Granted by rm-erin (not the initiator dev-1); the list is deduplicated and sorted.
    let expires_at = at(Span::days(2));
    let grant = exception_granted(release, "rm-erin", &["G3", "G1", "G2", "G3"], expires_at);
    let granted = accept(&producer, &grant).await;
    let exception = Uuid::new_v5(&Uuid::NAMESPACE_OID, key_of(&grant).as_bytes());
    assert_eq!(granted["exception_id"], json!(exception), "{granted}");
    assert_eq!(granted["impacted_gates"], json!(["G1", "G2", "G3"]));
    assert_eq!(
        time_of(&granted["effective_from"]),
        time_of(&grant["payload"]["effective_from"])
    );
    assert_eq!(time_of(&granted["expires_at"]), expires_at);
    assert_eq!(
        granted["gate_statuses"],
        json!({"G1": "bypassed", "G2": "bypassed", "G3": "bypassed"})
    );

    type ExceptionRow = (
        Uuid,
        String,
        Vec<String>,
        String,
        String,
        String,
        DateTime<Utc>,
        DateTime<Utc>,
        Value,
        String,
        String,
    );
    let row: ExceptionRow = sqlx::query_as(
        "SELECT release_id, exception_type, impacted_gates::text[], reason, risk_statement, approver_id,
                effective_from, expires_at, compensating_controls, post_review_status::text, created_by
         FROM ops.exceptions WHERE exception_id = $1",
    )
    .bind(exception)
    .fetch_one(&db.pool)
    .await
    .expect("the exception is stored under the id derived from its key");
    assert_eq!(
        row,
        (
            release,
            "gate_bypass".to_owned(),
            vec!["G1".to_owned(), "G2".to_owned(), "G3".to_owned()],
            "Security fix must ship before the CAB meets.".to_owned(),
            "Rollback plan is reviewed after the deployment.".to_owned(),
            "rm-erin".to_owned(),
            time_of(&grant["payload"]["effective_from"]),
            expires_at,
            json!({"monitoring": "error-rate alert at 1%", "on_call": "sre-team"}),
            "pending".to_owned(),
            "n8n".to_owned(),
        )
    );
    for gate in ["G1", "G2", "G3"] {
        assert_eq!(
            gate_status(&db, release, gate).await,
            ("bypassed".to_owned(), Some(exception)),
            "{gate}"
        );
    }
    assert_eq!(
        gate_status(&db, release, "G4").await,
        ("pending".to_owned(), None)
    );

    // With staging first (linear promotion), the bypass makes production
    // eligible: no policy violation.
    deployed_to_staging(&producer, release).await;
    let production = Uuid::new_v4();
    let deployed = accept(
        &producer,
        &deployment(release, production, "production", "succeeded"),
    )
    .await;
    assert_eq!(deployed["policy_violation"], false, "{deployed}");
    assert_eq!(deployed["blockers"], json!([]));
    assert_eq!(deployed["release_status"], "promoted");

    // Reviewed by a third person, sre-carol.
    let review = exception_reviewed(release, exception, "sre-carol");
    let reviewed = accept(&producer, &review).await;
    assert_eq!(reviewed["exception_id"], json!(exception));
    assert_eq!(reviewed["post_review_status"], "complete");
    let approval = uuid_of(&reviewed["approval_id"]);

    let status: String =
        sqlx::query_scalar("SELECT post_review_status::text FROM ops.exceptions WHERE exception_id = $1")
            .bind(exception)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "complete");
    type ApprovalRow = (
        Uuid,
        Option<Uuid>,
        Option<Uuid>,
        String,
        String,
        String,
        String,
        Value,
        Option<String>,
        String,
    );
    let row: ApprovalRow = sqlx::query_as(
        "SELECT release_id, exception_id, gate_id, approver_id, persona_role::text, decision::text, scope::text,
                rationale_structured, rationale_text, created_by
         FROM ops.approvals WHERE approval_id = $1",
    )
    .bind(approval)
    .fetch_one(&db.pool)
    .await
    .expect("the review's approval is stored");
    assert_eq!(
        row,
        (
            release,
            Some(exception),
            None,
            "sre-carol".to_owned(),
            "sre".to_owned(),
            "approved".to_owned(),
            "exception".to_owned(),
            json!({"post_review_status": "complete"}),
            Some("Rollback plan attached afterwards.".to_owned()),
            "n8n".to_owned(),
        )
    );
    // The review's update was the worker role's.
    assert_eq!(
        changes(&db, "exceptions", exception).await,
        [(
            json!({"post_review_status": {"from": "pending", "to": "complete"}}),
            "opsgate_worker".to_owned()
        )]
    );
    finish(producer, worker).await;
}

/// Separation of duties on an exception and its review, and an expiry in
/// the past, are refused through the queue with the documented codes, and
/// nothing is written.
#[tokio::test]
async fn exception_refusals_come_back_through_the_queue() {
    let (db, producer, worker) = running().await;
    let release = created(&producer, "v2026.03.2").await;

    let by_initiator = exception_granted(release, INITIATOR, &["G3"], at(Span::days(1)));
    let error = reject(&db, &producer, &by_initiator, 409).await;
    assert!(error.contains("separation of duties"), "{error}");
    let expired = exception_granted(release, "rm-erin", &["G3"], at(Span::hours(-1)));
    let error = reject(&db, &producer, &expired, 422).await;
    assert!(
        error.contains("expires_at") && error.contains("not in the future"),
        "{error}"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.exceptions WHERE release_id = $1",
            release
        )
        .await,
        0,
        "no exception was written"
    );

    let grant = exception_granted(release, "rm-erin", &["G3"], at(Span::days(1)));
    let exception = uuid_of(&accept(&producer, &grant).await["exception_id"]);
    for (reviewer, why) in [
        ("rm-erin", "who approved it"),
        (INITIATOR, "who initiated the release"),
    ] {
        let error = reject(
            &db,
            &producer,
            &exception_reviewed(release, exception, reviewer),
            409,
        )
        .await;
        assert!(
            error.contains(why) && error.contains("separation of duties"),
            "{error}"
        );
    }
    let status: String =
        sqlx::query_scalar("SELECT post_review_status::text FROM ops.exceptions WHERE exception_id = $1")
            .bind(exception)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(status, "pending", "the refused reviews changed nothing");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.approvals WHERE exception_id = $1",
            exception
        )
        .await,
        0
    );
    finish(producer, worker).await;
}

// --- Environment events ---------------------------------------------------

fn maintenance_window(release: Uuid, deployment: Uuid) -> Value {
    from(
        "n8n",
        envelope(
            "environment_event",
            release,
            None,
            json!({
                "environment": "staging",
                "event_type": "maintenance_window",
                "payload": {"starts_at": "2026-11-24T22:00:00Z", "ends_at": "2026-11-24T23:00:00Z"},
                "deployment_id": deployment,
            }),
        ),
    )
}

/// A producer's environment event about a deployment is logged as given.
#[tokio::test]
async fn an_environment_event_is_logged_through_the_queue() {
    let (db, producer, worker) = running().await;
    let release = created(&producer, "v2026.03.3").await;
    let staging = deployed_to_staging(&producer, release).await;

    let event = maintenance_window(release, staging);
    let result = accept(&producer, &event).await;
    let event_id = uuid_of(&result["event_id"]);
    assert_eq!(result["environment"], "staging");
    assert_eq!(result["event_type"], "maintenance_window");
    assert_eq!(result["deployment_id"], json!(staging));

    type EventRow = (
        String,
        String,
        String,
        Option<Uuid>,
        Option<Uuid>,
        Value,
        String,
        String,
    );
    let row: EventRow = sqlx::query_as(
        "SELECT environment::text, event_type, source_system, release_id, deployment_id, payload,
                idempotency_key, created_by
         FROM ops.environment_events WHERE event_id = $1",
    )
    .bind(event_id)
    .fetch_one(&db.pool)
    .await
    .expect("the environment event is stored");
    assert_eq!(
        row,
        (
            "staging".to_owned(),
            "maintenance_window".to_owned(),
            "n8n".to_owned(),
            Some(release),
            Some(staging),
            json!({"starts_at": "2026-11-24T22:00:00Z", "ends_at": "2026-11-24T23:00:00Z"}),
            key_of(&event),
            "n8n".to_owned(),
        )
    );
    // Besides the deployment's own deploy_start and deploy_complete.
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.environment_events WHERE release_id = $1",
            release
        )
        .await,
        3
    );
    finish(producer, worker).await;
}

/// An environment event naming another release's deployment is a 409, and
/// one in an unknown environment a 400; neither is logged.
#[tokio::test]
async fn environment_event_refusals_come_back_through_the_queue() {
    let (db, producer, worker) = running().await;
    let release = created(&producer, "v2026.03.4").await;
    let other = created(&producer, "v2026.03.5").await;
    let others_deployment = deployed_to_staging(&producer, other).await;

    let error = reject(
        &db,
        &producer,
        &maintenance_window(release, others_deployment),
        409,
    )
    .await;
    assert!(error.contains("belongs to release"), "{error}");
    let mut nowhere = maintenance_window(release, others_deployment);
    nowhere["payload"]["environment"] = json!("qa");
    reject(&db, &producer, &nowhere, 400).await;
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.environment_events WHERE release_id = $1",
            release
        )
        .await,
        0
    );
    finish(producer, worker).await;
}

// --- Incidents ------------------------------------------------------------

fn incident_opened(release: Uuid, incident: Uuid, deployment: Uuid, detected_at: DateTime<Utc>) -> Value {
    from(
        "monitoring",
        envelope(
            "incident_opened",
            release,
            None,
            json!({
                "incident_id": incident,
                "severity": "sev2",
                "title": "Checkout latency above SLO",
                "deployment_id": deployment,
                "detected_at": text(detected_at),
                "timeline": [{"at": text(detected_at), "note": "alert fired"}],
            }),
        ),
    )
}

fn incident_resolved(release: Uuid, incident: Uuid, fields: Value) -> Value {
    let mut payload = json!({"incident_id": incident});
    payload
        .as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    from(
        "monitoring",
        envelope("incident_resolved", release, None, payload),
    )
}

type IncidentRow = (
    Option<Uuid>,
    Option<Uuid>,
    String,
    String,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Value,
    Option<String>,
    String,
    String,
);

async fn incident_row(db: &TestDb, incident: Uuid) -> Option<IncidentRow> {
    sqlx::query_as(
        "SELECT release_id, deployment_id, environment::text, severity::text, title, detected_at, resolved_at,
                timeline, root_cause, postmortem_status::text, created_by
         FROM ops.incidents WHERE incident_id = $1",
    )
    .bind(incident)
    .fetch_optional(&db.pool)
    .await
    .unwrap()
}

/// An incident caused by a deployment is opened, resolved, and its
/// postmortem completed by a later resolution event.
#[tokio::test]
async fn an_incident_is_opened_resolved_and_its_postmortem_completed_through_the_queue() {
    let (db, producer, worker) = running().await;
    let release = created(&producer, "v2026.03.6").await;
    let staging = deployed_to_staging(&producer, release).await;

    let incident = Uuid::new_v4();
    let detected_at = at(Span::minutes(-10));
    let opened = accept(
        &producer,
        &incident_opened(release, incident, staging, detected_at),
    )
    .await;
    assert_eq!(
        (
            &opened["incident_id"],
            &opened["severity"],
            &opened["environment"],
            &opened["deployment_id"]
        ),
        (
            &json!(incident),
            &json!("sev2"),
            &json!("staging"),
            &json!(staging)
        ),
        "the environment is the deployment's: {opened}"
    );
    assert_eq!(time_of(&opened["detected_at"]), detected_at);
    let timeline = json!([{"at": text(detected_at), "note": "alert fired"}]);
    let mut expected: IncidentRow = (
        Some(release),
        Some(staging),
        "staging".to_owned(),
        "sev2".to_owned(),
        "Checkout latency above SLO".to_owned(),
        detected_at,
        None,
        timeline,
        None,
        "pending".to_owned(),
        "monitoring".to_owned(),
    );
    assert_eq!(incident_row(&db, incident).await, Some(expected.clone()));

    // Restored 9 minutes after detection; the postmortem is under way.
    let resolved_at = detected_at + Span::minutes(9);
    let resolution = incident_resolved(
        release,
        incident,
        json!({"resolved_at": text(resolved_at), "root_cause": "Missing index on stock_move",
               "postmortem_status": "in_progress"}),
    );
    let resolved = accept(&producer, &resolution).await;
    assert_eq!(resolved["incident_id"], json!(incident));
    assert_eq!(time_of(&resolved["detected_at"]), detected_at);
    assert_eq!(time_of(&resolved["resolved_at"]), resolved_at);
    assert_eq!(resolved["time_to_restore_seconds"], 540);
    assert_eq!(resolved["postmortem_status"], "in_progress");
    expected.6 = Some(resolved_at);
    expected.8 = Some("Missing index on stock_move".to_owned());
    expected.9 = "in_progress".to_owned();
    assert_eq!(incident_row(&db, incident).await, Some(expected.clone()));

    // The postmortem is done: resolved_at and root_cause are kept.
    let postmortem = incident_resolved(release, incident, json!({"postmortem_status": "complete"}));
    let done = accept(&producer, &postmortem).await;
    assert_eq!(time_of(&done["resolved_at"]), resolved_at);
    assert_eq!(done["time_to_restore_seconds"], 540);
    assert_eq!(done["postmortem_status"], "complete");
    expected.9 = "complete".to_owned();
    assert_eq!(incident_row(&db, incident).await, Some(expected));

    // Both updates were the worker role's.
    let log = changes(&db, "incidents", incident).await;
    assert_eq!(log.len(), 2, "{log:?}");
    assert!(log.iter().all(|(_, by)| by == "opsgate_worker"), "{log:?}");
    assert_eq!(
        log[1].0,
        json!({"postmortem_status": {"from": "in_progress", "to": "complete"}})
    );
    finish(producer, worker).await;
}

/// An incident in another environment than its deployment's (409), a
/// resolution before detection (422) and a resolution that moves resolved_at
/// (409) are refused through the queue and change nothing.
#[tokio::test]
async fn incident_refusals_come_back_through_the_queue() {
    let (db, producer, worker) = running().await;
    let release = created(&producer, "v2026.03.7").await;
    let staging = deployed_to_staging(&producer, release).await;
    let detected_at = at(Span::minutes(-10));

    let elsewhere = Uuid::new_v4();
    let mut in_production = incident_opened(release, elsewhere, staging, detected_at);
    in_production["payload"]["environment"] = json!("production");
    let error = reject(&db, &producer, &in_production, 409).await;
    assert!(error.contains("staging deployment"), "{error}");
    assert_eq!(incident_row(&db, elsewhere).await, None);

    let incident = Uuid::new_v4();
    accept(
        &producer,
        &incident_opened(release, incident, staging, detected_at),
    )
    .await;
    let too_early = json!({"resolved_at": text(detected_at - Span::minutes(1))});
    let error = reject(
        &db,
        &producer,
        &incident_resolved(release, incident, too_early),
        422,
    )
    .await;
    assert!(error.contains("before the incident's detected_at"), "{error}");
    let stored = incident_row(&db, incident).await.expect("the incident");
    assert_eq!((stored.6, stored.9.as_str()), (None, "pending"));

    let resolved_at = detected_at + Span::minutes(5);
    let first = json!({"resolved_at": text(resolved_at)});
    accept(&producer, &incident_resolved(release, incident, first)).await;
    let moved = json!({"resolved_at": text(resolved_at + Span::minutes(1)), "postmortem_status": "complete"});
    let error = reject(&db, &producer, &incident_resolved(release, incident, moved), 409).await;
    assert!(error.contains("resolved_at cannot move"), "{error}");
    let stored = incident_row(&db, incident).await.expect("the incident");
    assert_eq!((stored.6, stored.9.as_str()), (Some(resolved_at), "pending"));
    finish(producer, worker).await;
}

// --- Recovery drills ------------------------------------------------------

const DRILL_REPORT: &str = "https://drive.example.com/acme/drills/2026-11-restore.md";
const DRILL_SHA256: &str = "3a7bd3e2360a3d29eea436fcfb7e44c735d117c42d1c1835420b6b9942dd4f1b";

fn recovery_drill(release: Uuid, executed_at: DateTime<Utc>) -> Value {
    from(
        "n8n",
        envelope(
            "recovery_drill",
            release,
            None,
            json!({
                "environment": "staging",
                "drill_type": "database_restore",
                "executed_by": "sre-frank",
                "executed_at": text(executed_at),
                "outcome": "succeeded",
                "restore_validated": true,
                "evidence_url": DRILL_REPORT,
                "evidence_sha256": DRILL_SHA256,
                "metadata": {"rto_minutes": 18},
            }),
        ),
    )
}

/// A restore drill with its report: the drill and its `restore_drill`
/// evidence of the release.
#[tokio::test]
async fn a_recovery_drill_is_recorded_with_its_evidence_through_the_queue() {
    let (db, producer, worker) = running().await;
    let release = created(&producer, "v2026.03.8").await;

    let executed_at = at(Span::minutes(-30));
    let drill = recovery_drill(release, executed_at);
    let result = accept(&producer, &drill).await;
    let drill_id = Uuid::new_v5(&Uuid::NAMESPACE_OID, key_of(&drill).as_bytes());
    assert_eq!(result["drill_id"], json!(drill_id), "{result}");
    assert_eq!(result["outcome"], "succeeded");
    assert_eq!(result["restore_validated"], true);
    let artifact = uuid_of(&result["evidence_artifact_id"]);

    type DrillRow = (
        String,
        String,
        String,
        DateTime<Utc>,
        String,
        bool,
        Option<Uuid>,
        Value,
        String,
    );
    let row: DrillRow = sqlx::query_as(
        "SELECT environment::text, drill_type, executed_by, executed_at, outcome::text, restore_validated,
                evidence_artifact_id, metadata, created_by
         FROM ops.recovery_drills WHERE drill_id = $1",
    )
    .bind(drill_id)
    .fetch_one(&db.pool)
    .await
    .expect("the drill is stored under the id derived from its key");
    assert_eq!(
        row,
        (
            "staging".to_owned(),
            "database_restore".to_owned(),
            "sre-frank".to_owned(),
            executed_at,
            "succeeded".to_owned(),
            true,
            Some(artifact),
            json!({"rto_minutes": 18, "release_id": release}),
            "n8n".to_owned(),
        )
    );
    type ArtifactRow = (
        Option<Uuid>,
        Option<String>,
        String,
        String,
        String,
        Option<String>,
        Value,
        String,
    );
    let row: ArtifactRow = sqlx::query_as(
        "SELECT release_id, environment::text, artifact_type::text, source_system, artifact_url, sha256::text,
                metadata, created_by
         FROM ops.evidence_artifacts WHERE artifact_id = $1",
    )
    .bind(artifact)
    .fetch_one(&db.pool)
    .await
    .expect("the drill's evidence is stored");
    assert_eq!(
        row,
        (
            Some(release),
            Some("staging".to_owned()),
            "restore_drill".to_owned(),
            "n8n".to_owned(),
            DRILL_REPORT.to_owned(),
            Some(DRILL_SHA256.to_owned()),
            json!({"drill_id": drill_id, "drill_type": "database_restore", "outcome": "succeeded",
                   "restore_validated": true}),
            "n8n".to_owned(),
        )
    );
    finish(producer, worker).await;
}

/// A drill id already recorded is a 409, a hash without a report a 400;
/// neither writes a drill or evidence.
#[tokio::test]
async fn recovery_drill_refusals_come_back_through_the_queue() {
    let (db, producer, worker) = running().await;
    let release = created(&producer, "v2026.03.9").await;
    let drill_id = Uuid::new_v4();

    let mut first = recovery_drill(release, at(Span::minutes(-30)));
    first["payload"]["drill_id"] = json!(drill_id);
    accept(&producer, &first).await;
    let mut again = recovery_drill(release, at(Span::minutes(-20)));
    again["payload"]["drill_id"] = json!(drill_id);
    let error = reject(&db, &producer, &again, 409).await;
    assert!(error.contains("already exists"), "{error}");

    let mut without_report = recovery_drill(release, at(Span::minutes(-10)));
    without_report["payload"]
        .as_object_mut()
        .unwrap()
        .remove("evidence_url");
    let error = reject(&db, &producer, &without_report, 400).await;
    assert!(error.contains("evidence_sha256"), "{error}");

    let drills: i64 = sqlx::query_scalar("SELECT count(*) FROM ops.recovery_drills")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(drills, 1, "only the first drill");
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM ops.evidence_artifacts WHERE release_id = $1 AND artifact_type = 'restore_drill'",
            release
        )
        .await,
        1,
        "only the first drill's evidence"
    );
    finish(producer, worker).await;
}

// --- Deployments: what the whole-release test does not send ---------------

/// An ineligible production deployment is recorded with its policy
/// violation; it is rolled back by a new deployment (rollback_of) and then
/// marked rolled_back itself; a failed deployment cannot be rolled back.
#[tokio::test]
async fn a_production_deployment_is_flagged_and_rolled_back_through_the_queue() {
    let (db, producer, worker) = running().await;
    let release = created(&producer, "v2026.03.10").await;

    let production = Uuid::new_v4();
    let deployed = accept(
        &producer,
        &deployment(release, production, "production", "succeeded"),
    )
    .await;
    assert_eq!(deployed["policy_violation"], true, "{deployed}");
    assert!(!deployed["blockers"].as_array().unwrap().is_empty(), "{deployed}");
    assert_eq!(deployed["release_status"], "promoted");
    let violations: Vec<(String, String)> = sqlx::query_as(
        "SELECT idempotency_key, created_by FROM ops.environment_events
         WHERE release_id = $1 AND event_type = 'policy_violation'",
    )
    .bind(release)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        violations,
        [(
            format!("opsgate/policy_violation/{production}"),
            "opsgate".to_owned()
        )]
    );

    let rollback = Uuid::new_v4();
    let mut back = deployment(release, rollback, "production", "succeeded");
    back["payload"]["rollback_of"] = json!(production);
    let rolled = accept(&producer, &back).await;
    assert_eq!(rolled["rollback_of"], json!(production));
    assert_eq!(rolled["policy_violation"], false, "a rollback is not guarded");
    assert_eq!(rolled["release_status"], "rolled_back");

    let marked = accept(
        &producer,
        &deployment(release, production, "production", "rolled_back"),
    )
    .await;
    assert_eq!(
        (&marked["status"], &marked["previous_status"]),
        (&json!("rolled_back"), &json!("succeeded"))
    );
    let stored: Vec<(Uuid, String, Option<Uuid>)> = sqlx::query_as(
        "SELECT deployment_id, status::text, rollback_of FROM ops.deployments
         WHERE release_id = $1 ORDER BY deployed_at, created_at",
    )
    .bind(release)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        stored,
        [
            (production, "rolled_back".to_owned(), None),
            (rollback, "succeeded".to_owned(), Some(production)),
        ]
    );
    let triggers: i64 = count(
        &db,
        "SELECT count(*) FROM ops.environment_events WHERE release_id = $1 AND event_type = 'rollback_trigger'",
        release,
    )
    .await;
    assert_eq!(triggers, 2);
    // The status update was the worker role's.
    let log = changes(&db, "deployments", production).await;
    let status_changes: Vec<(&Value, &str)> = log
        .iter()
        .filter(|(change, _)| change.get("status").is_some())
        .map(|(change, by)| (&change["status"], by.as_str()))
        .collect();
    assert_eq!(
        status_changes,
        [(
            &json!({"from": "succeeded", "to": "rolled_back"}),
            "opsgate_worker"
        )],
        "{log:?}"
    );

    // A failed staging deployment cannot be rolled back (409).
    let failed = Uuid::new_v4();
    for status in ["in_progress", "failed"] {
        accept(&producer, &deployment(release, failed, "staging", status)).await;
    }
    let mut undo = deployment(release, Uuid::new_v4(), "staging", "succeeded");
    undo["payload"]["rollback_of"] = json!(failed);
    let error = reject(&db, &producer, &undo, 409).await;
    assert!(error.contains("only a deployment that succeeded"), "{error}");
    finish(producer, worker).await;
}
