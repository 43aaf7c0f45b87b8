//! Waiting for the signals that ask the process to stop.

/// The exit code of a worker told to stop a second time while it drains
/// (128 + SIGINT, as a shell reports a process that Ctrl-C ended).
pub const STOPPED_AGAIN: u8 = 130;

/// Ctrl-C (SIGINT) and, on Unix, SIGTERM, listened to from the moment this
/// is made: a signal that comes before anyone waits, or between two waits,
/// is kept for the next one, not lost. (Once a handler is installed, the
/// signal no longer ends the process by default: it must not go unheard.)
pub struct StopSignals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    /// Installs the handlers. Must run inside the Tokio runtime.
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            StopSignals {
                interrupt: signal(SignalKind::interrupt()).ok(),
                terminate: signal(SignalKind::terminate()).ok(),
            }
        }
        #[cfg(not(unix))]
        {
            StopSignals {}
        }
    }

    /// Resolves at the next stop signal.
    pub async fn next(&mut self) {
        #[cfg(unix)]
        {
            let interrupt = async {
                match self.interrupt.as_mut() {
                    Some(stream) => stream.recv().await,
                    None => std::future::pending().await,
                }
            };
            let terminate = async {
                match self.terminate.as_mut() {
                    Some(stream) => stream.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = interrupt => tracing::info!("Ctrl-C received, shutting down"),
                _ = terminate => tracing::info!("SIGTERM received, shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            tracing::info!("Ctrl-C received, shutting down");
        }
    }
}
