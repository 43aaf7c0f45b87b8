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
    // Every trigger of the fact tables that derives, at once or at the end
    // of the transaction (migrations 0002 and 0016).
    sqlx::raw_sql(
        "DO $$
         DECLARE t record;
         BEGIN
             FOR t IN SELECT c.relname, tg.tgname FROM pg_trigger tg JOIN pg_class c ON c.oid = tg.tgrelid
                      WHERE c.relnamespace = 'ops'::regnamespace AND tg.tgname LIKE '%\\_refresh%'
                        AND c.relname IN ('gate_checks', 'approvals', 'evidence_artifacts', 'exceptions', 'deployments')
             LOOP
                 EXECUTE format('ALTER TABLE ops.%I DISABLE TRIGGER %I', t.relname, t.tgname);
             END LOOP;
         END
         $$",
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
