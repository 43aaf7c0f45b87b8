//! What both benchmarks need from the database server.

use sqlx::PgPool;

/// A maintenance database of the server the benchmarks use (the tests' one).
pub fn server_url() -> String {
    std::env::var("OPSGATE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// Disables the triggers that re-derive gate and release state after every
/// fact, in the benchmark's own database: a diagnostic of what the rest
/// costs, never a way to run opsgate.
pub async fn disable_derivation(pool: &PgPool) {
    sqlx::raw_sql(
        "ALTER TABLE ops.gate_checks DISABLE TRIGGER gate_checks_refresh;
         ALTER TABLE ops.approvals DISABLE TRIGGER approvals_refresh;
         ALTER TABLE ops.evidence_artifacts DISABLE TRIGGER evidence_artifacts_refresh;
         ALTER TABLE ops.exceptions DISABLE TRIGGER exceptions_refresh;
         ALTER TABLE ops.deployments DISABLE TRIGGER deployments_refresh;",
    )
    .execute(pool)
    .await
    .expect("disable the derivation triggers");
}

/// Drops a benchmark database, whoever is still connected to it.
pub async fn drop_database(name: &str) -> Result<(), sqlx::Error> {
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&server_url()).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await?;
    Ok(())
}
