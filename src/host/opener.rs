//! Opening the libvirt connection from a thread of its own, with a deadline.
//!
//! `virConnectOpen` to a libvirtd that is frozen (stopped, deadlocked, swapped out) blocks
//! until it continues. Made from the loop, that stopped every quantum: no watchdog ping, no
//! `READY=1`; systemd killed the agent after 60 s, the restarted agent blocked the same way
//! until its start timed out, and after 5 restarts in 10 minutes the unit stayed failed, also
//! once libvirtd was back. Here the loop waits at most [`OPEN_DEADLINE`]; an open still under
//! way is waited for again at the next try (its connection is taken when it comes), never
//! started twice.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use virt::connect::Connect;

/// How long one try to connect waits for libvirtd.
pub const OPEN_DEADLINE: Duration = Duration::from_secs(5);

/// Why no connection came.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no answer within {0:?} (libvirtd frozen?)")]
    Late(Duration),
    #[error("{0}")]
    Failed(#[source] virt::error::Error),
    #[error("cannot start the connecting thread")]
    Spawn(#[source] std::io::Error),
    #[error("the connecting thread ended without an answer")]
    Ended,
    #[error("the connection opened while waiting is already closed")]
    Dead,
}

/// At most one `virConnectOpen` under way.
#[derive(Default)]
pub struct Opener {
    pending: Option<Receiver<Result<Connect, virt::error::Error>>>,
}

impl Opener {
    /// A connection to `uri`, waiting at most `deadline` (for an open started now or earlier).
    pub fn open(&mut self, uri: &str, deadline: Duration) -> Result<Connect, OpenError> {
        let rx = match self.pending.take() {
            Some(rx) => rx,
            None => {
                let (tx, rx) = mpsc::channel();
                let uri = uri.to_string();
                std::thread::Builder::new()
                    .name("libvirt-open".into())
                    .spawn(move || {
                        // Nobody waits any more (the agent stopped): the connection closes.
                        let _ = tx.send(Connect::open(Some(&uri)));
                    })
                    .map_err(OpenError::Spawn)?;
                rx
            }
        };
        match rx.recv_timeout(deadline) {
            // Opened long ago, it may have died since (libvirtd went down again).
            Ok(Ok(c)) if !c.is_alive().unwrap_or(false) => Err(OpenError::Dead),
            Ok(r) => r.map_err(OpenError::Failed),
            Err(RecvTimeoutError::Timeout) => {
                self.pending = Some(rx);
                Err(OpenError::Late(deadline))
            }
            Err(RecvTimeoutError::Disconnected) => Err(OpenError::Ended),
        }
    }

    /// Whether an open is under way.
    pub fn pending(&self) -> bool {
        self.pending.is_some()
    }
}

/// Turns on the client keepalive of `c` (`what` names the connection in the log): a libvirtd
/// that stops answering closes it in about 20 s. Needs libvirt's event loop running.
pub(super) fn keep_alive(c: &Connect, what: &str) {
    if let Err(e) = c.set_keep_alive(super::libvirt::KEEPALIVE_INTERVAL_S, super::libvirt::KEEPALIVE_COUNT) {
        // The test driver and some transports have no keepalive.
        log::debug!("no keepalive on {what}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_the_test_driver_and_a_bad_uri_fails_with_libvirts_error() {
        let mut o = Opener::default();
        assert!(o.open("test:///default", OPEN_DEADLINE).is_ok());
        assert!(!o.pending());
        let e = o.open("nosuchdriver:///x", OPEN_DEADLINE).expect_err("fails");
        assert!(matches!(e, OpenError::Failed(_)), "{e}");
    }
}
