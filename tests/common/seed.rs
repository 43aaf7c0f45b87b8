//! Rows for tests, written with plain SQL the way a person with a role would.
#![allow(dead_code)]

use sqlx::PgPool;
use uuid::Uuid;

pub async fn release(pool: &PgPool, initiator: &str) -> Uuid {
    let name = format!("v{}", Uuid::new_v4().simple());
    release_named(pool, "acme/odoo", &name, initiator, "abc123").await
}

pub async fn release_named(
    pool: &PgPool,
    project: &str,
    name: &str,
    initiator: &str,
    source_ref: &str,
) -> Uuid {
    sqlx::query_scalar(
        "INSERT INTO ops.releases (project, release_name, environment_target, source_ref, initiating_actor, created_by)
         VALUES ($1, $2, 'production', $3, $4, $4) RETURNING release_id",
    )
    .bind(project)
    .bind(name)
    .bind(source_ref)
    .bind(initiator)
    .fetch_one(pool)
    .await
    .expect("insert release")
}

/// The gate row of `code` for `release`, created when missing.
pub async fn gate(pool: &PgPool, release_id: Uuid, code: &str) -> Uuid {
    sqlx::query(
        "INSERT INTO ops.release_gates (release_id, gate_code, created_by)
         VALUES ($1, $2::ops.ops_gate_code, 'test') ON CONFLICT (release_id, gate_code) DO NOTHING",
    )
    .bind(release_id)
    .bind(code)
    .execute(pool)
    .await
    .expect("insert gate");
    sqlx::query_scalar("SELECT gate_id FROM ops.release_gates WHERE release_id = $1 AND gate_code = $2::ops.ops_gate_code")
        .bind(release_id)
        .bind(code)
        .fetch_one(pool)
        .await
        .expect("select gate")
}
