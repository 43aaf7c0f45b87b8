//! Layered settings: files, stage layer, environment overrides, validation.

use std::collections::HashMap;
use std::path::PathBuf;

use opsgate::config::{self, ConfigError, LogFormat, Stage};

fn config_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn defaults_load_for_development() {
    let settings = config::load_from(&config_dir(), &env(&[])).expect("defaults are valid");
    assert_eq!(settings.stage, Stage::Development);
    assert_eq!(settings.log.format, LogFormat::Pretty);
    assert_eq!(
        settings.database.url.expose(),
        "postgres://postgres@127.0.0.1:5432/opsgate"
    );
    assert_eq!(
        settings.amqp.url.expose(),
        "amqp://guest:guest@127.0.0.1:5672/%2f"
    );
    // The defaults the producer contract and the runbook promise.
    assert_eq!(settings.worker.max_body_bytes, 256 * 1024, "413 past 256 KiB");
    assert_eq!(settings.retry.schedule_secs, [1, 5, 30, 120, 600]);
    assert_eq!(settings.amqp.namespace, "ops.events");
    assert_eq!(settings.amqp.delivery_limit, 10);
}

#[test]
fn an_environment_variable_overrides_a_file_value() {
    let settings = config::load_from(
        &config_dir(),
        &env(&[
            ("OPSGATE__DATABASE__MAX_CONNECTIONS", "42"),
            ("OPSGATE__DATABASE__URL", "postgres://app:pw@db.internal:6543/ops"),
        ]),
    )
    .unwrap();
    assert_eq!(settings.database.max_connections, 42);
    assert_eq!(
        settings.database.url.expose(),
        "postgres://app:pw@db.internal:6543/ops"
    );
}

#[test]
fn conventional_urls_are_honoured_below_opsgate_variables() {
    let settings = config::load_from(
        &config_dir(),
        &env(&[
            ("DATABASE_URL", "postgres://conventional@db:5432/ops"),
            ("AMQP_URL", "amqp://u:p@mq:5672/%2f"),
        ]),
    )
    .unwrap();
    assert_eq!(
        settings.database.url.expose(),
        "postgres://conventional@db:5432/ops"
    );
    assert_eq!(settings.amqp.url.expose(), "amqp://u:p@mq:5672/%2f");

    let settings = config::load_from(
        &config_dir(),
        &env(&[
            ("DATABASE_URL", "postgres://conventional@db:5432/ops"),
            ("OPSGATE__DATABASE__URL", "postgres://explicit@db:5432/ops"),
        ]),
    )
    .unwrap();
    assert_eq!(settings.database.url.expose(), "postgres://explicit@db:5432/ops");
}

#[test]
fn odoo_stage_production_selects_the_production_layer() {
    let settings = config::load_from(
        &config_dir(),
        &env(&[
            ("ODOO_STAGE", "production"),
            ("DATABASE_URL", "postgres://opsgate@db.internal:5432/opsgate"),
            ("AMQP_URL", "amqp://opsgate:s3cret@mq.internal:5672/%2f"),
        ]),
    )
    .unwrap();
    assert_eq!(settings.stage, Stage::Production);
    assert_eq!(settings.log.format, LogFormat::Json);
}

