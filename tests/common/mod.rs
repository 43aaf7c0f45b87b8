//! Test harness: every test gets its own freshly migrated database on the
//! real PostgreSQL, dropped again when the test ends.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use opsgate::config::{DatabaseSettings, SecretUrl};
use sqlx::{Connection, PgConnection, PgPool};

/// The server the tests use: `OPSGATE_TEST_DATABASE_URL`, else the local one.
pub fn server_url() -> SecretUrl {
    SecretUrl::new(
        std::env::var("OPSGATE_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned()),
    )
}

/// Settings pointing at a database of this test's own, not yet created.
pub fn fresh_database_settings() -> DatabaseSettings {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let name = format!("opsgate_test_{now}_{}", uuid::Uuid::new_v4().simple());
    DatabaseSettings {
        url: server_url().with_path(&format!("/{name}")),
        max_connections: 5,
        acquire_timeout_secs: 10,
    }
}

pub struct TestDb {
    pub pool: PgPool,
    pub settings: DatabaseSettings,
}

impl TestDb {
    /// A new database with every migration applied.
    pub async fn new() -> TestDb {
        drop_stale_databases().await;
        let settings = fresh_database_settings();
        opsgate::database::migrate(&settings)
            .await
            .expect("migrate the test database");
        let pool = opsgate::database::connect(&settings)
            .await
            .expect("connect to the test database");
        TestDb { pool, settings }
    }

    pub fn name(&self) -> String {
        database_name(&self.settings)
    }
}

pub fn database_name(settings: &DatabaseSettings) -> String {
    url::Url::parse(settings.url.expose())
        .expect("test url")
        .path()
        .trim_start_matches('/')
        .to_owned()
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name();
        // Drop is synchronous; a helper thread with its own runtime does the async work.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
            if let Ok(runtime) = runtime {
                runtime.block_on(drop_database(&name));
            }
        })
        .join();
    }
}

pub async fn drop_database(name: &str) {
    if let Ok(mut conn) = PgConnection::connect(server_url().expose()).await {
        // The name is one of ours (opsgate_test_<digits>_<hex>), never user input.
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut conn)
        .await;
    }
}

/// Databases left behind by aborted runs (older than two hours) are removed.
async fn drop_stale_databases() {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let Ok(mut conn) = PgConnection::connect(server_url().expose()).await else {
            return;
        };
        let cutoff = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            - 7200;
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT datname FROM pg_database WHERE datname ~ '^opsgate_test_[0-9]+_' \
             AND split_part(datname, '_', 3)::bigint < $1",
        )
        .bind(cutoff as i64)
        .fetch_all(&mut conn)
        .await
        .unwrap_or_default();
        for name in names {
            drop_database(&name).await;
        }
    })
    .await;
}

/// The SQLSTATE of a database error, or panics with the unexpected result.
pub fn sqlstate<T: std::fmt::Debug>(result: Result<T, sqlx::Error>) -> String {
    match result {
        Err(sqlx::Error::Database(error)) => error.code().map(|code| code.into_owned()).unwrap_or_default(),
        other => panic!("expected a database error, got {other:?}"),
    }
}

pub const CHECK_VIOLATION: &str = "23514";
pub const NOT_NULL_VIOLATION: &str = "23502";
pub const UNIQUE_VIOLATION: &str = "23505";
pub const FOREIGN_KEY_VIOLATION: &str = "23503";
pub const RESTRICT_VIOLATION: &str = "23001";
pub const INVALID_TEXT_REPRESENTATION: &str = "22P02";

/// Takes the advisory lock the worker takes for a release, as another
/// worker in the middle of a transaction would, until it is freed.
pub async fn hold_release_lock(
    db: &TestDb,
    release: uuid::Uuid,
) -> sqlx::pool::PoolConnection<sqlx::Postgres> {
    let mut holder = db.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock(hashtextextended($1::text, 0))")
        .bind(release)
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// Advisory-lock waits of the test's database not yet granted: a worker
/// waiting for a release another transaction holds.
pub async fn lock_waits(db: &TestDb) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND NOT granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

/// Waits until at least `n` lock waits are seen (workers waiting for a
/// release the test holds), within `timeout`.
pub async fn wait_for_lock_waits(db: &TestDb, n: i64, timeout: std::time::Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let waits = lock_waits(db).await;
        if waits >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{waits} lock waits within {timeout:?}, not {n}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

pub async fn free_release_lock(mut holder: sqlx::pool::PoolConnection<sqlx::Postgres>, release: uuid::Uuid) {
    sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1::text, 0))")
        .bind(release)
        .execute(&mut *holder)
        .await
        .unwrap();
}

pub mod proxy;
pub mod seed;
pub mod worker;
