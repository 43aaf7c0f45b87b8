//! Layered settings: `config/default.toml`, then `config/<stage>.toml` chosen by
//! `ODOO_STAGE`, then environment variables (`OPSGATE__SECTION__KEY`, plus the
//! conventional `DATABASE_URL` and `AMQP_URL`). Everything is validated once, at
//! start, with errors that name the key and the bad value.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// The deployment stage (platform constitution §3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Development,
    Staging,
    Production,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Development => "development",
            Stage::Staging => "staging",
            Stage::Production => "production",
        }
    }
}

impl FromStr for Stage {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "development" => Ok(Stage::Development),
            "staging" => Ok(Stage::Staging),
            "production" => Ok(Stage::Production),
            other => Err(ConfigError::invalid(
                "ODOO_STAGE",
                other,
                "expected development, staging or production",
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid setting {key} = {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    #[error("cannot read settings from {dir}: {source}")]
    Load {
        dir: PathBuf,
        #[source]
        source: config::ConfigError,
    },
}

impl ConfigError {
    fn invalid(key: &str, value: &str, reason: &str) -> Self {
        ConfigError::Invalid {
            key: key.to_owned(),
            value: value.to_owned(),
            reason: reason.to_owned(),
        }
    }
}

/// A connection URL whose password never reaches a log line: `Debug` and
/// `Display` show it redacted; `expose` gives the real one to the driver.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its path (database or vhost) replaced, password kept.
    pub fn with_path(&self, path: &str) -> SecretUrl {
        match url::Url::parse(&self.0) {
            Ok(mut parsed) => {
                parsed.set_path(path);
                SecretUrl(parsed.to_string())
            }
            Err(_) => self.clone(),
        }
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

/// The URL with any password replaced by `***`, in the user info and in the
/// query (`?password=`, `?sslpassword=`, which the PostgreSQL driver
/// honours too); unparsable input is hidden whole.
pub fn redact_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            let secret =
                |key: &str| key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword");
            if parsed.query_pairs().any(|(key, _)| secret(&key)) {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(key, value)| {
                        let value = if secret(&key) {
                            "***".to_owned()
                        } else {
                            value.into_owned()
                        };
                        (key.into_owned(), value)
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable url>".to_owned(),
    }
}

/// Which URLs were given by a layer above `default.toml`: a variable, or
/// the stage file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UrlsGiven {
    pub database: bool,
    pub amqp: bool,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Settings {
    #[serde(skip, default = "default_stage")]
    pub stage: Stage,
    #[serde(skip)]
    pub urls_given: UrlsGiven,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub log: LogSettings,
    pub sweeps: SweepSettings,
    pub retry: RetrySettings,
    pub worker: WorkerSettings,
}

#[derive(Debug, Clone, Deserialize)]
pub struct WorkerSettings {
    /// Messages processed at once by one worker process.
    pub max_in_flight: usize,
    /// Most deliveries applied in one database transaction (those already
    /// received when a slot frees up; a batch never waits to fill).
    pub batch_size: usize,
    /// Batches applied at once, each in one transaction on its own pooled
    /// connection (at most `database.max_connections`).
    pub max_transactions: usize,
    /// How long a batch that is not full waits for more deliveries (0: not
    /// at all).
    pub batch_linger_ms: u64,
    /// Bodies larger than this are rejected with 413.
    pub max_body_bytes: usize,
    /// On SIGTERM, how long in-flight messages may take before the worker exits.
    pub shutdown_timeout_secs: u64,
    /// Upper bound of the wait between attempts while PostgreSQL is unreachable.
    pub database_retry_max_ms: u64,
    /// How long a statement of the worker's sessions waits for a lock (a
    /// release another session holds) before its attempt fails as transient.
    pub lock_timeout_secs: u64,
    /// Apply pending migrations (as the login role) before consuming.
    pub migrate_on_start: bool,
    /// The role the worker's connections `SET ROLE` to (least privilege);
    /// empty to keep the login role.
    pub database_role: String,
}

impl WorkerSettings {
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct RetrySettings {
    /// Delay before each retry of a transient failure; its length is the
    /// number of retries before the message is dead-lettered.
    pub schedule_secs: Vec<u64>,
    /// Each delay is shortened at random by up to this fraction (the retry
    /// queue's TTL is the upper bound), so retries spread out.
    pub jitter: f64,
}

impl RetrySettings {
    pub fn schedule(&self) -> Vec<Duration> {
        self.schedule_secs
            .iter()
            .map(|secs| Duration::from_secs(*secs))
            .collect()
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct SweepSettings {
    /// Whether `opsgate worker` runs the sweeps itself.
    pub enabled: bool,
    pub interval_secs: u64,
}

impl SweepSettings {
    pub fn interval(&self) -> Duration {
        Duration::from_secs(self.interval_secs)
    }
}

fn default_stage() -> Stage {
    Stage::Development
}

#[derive(Debug, Clone, Deserialize)]
pub struct DatabaseSettings {
    pub url: SecretUrl,
    pub max_connections: u32,
    pub acquire_timeout_secs: u64,
}

impl DatabaseSettings {
    pub fn acquire_timeout(&self) -> Duration {
        Duration::from_secs(self.acquire_timeout_secs)
    }

    /// `host:port/database` for messages, without credentials.
    pub fn address(&self) -> String {
        match url::Url::parse(self.url.expose()) {
            Ok(parsed) => format!(
                "{}:{}{}",
                parsed.host_str().unwrap_or("localhost"),
                parsed.port().unwrap_or(5432),
                parsed.path()
            ),
            Err(_) => self.url.to_string(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSettings {
    pub url: SecretUrl,
    pub namespace: String,
    pub prefetch: u16,
    pub delivery_limit: u32,
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    pub confirm_timeout_secs: u64,
    pub connect_timeout_secs: u64,
}

impl AmqpSettings {
    pub fn confirm_timeout(&self) -> Duration {
        Duration::from_secs(self.confirm_timeout_secs)
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// Where the `config/` directory is: `OPSGATE_CONFIG_DIR`, else `./config`.
pub fn default_config_dir(env: &HashMap<String, String>) -> PathBuf {
    env.get("OPSGATE_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("config"))
}

/// Loads settings from the process environment and `config_dir`.
pub fn load(config_dir: &Path) -> Result<Settings, ConfigError> {
    let env: HashMap<String, String> = std::env::vars().collect();
    load_from(config_dir, &env)
}

/// Loads settings from `config_dir` with `env` standing for the environment,
/// so tests can vary it without touching the process's own.
pub fn load_from(config_dir: &Path, env: &HashMap<String, String>) -> Result<Settings, ConfigError> {
    let stage: Stage = env
        .get("ODOO_STAGE")
        .map(|value| value.parse())
        .transpose()?
        .unwrap_or(Stage::Development);

    let load_error = |source| ConfigError::Load {
        dir: config_dir.to_path_buf(),
        source,
    };

    let opsgate_env: config::Map<String, String> = env
        .iter()
        .filter(|(key, _)| key.starts_with("OPSGATE__"))
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();

    let mut builder = config::Config::builder()
        .add_source(config::File::from(config_dir.join("default.toml")).required(true))
        .add_source(config::File::from(config_dir.join(format!("{}.toml", stage.as_str()))).required(false))
        .add_source(
            config::Environment::with_prefix("OPSGATE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("retry.schedule_secs")
                .source(Some(opsgate_env)),
        );

    // The conventional variables apply unless an OPSGATE__ variable says otherwise.
    for (conventional, key, explicit) in [
        ("DATABASE_URL", "database.url", "OPSGATE__DATABASE__URL"),
        ("AMQP_URL", "amqp.url", "OPSGATE__AMQP__URL"),
    ] {
        if let Some(value) = env.get(conventional).filter(|_| !env.contains_key(explicit)) {
            builder = builder.set_override(key, value.as_str()).map_err(load_error)?;
        }
    }

    let mut settings: Settings = builder
        .build()
        .and_then(|raw| raw.try_deserialize())
        .map_err(|source| match source {
            config::ConfigError::Type {
                key: Some(key),
                unexpected,
                expected,
                ..
            } => ConfigError::Invalid {
                key,
                value: unexpected.to_string(),
                reason: format!("expected {expected}"),
            },
            config::ConfigError::NotFound(key) => ConfigError::Invalid {
                key,
                value: String::new(),
                reason: "missing".to_owned(),
            },
            other => load_error(other),
        })?;
    settings.stage = stage;
    settings.validate()?;
    // Which URLs a layer above default.toml gives: a variable, or the stage
    // file (read alone).
    let stage_layer = config::Config::builder()
        .add_source(config::File::from(config_dir.join(format!("{}.toml", stage.as_str()))).required(false))
        .build()
        .map_err(load_error)?;
    let given = |key: &str, explicit: &str, conventional: &str| {
        env.contains_key(explicit) || env.contains_key(conventional) || stage_layer.get_string(key).is_ok()
    };
    settings.urls_given = UrlsGiven {
        database: given("database.url", "OPSGATE__DATABASE__URL", "DATABASE_URL"),
        amqp: given("amqp.url", "OPSGATE__AMQP__URL", "AMQP_URL"),
    };
    Ok(settings)
}

impl Settings {
    /// In production, the URLs a command uses must be given: the defaults of
    /// `default.toml` point at a local development server with well-known
    /// credentials, and a worker that silently used them would look healthy
    /// while recording nothing where it should.
    pub fn require_given_urls(&self, database: bool, amqp: bool) -> Result<(), ConfigError> {
        if self.stage != Stage::Production {
            return Ok(());
        }
        for (needed, given, key, url, variables) in [
            (
                database,
                self.urls_given.database,
                "database.url",
                &self.database.url,
                "OPSGATE__DATABASE__URL or DATABASE_URL",
            ),
            (
                amqp,
                self.urls_given.amqp,
                "amqp.url",
                &self.amqp.url,
                "OPSGATE__AMQP__URL or AMQP_URL",
            ),
        ] {
            if needed && !given {
                return Err(ConfigError::invalid(
                    key,
                    &url.to_string(),
                    &format!(
                        "is the development default of default.toml, which production does not use: \
                         set {variables}, or {key} in config/production.toml"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        check_url("database.url", &self.database.url, &["postgres", "postgresql"])?;
        check_url("amqp.url", &self.amqp.url, &["amqp", "amqps"])?;
        positive(
            "database.max_connections",
            u64::from(self.database.max_connections),
        )?;
        at_most_a_day_secs(
            "database.acquire_timeout_secs",
            self.database.acquire_timeout_secs,
        )?;

        let namespace = &self.amqp.namespace;
        if namespace.trim().is_empty() || namespace.len() > 200 {
            return Err(ConfigError::invalid(
                "amqp.namespace",
                namespace,
                "must be 1 to 200 characters",
            ));
        }
        // RabbitMQ refuses to declare such names (ACCESS_REFUSED), and the
        // worker would reconnect for ever.
        if namespace.starts_with("amq.") || namespace.trim() != namespace {
            return Err(ConfigError::invalid(
                "amqp.namespace",
                namespace,
                "must not start with amq. (reserved by RabbitMQ) nor begin or end with whitespace",
            ));
        }
        positive("amqp.prefetch", u64::from(self.amqp.prefetch))?;
        positive("amqp.delivery_limit", u64::from(self.amqp.delivery_limit))?;
        at_most_a_day_ms("amqp.reconnect_min_ms", self.amqp.reconnect_min_ms)?;
        at_most_a_day_ms("amqp.reconnect_max_ms", self.amqp.reconnect_max_ms)?;
        at_most_a_day_secs("amqp.confirm_timeout_secs", self.amqp.confirm_timeout_secs)?;
        positive("amqp.connect_timeout_secs", self.amqp.connect_timeout_secs)?;
        at_most_a_day_secs("amqp.connect_timeout_secs", self.amqp.connect_timeout_secs)?;
        if self.amqp.reconnect_max_ms < self.amqp.reconnect_min_ms {
            return Err(ConfigError::invalid(
                "amqp.reconnect_max_ms",
                &self.amqp.reconnect_max_ms.to_string(),
                "must be at least amqp.reconnect_min_ms",
            ));
        }

        positive("worker.max_in_flight", self.worker.max_in_flight as u64)?;
        // Deliveries beyond the prefetch never arrive: the slots would stay
        // empty (and the count bounds a semaphore).
        if self.worker.max_in_flight > usize::from(self.amqp.prefetch) {
            return Err(ConfigError::invalid(
                "worker.max_in_flight",
                &self.worker.max_in_flight.to_string(),
                "must not exceed amqp.prefetch",
            ));
        }
        positive("worker.batch_size", self.worker.batch_size as u64)?;
        positive("worker.max_transactions", self.worker.max_transactions as u64)?;
        if self.worker.max_transactions > self.database.max_connections as usize {
            return Err(ConfigError::invalid(
                "worker.max_transactions",
                &self.worker.max_transactions.to_string(),
                "must not exceed database.max_connections",
            ));
        }
        positive("worker.max_body_bytes", self.worker.max_body_bytes as u64)?;
        at_most_a_day_secs("worker.shutdown_timeout_secs", self.worker.shutdown_timeout_secs)?;
        at_most_a_day_ms("worker.database_retry_max_ms", self.worker.database_retry_max_ms)?;
        if self.worker.batch_linger_ms > 1000 {
            return Err(ConfigError::invalid(
                "worker.batch_linger_ms",
                &self.worker.batch_linger_ms.to_string(),
                "must be from 0 to 1000 (milliseconds)",
            ));
        }
        positive("worker.lock_timeout_secs", self.worker.lock_timeout_secs)?;
        at_most_a_day_secs("worker.lock_timeout_secs", self.worker.lock_timeout_secs)?;
        let role = &self.worker.database_role;
        let plain_name = role.len() <= 63
            && role.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && role
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !role.is_empty() && !plain_name {
            return Err(ConfigError::invalid(
                "worker.database_role",
                role,
                "must be a plain role name (lowercase letters, digits, _) or empty",
            ));
        }

        if self.retry.schedule_secs.is_empty()
            || self
                .retry
                .schedule_secs
                .iter()
                .any(|delay| *delay == 0 || *delay > DAY_SECS)
        {
            return Err(ConfigError::invalid(
                "retry.schedule_secs",
                &format!("{:?}", self.retry.schedule_secs),
                "must list at least one delay, each from 1 to 86400 seconds",
            ));
        }
        if !(0.0..1.0).contains(&self.retry.jitter) {
            return Err(ConfigError::invalid(
                "retry.jitter",
                &self.retry.jitter.to_string(),
                "must be at least 0 and below 1",
            ));
        }
        at_most_a_day_secs("sweeps.interval_secs", self.sweeps.interval_secs)?;

        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(ConfigError::invalid(
                "log.level",
                &self.log.level,
                "not a tracing filter such as \"info\" or \"info,sqlx=warn\"",
            ));
        }
        Ok(())
    }
}

fn check_url(key: &str, url: &SecretUrl, schemes: &[&str]) -> Result<(), ConfigError> {
    let parsed = url::Url::parse(url.expose())
        .map_err(|error| ConfigError::invalid(key, &url.to_string(), &format!("not a URL: {error}")))?;
    if !schemes.contains(&parsed.scheme()) {
        return Err(ConfigError::invalid(
            key,
            &url.to_string(),
            &format!("scheme must be one of {}", schemes.join(", ")),
        ));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::invalid(key, &url.to_string(), "no host"));
    }
    Ok(())
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "0", "must be greater than 0"));
    }
    Ok(())
}

/// Durations are bounded: a day is longer than any sensible timeout, delay
/// or interval here, and a value near u64::MAX would overflow the clock
/// arithmetic of every wait (a panic in each message task).
const DAY_SECS: u64 = 86_400;

fn at_most_a_day_secs(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 || value > DAY_SECS {
        return Err(ConfigError::invalid(
            key,
            &value.to_string(),
            "must be from 1 to 86400 (seconds)",
        ));
    }
    Ok(())
}

fn at_most_a_day_ms(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 || value > DAY_SECS * 1000 {
        return Err(ConfigError::invalid(
            key,
            &value.to_string(),
            "must be from 1 to 86400000 (milliseconds)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_and_keeps_the_rest() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@rabbit:5672/%2f"),
            "amqp://guest:***@rabbit:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://postgres@127.0.0.1:5432/opsgate"),
            "postgres://postgres@127.0.0.1:5432/opsgate"
        );
        assert_eq!(redact_url("not a url"), "<unparsable url>");
        assert_eq!(
            redact_url("postgres://app@db.example.com:5432/opsgate?password=hunter2&sslmode=require"),
            "postgres://app@db.example.com:5432/opsgate?password=***&sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://app@db/opsgate?sslpassword=k3y"),
            "postgres://app@db/opsgate?sslpassword=***"
        );
    }

    #[test]
    fn secret_url_debug_never_shows_the_password() {
        let url = SecretUrl::new("postgres://app:hunter2@db/opsgate");
        assert!(!format!("{url:?}").contains("hunter2"));
        assert!(!format!("{url}").contains("hunter2"));
        assert_eq!(url.expose(), "postgres://app:hunter2@db/opsgate");
    }
}
