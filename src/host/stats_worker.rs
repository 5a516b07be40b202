//! Balloon statistics read by a thread of their own, with a deadline.
//!
//! Reading balloon statistics makes libvirtd ask each guest's QEMU over its monitor. `NOWAIT`
//! skips a guest whose monitor another call already holds, but the call that finds a QEMU
//! frozen first (`SIGSTOP`, a storage outage, a debugger) waits for it for as long as it stays
//! frozen, and libvirtd keeps answering the keepalive. Made from the loop, that call stopped the
//! whole agent: on the lab, one guest's QEMU stopped for 60 s stopped every quantum for 60 s,
//! CPU balancing included, and the systemd watchdog would have killed the agent.
//!
//! So the calls are made by a worker thread with a connection of its own, and the loop waits at
//! most [`STATS_DEADLINE`] for the answer. A worker that misses it is left behind: its call
//! keeps the frozen guest's job, its answer is dropped when it comes, and it then ends. The
//! next read starts a fresh worker, whose `NOWAIT` call skips the guest held by the first and
//! reads the others. At most [`MAX_LEFT_BEHIND`] workers may be left behind at once (each is a
//! thread and a connection); past that, reads fail at once until one of them ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::Duration;

use virt::connect::Connect;

use super::DomainRef;
use super::stats::{self, DomainStats};

/// How long the loop waits for balloon statistics: the call for 1,000 guests takes about
/// 0.2 s of libvirtd's time; a call far past this waits for a QEMU that does not answer.
pub const STATS_DEADLINE: Duration = Duration::from_secs(3);

/// Most workers left behind in a call at once.
pub const MAX_LEFT_BEHIND: usize = 2;

/// What a worker is asked for.
#[derive(Debug, Clone)]
pub enum Ask {
    /// Every running domain (`virConnectGetAllDomainStats`).
    All,
    /// These domains (`virDomainListGetStats`); one no longer running under its id is skipped.
    Of(Vec<DomainRef>),
}

/// Why no statistics came.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// No answer within the deadline: the worker is left behind.
    #[error("no answer within {0:?} (a guest's QEMU not answering its monitor?); that call is left behind")]
    Late(Duration),
    /// Too many workers are still in calls that did not return.
    #[error("{0} earlier statistics calls still wait for a guest's QEMU; not asking again until one returns")]
    TooManyLeftBehind(usize),
    /// The worker thread could not be started.
    #[error("cannot start the statistics thread")]
    Spawn(#[source] std::io::Error),
    /// The worker ended without answering (it could not keep its connection).
    #[error("the statistics thread ended without an answer")]
    Ended,
    /// libvirt's error, from opening the worker's connection or from the call.
    #[error("{0}")]
    Libvirt(&'static str, #[source] virt::error::Error),
}

pub type Answer = Result<Vec<DomainStats>, StatsError>;

/// What a worker thread does with each ask: the answer, and whether it goes on after it (its
/// connection still alive).
pub type Serve = Box<dyn FnMut(Ask) -> (Answer, bool) + Send>;

struct Worker {
    ask: Sender<Ask>,
    answer: Receiver<(Answer, bool)>,
    /// Set by the thread when it ends.
    ended: Arc<AtomicBool>,
}

/// The statistics worker of one libvirt host.
pub struct StatsWorker {
    /// Makes what a new worker thread serves asks with.
    make: Box<dyn Fn() -> Serve + Send>,
    worker: Option<Worker>,
    /// The `ended` flags of the workers let go while they may still be in a call.
    left_behind: Vec<Arc<AtomicBool>>,
}

impl StatsWorker {
    /// Workers reading over their own connection to `uri`.
    pub fn libvirt(uri: &str) -> Self {
        let uri = uri.to_string();
        StatsWorker::with(move || libvirt_serve(uri.clone()))
    }

    /// Workers serving asks with what `make` makes (each worker thread its own).
    pub fn with(make: impl Fn() -> Serve + Send + 'static) -> Self {
        StatsWorker { make: Box::new(make), worker: None, left_behind: Vec::new() }
    }

    /// Asks for statistics and waits at most `deadline` for them.
    pub fn read(&mut self, ask: Ask, deadline: Duration) -> Answer {
        self.left_behind.retain(|ended| !ended.load(Ordering::Acquire));
        let worker = match self.worker.take() {
            Some(w) => w,
            None if self.left_behind.len() >= MAX_LEFT_BEHIND => {
                return Err(StatsError::TooManyLeftBehind(self.left_behind.len()));
            }
            None => spawn((self.make)())?,
        };
        if worker.ask.send(ask).is_err() {
            self.let_go(worker);
            return Err(StatsError::Ended);
        }
        match worker.answer.recv_timeout(deadline) {
            Ok((answer, goes_on)) => {
                // A worker whose connection failed ends after answering.
                if goes_on {
                    self.worker = Some(worker);
                } else {
                    self.let_go(worker);
                }
                answer
            }
            Err(RecvTimeoutError::Timeout) => {
                self.let_go(worker);
                Err(StatsError::Late(deadline))
            }
            Err(RecvTimeoutError::Disconnected) => {
                self.let_go(worker);
                Err(StatsError::Ended)
            }
        }
    }

    /// Lets the worker go (the host's connection was lost: a fresh worker opens a fresh one).
    pub fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            self.let_go(w);
        }
    }

    /// Workers let go that are still in a call.
    pub fn left_behind(&self) -> usize {
        self.left_behind.iter().filter(|e| !e.load(Ordering::Acquire)).count()
    }

    /// Drops `w`'s channels (an idle worker ends at once, a busy one when its call returns) and
    /// counts it until it has ended.
    fn let_go(&mut self, w: Worker) {
        self.left_behind.push(Arc::clone(&w.ended));
        drop(w);
    }
}

