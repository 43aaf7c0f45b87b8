//! A TCP proxy in front of the real RabbitMQ that misbehaves on purpose, for
//! faults the broker itself cannot be asked for without disturbing the other
//! tests: connections cut soon after they are made or when the test says,
//! and a broker that stops answering when a client opens a channel.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What the proxy does to each connection.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Forwards both ways, and closes both sides this long after accepting.
    CutAfter(Duration),
    /// As `CutAfter`, with the n-th connection's own duration (from 0; the
    /// last one for every connection after).
    CutAfterEach(Vec<Duration>),
    /// Forwards both ways until [`AmqpProxy::cut`].
    CutOnDemand,
    /// Forwards everything until the client's `n`-th `channel.open` (from 1),
    /// then holds back all the client sends: that channel never opens, as
    /// with a broker that hangs mid-setup.
    StallAtChannelOpen(usize),
}

/// What happens to one connection.
#[derive(Debug, Clone, Copy)]
enum Action {
    CutAfter(Duration),
    CutOnDemand,
    StallAtChannelOpen(usize),
}

impl Fault {
    fn action_for(&self, nth: usize) -> Action {
        match self {
            Fault::CutAfter(after) => Action::CutAfter(*after),
            Fault::CutAfterEach(durations) => {
                let last = durations.len().saturating_sub(1);
                Action::CutAfter(durations.get(nth.min(last)).copied().unwrap_or_default())
            }
            Fault::CutOnDemand => Action::CutOnDemand,
            Fault::StallAtChannelOpen(n) => Action::StallAtChannelOpen(*n),
        }
    }
}

pub struct AmqpProxy {
    pub port: u16,
    /// When each connection was accepted.
    accepted: Arc<Mutex<Vec<Instant>>>,
    /// Notified when a connection starts holding back (`StallAtChannelOpen`).
    pub stalled: Arc<Notify>,
    /// Cuts every open connection (`CutOnDemand`).
    cut: Arc<Notify>,
    task: JoinHandle<()>,
}

impl AmqpProxy {
    pub async fn start(fault: Fault) -> AmqpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let upstream = broker_address();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stalled = Arc::new(Notify::new());
        let cut = Arc::new(Notify::new());
        let task = {
            let accepted = accepted.clone();
            let stalled = stalled.clone();
            let cut = cut.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let nth = {
                        let mut accepted = accepted.lock().unwrap();
                        accepted.push(Instant::now());
                        accepted.len() - 1
                    };
                    let action = fault.action_for(nth);
                    tokio::spawn(serve(
                        client,
                        upstream.clone(),
                        action,
                        stalled.clone(),
                        cut.clone(),
                    ));
                }
            })
        };
        AmqpProxy {
            port,
            accepted,
            stalled,
            cut,
            task,
        }
    }

    /// The test broker's URL (`OPSGATE_TEST_AMQP_URL` or the local one),
    /// through the proxy.
    pub fn url(&self) -> String {
        super::worker::amqp_url().replacen(&broker_address(), &format!("127.0.0.1:{}", self.port), 1)
    }

    pub fn accepted(&self) -> Vec<Instant> {
        self.accepted.lock().unwrap().clone()
    }

    /// Cuts the connections open now (`CutOnDemand`).
    pub fn cut(&self) {
        self.cut.notify_waiters();
    }
}

impl Drop for AmqpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `host:port` of the test broker's URL.
fn broker_address() -> String {
    let url = super::worker::amqp_url();
    let after_scheme = url.split_once("://").map_or(url.as_str(), |(_, rest)| rest);
    let authority = after_scheme.split('/').next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    }
}

async fn serve(client: TcpStream, upstream: String, action: Action, stalled: Arc<Notify>, cut: Arc<Notify>) {
    let Ok(broker) = TcpStream::connect(upstream.as_str()).await else {
        return;
    };
    // Dropping both streams closes them: the client sees its connection
    // reset, as when the broker goes away.
    match action {
        Action::CutAfter(after) => {
            let (mut client, mut broker) = (client, broker);
            let _ =
                tokio::time::timeout(after, tokio::io::copy_bidirectional(&mut client, &mut broker)).await;
        }
        Action::CutOnDemand => {
            let (mut client, mut broker) = (client, broker);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut broker) => {}
                () = cut.notified() => {}
            }
        }
        Action::StallAtChannelOpen(n) => {
            let (client_read, mut client_write) = client.into_split();
            let (mut broker_read, broker_write) = broker.into_split();
            let upstream = tokio::spawn(forward_until_channel_open(client_read, broker_write, n, stalled));
            let _ = tokio::io::copy(&mut broker_read, &mut client_write).await;
            upstream.abort();
        }
    }
}

/// Copies the protocol header and then whole frames from the client to the
/// broker up to its `n`-th `channel.open`; there it stops forwarding (keeping
/// the connection open) and notifies.
async fn forward_until_channel_open(
    mut client: tokio::net::tcp::OwnedReadHalf,
    mut broker: tokio::net::tcp::OwnedWriteHalf,
    n: usize,
    stalled: Arc<Notify>,
) {
    const METHOD_FRAME: u8 = 1;
    const CHANNEL_OPEN: [u8; 4] = [0, 20, 0, 10]; // class 20, method 10
    let mut opens = 0;
    let mut header = [0u8; 8];
    if client.read_exact(&mut header).await.is_err() || broker.write_all(&header).await.is_err() {
        return;
    }
    loop {
        // type (1), channel (2), size (4), payload, frame end (1)
        let mut head = [0u8; 7];
        if client.read_exact(&mut head).await.is_err() {
            return;
        }
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut rest = vec![0u8; size + 1];
        if client.read_exact(&mut rest).await.is_err() {
            return;
        }
        if head[0] == METHOD_FRAME && rest.starts_with(&CHANNEL_OPEN) {
            opens += 1;
        }
        if opens == n {
            stalled.notify_one();
            // Read and drop whatever else comes, so the client never blocks.
            let mut sink = [0u8; 4096];
            while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {}
            return;
        }
        if broker.write_all(&head).await.is_err() || broker.write_all(&rest).await.is_err() {
            return;
        }
    }
}
