use std::process::ExitCode;

use crate::broker;
use crate::config::Settings;

pub async fn run(settings: &Settings) -> anyhow::Result<ExitCode> {
    let topology = broker::setup(&settings.amqp, settings.retry.schedule()).await?;
    out!(
        "declared exchange {} -> quorum queue {} (delivery limit {}), dead letters {} -> {}",
        topology.exchange,
        topology.ingest_queue,
        topology.delivery_limit,
        topology.dead_letter_exchange,
        topology.dead_queue
    )?;
    for (queue, delay) in topology.retry_queues() {
        out!("declared retry tier {queue} ({delay:?})")?;
    }
    Ok(ExitCode::SUCCESS)
}
