//! Connections to PostgreSQL and the embedded migrations.

use std::collections::BTreeSet;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::config::DatabaseSettings;

/// The `migrations/` directory, compiled into the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    #[error(
        "cannot reach PostgreSQL at {address}: {reason}. Start it (`docker compose up -d postgres`, \
         or your local server) or point OPSGATE__DATABASE__URL / DATABASE_URL at it"
    )]
    Unreachable { address: String, reason: String },
    #[error("failed to {action} on {address}: {source}")]
    Query {
        action: &'static str,
        address: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("failed to apply migrations to {address}: {source}")]
    Migrate {
        address: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
}

/// True for errors that mean "the server is not there" rather than "it said no".
pub fn is_connection_error(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_) | sqlx::Error::Tls(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed
    )
}

/// The connection failed or the server is going away (SQLSTATE classes 08
/// and 57P): an outage, whatever the statement was.
pub fn is_server_gone(error: &sqlx::Error) -> bool {
    is_connection_error(error)
        || error
            .as_database_error()
            .and_then(|e| e.code())
            .is_some_and(|code| code.starts_with("08") || code.starts_with("57P"))
}

fn classify(settings: &DatabaseSettings, action: &'static str, error: sqlx::Error) -> DatabaseError {
    let address = settings.address();
    if is_connection_error(&error) {
        DatabaseError::Unreachable {
            address,
            reason: error.to_string(),
        }
    } else {
        DatabaseError::Query {
            action,
            address,
            source: error,
        }
    }
}

fn connect_options(settings: &DatabaseSettings) -> Result<PgConnectOptions, DatabaseError> {
    settings
        .url
        .expose()
        .parse::<PgConnectOptions>()
        .map_err(|error| classify(settings, "parse the database URL", error))
}

/// A pool for `settings`, checked with one connection so a wrong address fails here.
pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, DatabaseError> {
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout())
        .connect_with(connect_options(settings)?)
        .await
        .map_err(|error| classify(settings, "connect", error))?;
    Ok(pool)
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub created_database: bool,
    /// `version description` of each migration applied by this run.
    pub applied: Vec<String>,
}

/// Creates the database when missing, then applies pending migrations.
pub async fn migrate(settings: &DatabaseSettings) -> Result<MigrationReport, DatabaseError> {
    let url = settings.url.expose();
    let exists = tokio::time::timeout(settings.acquire_timeout(), Postgres::database_exists(url))
        .await
        .map_err(|_| DatabaseError::Unreachable {
            address: settings.address(),
            reason: "timed out".to_owned(),
        })?
        .map_err(|error| classify(settings, "check that the database exists", error))?;
    if !exists {
        Postgres::create_database(url)
            .await
            .map_err(|error| classify(settings, "create the database", error))?;
    }

    let pool = connect(settings).await?;
    let already: BTreeSet<i64> = applied_versions(&pool)
        .await
        .map_err(|error| classify(settings, "read applied migrations", error))?;
    MIGRATOR
        .run(&pool)
        .await
        .map_err(|source| DatabaseError::Migrate {
            address: settings.address(),
            source,
        })?;
    pool.close().await;

    let applied = MIGRATOR
        .iter()
        .filter(|migration| migration.migration_type.is_up_migration())
        .filter(|migration| !already.contains(&migration.version))
        .map(|migration| format!("{} {}", migration.version, migration.description))
        .collect();
    Ok(MigrationReport {
        created_database: !exists,
        applied,
    })
}

async fn applied_versions(pool: &PgPool) -> Result<BTreeSet<i64>, sqlx::Error> {
    let table_exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !table_exists {
        return Ok(BTreeSet::new());
    }
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await?;
    Ok(versions.into_iter().collect())
}

/// A database error as people read it: for an error the server returned,
/// its message and SQLSTATE, then its detail and hint, each clipped
/// (`duplicate key value violates unique constraint "…" [SQLSTATE 23505]
/// (Key (…)=(…) already exists.)`); for any other, sqlx's own text.
pub fn describe(error: &sqlx::Error) -> String {
    let Some(database) = error.as_database_error() else {
        return error.to_string();
    };
    let mut text = database.message().to_owned();
    if let Some(code) = database.code() {
        text.push_str(&format!(" [SQLSTATE {code}]"));
    }
    if let Some(postgres) = database.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
        // A detail may quote the whole row or value refused.
        if let Some(detail) = postgres.detail() {
            text.push_str(&format!(" ({})", crate::text::clipped(detail, DETAIL_BYTES)));
        }
        if let Some(hint) = postgres.hint() {
            text.push_str(&format!(" hint: {}", crate::text::clipped(hint, DETAIL_BYTES)));
        }
    }
    text
}

/// At most this much of a database error's detail and of its hint.
const DETAIL_BYTES: usize = 300;