/// The defaults point at a local development server with well-known
/// credentials: in production, the URLs a command uses must be given, by a
/// variable or by the stage file.
#[test]
fn production_needs_the_urls_it_uses_given() {
    let amqp_only = config::load_from(
        &config_dir(),
        &env(&[
            ("ODOO_STAGE", "production"),
            ("AMQP_URL", "amqp://opsgate:s3cret@mq.internal:5672/%2f"),
        ]),
    )
    .unwrap();
    // A publish needs only RabbitMQ.
    amqp_only.require_given_urls(false, true).unwrap();
    let error = amqp_only.require_given_urls(true, true).unwrap_err().to_string();
    assert!(error.contains("database.url"), "{error}");
    assert!(error.contains("DATABASE_URL"), "{error}");

    let database_only = config::load_from(
        &config_dir(),
        &env(&[
            ("ODOO_STAGE", "production"),
            ("DATABASE_URL", "postgres://opsgate@db.internal:5432/opsgate"),
        ]),
    )
    .unwrap();
    database_only.require_given_urls(true, false).unwrap();
    let error = database_only
        .require_given_urls(true, true)
        .unwrap_err()
        .to_string();
    assert!(error.contains("amqp.url"), "{error}");
    assert!(
        !error.contains("guest:guest"),
        "the password is redacted: {error}"
    );

    // Given explicitly, even with the default's value, it is the operator's choice.
    let explicit = config::load_from(
        &config_dir(),
        &env(&[
            ("ODOO_STAGE", "production"),
            (
                "OPSGATE__DATABASE__URL",
                "postgres://postgres@127.0.0.1:5432/opsgate",
            ),
            ("OPSGATE__AMQP__URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ]),
    )
    .unwrap();
    explicit.require_given_urls(true, true).unwrap();

    // The stage file may give them too.
    let dir = std::env::temp_dir().join(format!("opsgate-config-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(config_dir().join("default.toml"), dir.join("default.toml")).unwrap();
    std::fs::write(
        dir.join("production.toml"),
        "[database]\nurl = \"postgres://opsgate@db.internal:5432/opsgate\"\n",
    )
    .unwrap();
    let from_file = config::load_from(&dir, &env(&[("ODOO_STAGE", "production")])).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    from_file.require_given_urls(true, false).unwrap();
    assert!(from_file.require_given_urls(false, true).is_err());

    // Outside production the defaults are fine.
    config::load_from(&config_dir(), &env(&[]))
        .unwrap()
        .require_given_urls(true, true)
        .unwrap();
}

#[test]
fn a_bad_value_names_the_key() {
    let error = config::load_from(
        &config_dir(),
        &env(&[("OPSGATE__DATABASE__MAX_CONNECTIONS", "many")]),
    )
    .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("database.max_connections"), "{message}");
    assert!(message.contains("many"), "{message}");

    let error = config::load_from(
        &config_dir(),
        &env(&[("OPSGATE__DATABASE__MAX_CONNECTIONS", "0")]),
    )
    .unwrap_err();
    assert!(matches!(error, ConfigError::Invalid { ref key, .. } if key == "database.max_connections"));

    // More transactions at once than pooled connections would only queue.
    let error = config::load_from(
        &config_dir(),
        &env(&[
            ("OPSGATE__DATABASE__MAX_CONNECTIONS", "4"),
            ("OPSGATE__WORKER__MAX_TRANSACTIONS", "5"),
        ]),
    )
    .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("worker.max_transactions"), "{message}");
    assert!(message.contains("database.max_connections"), "{message}");

    let error = config::load_from(
        &config_dir(),
        &env(&[("OPSGATE__AMQP__URL", "http://u:secret@mq/")]),
    )
    .unwrap_err();
    let message = error.to_string();
    assert!(message.contains("amqp.url"), "{message}");
    assert!(!message.contains("secret"), "the password leaked: {message}");

    let error = config::load_from(&config_dir(), &env(&[("ODOO_STAGE", "prod")])).unwrap_err();
    assert!(error.to_string().contains("ODOO_STAGE"), "{error}");
}

#[test]
fn the_retry_schedule_can_be_overridden_as_a_list() {
    let settings =
        config::load_from(&config_dir(), &env(&[("OPSGATE__RETRY__SCHEDULE_SECS", "1,2,3")])).unwrap();
    assert_eq!(settings.retry.schedule_secs, vec![1, 2, 3]);
    let default = config::load_from(&config_dir(), &env(&[])).unwrap();
    assert_eq!(default.retry.schedule_secs, vec![1, 5, 30, 120, 600]);
}

#[test]
fn every_setting_is_validated_at_start() {
    for (variable, value, key) in [
        ("OPSGATE__WORKER__MAX_IN_FLIGHT", "0", "worker.max_in_flight"),
        ("OPSGATE__SWEEPS__INTERVAL_SECS", "0", "sweeps.interval_secs"),
        (
            "OPSGATE__AMQP__CONFIRM_TIMEOUT_SECS",
            "0",
            "amqp.confirm_timeout_secs",
        ),
        (
            "OPSGATE__AMQP__CONNECT_TIMEOUT_SECS",
            "0",
            "amqp.connect_timeout_secs",
        ),
        ("OPSGATE__AMQP__PREFETCH", "0", "amqp.prefetch"),
        ("OPSGATE__AMQP__NAMESPACE", " ", "amqp.namespace"),
        ("OPSGATE__AMQP__NAMESPACE", "amq.ops", "amqp.namespace"),
        ("OPSGATE__AMQP__NAMESPACE", " ops", "amqp.namespace"),
        // Beyond the default prefetch of 512.
        ("OPSGATE__WORKER__MAX_IN_FLIGHT", "513", "worker.max_in_flight"),
        ("OPSGATE__RETRY__SCHEDULE_SECS", "1,0", "retry.schedule_secs"),
        ("OPSGATE__RETRY__JITTER", "1.5", "retry.jitter"),
        (
            "OPSGATE__WORKER__DATABASE_ROLE",
            "worker\"; DROP",
            "worker.database_role",
        ),
        ("OPSGATE__LOG__LEVEL", "info,=[", "log.level"),
        // Durations beyond a day would overflow the clock arithmetic of waits.
        (
            "OPSGATE__DATABASE__ACQUIRE_TIMEOUT_SECS",
            "18446744073709551615",
            "database.acquire_timeout_secs",
        ),
        (
            "OPSGATE__WORKER__SHUTDOWN_TIMEOUT_SECS",
            "86401",
            "worker.shutdown_timeout_secs",
        ),
        (
            "OPSGATE__WORKER__DATABASE_RETRY_MAX_MS",
            "86400001",
            "worker.database_retry_max_ms",
        ),
        (
            "OPSGATE__WORKER__LOCK_TIMEOUT_SECS",
            "0",
            "worker.lock_timeout_secs",
        ),
        (
            "OPSGATE__WORKER__LOCK_TIMEOUT_SECS",
            "86401",
            "worker.lock_timeout_secs",
        ),
        (
            "OPSGATE__WORKER__BATCH_LINGER_MS",
            "1001",
            "worker.batch_linger_ms",
        ),
        (
            "OPSGATE__AMQP__RECONNECT_MAX_MS",
            "86400001",
            "amqp.reconnect_max_ms",
        ),
        ("OPSGATE__RETRY__SCHEDULE_SECS", "1,86401", "retry.schedule_secs"),
        ("OPSGATE__SWEEPS__INTERVAL_SECS", "86401", "sweeps.interval_secs"),
    ] {
        let error = config::load_from(&config_dir(), &env(&[(variable, value)])).unwrap_err();
        assert!(
            matches!(&error, ConfigError::Invalid { key: k, .. } if k == key),
            "{variable}={value}: {error}"
        );
    }
    let error = config::load_from(
        &config_dir(),
        &env(&[
            ("OPSGATE__AMQP__RECONNECT_MIN_MS", "5000"),
            ("OPSGATE__AMQP__RECONNECT_MAX_MS", "100"),
        ]),
    )
    .unwrap_err();
    assert!(error.to_string().contains("amqp.reconnect_max_ms"), "{error}");
}