/// Sets its flag when dropped: when the worker thread ends, whichever way.
struct EndsWith(Arc<AtomicBool>);

impl Drop for EndsWith {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

fn spawn(mut serve: Serve) -> Result<Worker, StatsError> {
    let (ask_tx, ask_rx) = mpsc::channel::<Ask>();
    let (answer_tx, answer_rx) = mpsc::channel::<(Answer, bool)>();
    let ended = Arc::new(AtomicBool::new(false));
    let flag = EndsWith(Arc::clone(&ended));
    std::thread::Builder::new()
        .name("balloon-stats".into())
        .spawn(move || {
            let _flag = flag;
            // Ends when the loop lets it go (the asks' channel closes) or after a last answer.
            for ask in &ask_rx {
                let (answer, goes_on) = serve(ask);
                if answer_tx.send((answer, goes_on)).is_err() || !goes_on {
                    return;
                }
            }
        })
        .map_err(StatsError::Spawn)?;
    Ok(Worker { ask: ask_tx, answer: answer_rx, ended })
}

/// Serving asks over a connection to `uri` of the worker's own, opened at the first ask.
fn libvirt_serve(uri: String) -> Serve {
    let mut conn: Option<Connect> = None;
    Box::new(move |ask| {
        let c = match conn.take() {
            Some(c) => c,
            None => match Connect::open(Some(&uri)) {
                Ok(c) => {
                    super::opener::keep_alive(&c, "the statistics connection");
                    c
                }
                Err(e) => return (Err(StatsError::Libvirt("cannot open the statistics connection", e)), false),
            },
        };
        let answer = call(&c, ask);
        let alive = c.is_alive().unwrap_or(false);
        if alive {
            conn = Some(c);
        }
        (answer, alive)
    })
}

fn call(conn: &Connect, ask: Ask) -> Answer {
    let r = match ask {
        Ask::All => stats::all_domain_stats(conn, stats::groups::BALLOON),
        Ask::Of(doms) => {
            let mut handles = Vec::with_capacity(doms.len());
            for dom in &doms {
                match super::libvirt::find_run(conn, dom) {
                    Ok(Some(d)) => handles.push(d),
                    Ok(None) => log::debug!("no balloon statistics of {}: restarted", dom.name),
                    Err(e) => log::debug!("no balloon statistics of {}: {e}", dom.name),
                }
            }
            if handles.is_empty() {
                return Ok(Vec::new());
            }
            stats::list_domain_stats(&handles, stats::groups::BALLOON)
        }
    };
    r.map_err(|e| StatsError::Libvirt("balloon statistics", e))
}

#[cfg(test)]
mod tests;
