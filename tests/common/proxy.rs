//! A TCP proxy in front of the real RabbitMQ that misbehaves on purpose, for
//! faults the broker itself cannot be asked for without disturbing the other
//! tests: connections cut soon after they are made, and a broker that stops
//! answering once a client opens its first channel.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What the proxy does to each connection.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Forwards both ways, and closes both sides this long after accepting.
    CutAfter(Duration),
    /// Forwards everything until the client's `n`-th `channel.open` (from 1),
    /// then holds back all the client sends: that channel never opens, as
    /// with a broker that hangs mid-setup.
    StallAtChannelOpen(usize),
}

pub struct AmqpProxy {
    pub port: u16,
    /// When each connection was accepted.
    accepted: Arc<Mutex<Vec<Instant>>>,
    /// Notified each time a frame is held back (`StallChannels`).
    pub stalled: Arc<Notify>,
    task: JoinHandle<()>,
}

impl AmqpProxy {
    pub async fn start(fault: Fault) -> AmqpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stalled = Arc::new(Notify::new());
        let task = {
            let accepted = accepted.clone();
            let stalled = stalled.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.lock().unwrap().push(Instant::now());
                    tokio::spawn(serve(client, fault, stalled.clone()));
                }
            })
        };
        AmqpProxy {
            port,
            accepted,
            stalled,
            task,
        }
    }

    /// An AMQP URL through the proxy, with the test broker's credentials.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn accepted(&self) -> Vec<Instant> {
        self.accepted.lock().unwrap().clone()
    }
}

impl Drop for AmqpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(client: TcpStream, fault: Fault, stalled: Arc<Notify>) {
    let Ok(broker) = TcpStream::connect(("127.0.0.1", 5672)).await else {
        return;
    };
    match fault {
        Fault::CutAfter(after) => {
            let (mut client, mut broker) = (client, broker);
            let _ =
                tokio::time::timeout(after, tokio::io::copy_bidirectional(&mut client, &mut broker)).await;
            // Dropping both streams closes them: the client sees its
            // connection reset, as when the broker goes away.
        }
        Fault::StallAtChannelOpen(n) => {
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
