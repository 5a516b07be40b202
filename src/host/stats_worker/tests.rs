//! The worker's deadline, its left-behind accounting and its cap, with calls that block until
//! the test lets them go (no libvirt needed).

use std::sync::atomic::AtomicUsize;
use std::sync::{Condvar, Mutex};

use super::*;

/// Calls that wait while the gate is shut, each answering one record named after its worker.
struct Gate {
    shut: Mutex<bool>,
    opened: Condvar,
    spawned: AtomicUsize,
}

impl Gate {
    fn new() -> Arc<Gate> {
        Arc::new(Gate { shut: Mutex::new(false), opened: Condvar::new(), spawned: AtomicUsize::new(0) })
    }
    fn set(&self, shut: bool) {
        *self.shut.lock().unwrap() = shut;
        self.opened.notify_all();
    }
}

fn worker(gate: &Arc<Gate>, goes_on: bool) -> StatsWorker {
    let gate = Arc::clone(gate);
    StatsWorker::with(move || {
        let n = gate.spawned.fetch_add(1, Ordering::SeqCst);
        let gate = Arc::clone(&gate);
        Box::new(move |_ask| {
            let mut shut = gate.shut.lock().unwrap();
            while *shut {
                shut = gate.opened.wait(shut).unwrap();
            }
            (Ok(vec![DomainStats { name: format!("worker{n}"), params: vec![] }]), goes_on)
        })
    })
}

const SOON: Duration = Duration::from_millis(100);

fn names(a: &Answer) -> Vec<String> {
    a.as_ref().map(|v| v.iter().map(|d| d.name.clone()).collect()).unwrap_or_default()
}

/// Waits (a few seconds at most) for the left-behind workers to end.
fn settle(w: &StatsWorker) -> usize {
    for _ in 0..500 {
        if w.left_behind() == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    w.left_behind()
}

#[test]
fn one_worker_answers_every_ask_while_it_keeps_its_connection() {
    let gate = Gate::new();
    let mut w = worker(&gate, true);
    for _ in 0..3 {
        assert_eq!(names(&w.read(Ask::All, STATS_DEADLINE)), ["worker0"]);
    }
    assert_eq!(gate.spawned.load(Ordering::SeqCst), 1);
    // One whose connection failed answers, ends, and the next ask starts another, without
    // an error in between.
    let mut w = worker(&gate, false);
    assert_eq!(names(&w.read(Ask::All, STATS_DEADLINE)), ["worker1"]);
    assert_eq!(names(&w.read(Ask::All, STATS_DEADLINE)), ["worker2"]);
}

#[test]
fn a_late_call_is_left_behind_and_two_of_them_stop_the_asking_until_one_returns() {
    let gate = Gate::new();
    let mut w = worker(&gate, true);
    gate.set(true);
    assert!(matches!(w.read(Ask::All, SOON), Err(StatsError::Late(_))));
    assert!(matches!(w.read(Ask::All, SOON), Err(StatsError::Late(_))));
    assert_eq!(w.left_behind(), 2);
    // A third is not started: the asking stops at once.
    assert!(matches!(w.read(Ask::All, SOON), Err(StatsError::TooManyLeftBehind(2))));
    assert_eq!(gate.spawned.load(Ordering::SeqCst), 2);
    // The frozen guest answers: the left-behind calls return, their answers are dropped, the
    // threads end, and a fresh worker answers.
    gate.set(false);
    assert_eq!(settle(&w), 0, "the left-behind workers ended");
    assert_eq!(names(&w.read(Ask::All, STATS_DEADLINE)), ["worker2"]);
    // A reset lets an idle worker go: it ends at once.
    w.reset();
    assert_eq!(settle(&w), 0);
    assert_eq!(names(&w.read(Ask::All, STATS_DEADLINE)), ["worker3"]);
}
