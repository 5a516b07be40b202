//! Tests of the cached `schedstat` reader against real threads of the test process: files
//! stay open across passes, are closed when their thread exits or is no longer read, and a
//! thread whose tid now names another thread is read afresh.
//!
//! Open files are counted by their targets in `/proc/self/fd` (the threads' own `schedstat`
//! paths), not by the number of fds: tests running in parallel open files of their own.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::*;

#[test]
fn parses_schedstat_lines() {
    assert_eq!(parse(b"7521520270 91560117 3251\n"), Ok((7_521_520_270, 91_560_117)));
    assert_eq!(parse(b"0 0 0"), Ok((0, 0)));
    assert!(parse(b"").is_err());
    assert!(parse(b"12\n").is_err(), "a missing wait time is an error");
    assert!(parse(b"12 x3 4\n").is_err());
    assert!(parse(b"99999999999999999999 1 1\n").is_err(), "out of u64 range");
}

/// A thread that does nothing until told to exit.
struct Idle {
    tid: u32,
    stop: mpsc::Sender<()>,
    handle: JoinHandle<()>,
}

fn spawn_idle() -> Idle {
    let (tid_tx, tid_rx) = mpsc::channel();
    let (stop, stop_rx) = mpsc::channel::<()>();
    let handle = std::thread::spawn(move || {
        // `/proc/thread-self` links to `<pid>/task/<tid>`.
        let link = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
        let tid: u32 = link.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()).expect("a tid");
        tid_tx.send(tid).expect("send tid");
        let _ = stop_rx.recv();
    });
    Idle { tid: tid_rx.recv().expect("the thread's tid"), stop, handle }
}

impl Idle {
    /// Stops the thread and waits until procfs no longer shows it.
    fn exit(self) {
        let _ = self.stop.send(());
        self.handle.join().expect("join");
        let dir = task_dir(Path::new("/"), std::process::id(), self.tid);
        for _ in 0..10_000 {
            if !dir.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("thread {} still in procfs", self.tid);
    }
}

fn schedstat_path(tid: u32) -> PathBuf {
    task_dir(Path::new("/"), std::process::id(), tid).join("schedstat")
}

/// How many of this process's fds are open on `tid`'s `schedstat`.
fn fds_on(tid: u32) -> usize {
    let want = schedstat_path(tid);
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| *target == want)
        .count()
}

fn real() -> SchedstatFiles {
    SchedstatFiles::new(Path::new("/"), 1024)
}

#[test]
fn keeps_each_threads_file_open_across_passes() {
    let threads: Vec<Idle> = (0..6).map(|_| spawn_idle()).collect();
    let pid = std::process::id();
    let mut r = real();
    let mut first = Vec::new();
    r.start_pass();
    for t in &threads {
        first.push(r.read(pid, t.tid).unwrap().expect("a live thread"));
        assert_eq!(fds_on(t.tid), 1);
    }
    assert_eq!(r.open_files(), threads.len());
    for _ in 0..3 {
        r.start_pass();
        for (t, f) in threads.iter().zip(&first) {
            let (run, wait) = r.read(pid, t.tid).unwrap().expect("a live thread");
            assert!(run >= f.0 && wait >= f.1, "cumulative counters never go back");
            assert_eq!(fds_on(t.tid), 1, "the same file is read again, not a new one");
        }
    }
    assert_eq!(r.open_files(), threads.len());
    let tids: Vec<u32> = threads.iter().map(|t| t.tid).collect();
    drop(r);
    assert!(tids.iter().all(|&t| fds_on(t) == 0), "dropping the reader closes its files");
    threads.into_iter().for_each(Idle::exit);
}

#[test]
fn an_exited_thread_reads_as_gone_and_its_file_is_closed() {
    let pid = std::process::id();
    let (a, b) = (spawn_idle(), spawn_idle());
    let mut r = real();
    r.start_pass();
    assert!(r.read(pid, a.tid).unwrap().is_some());
    assert!(r.read(pid, b.tid).unwrap().is_some());
    let (a_tid, b_tid) = (a.tid, b.tid);
    a.exit();
    // Its file is still open (nothing read it since), but reading it now says "gone".
    assert_eq!(fds_on(a_tid), 1);
    r.start_pass();
    assert_eq!(r.read(pid, a_tid).unwrap(), None, "a vanished thread is not an error");
    assert_eq!(fds_on(a_tid), 0, "the exited thread's file is closed at once");
    assert!(r.read(pid, b_tid).unwrap().is_some());
    assert_eq!(r.open_files(), 1);
    b.exit();
}

#[test]
fn files_of_threads_a_pass_did_not_read_are_closed() {
    let pid = std::process::id();
    let threads: Vec<Idle> = (0..8).map(|_| spawn_idle()).collect();
    let mut r = real();
    r.start_pass();
    for t in &threads {
        assert!(r.read(pid, t.tid).unwrap().is_some());
    }
    // Guest churn: half of the threads are no longer sampled (their guest stopped).
    let (kept, dropped) = threads.split_at(4);
    r.start_pass();
    for t in kept {
        assert!(r.read(pid, t.tid).unwrap().is_some());
    }
    assert!(dropped.iter().all(|t| fds_on(t.tid) == 1), "closed only once a whole pass missed them");
    r.start_pass();
    assert_eq!(r.open_files(), kept.len());
    assert!(dropped.iter().all(|t| fds_on(t.tid) == 0));
    assert!(kept.iter().all(|t| fds_on(t.tid) == 1));
    // Nothing read for a whole pass: nothing stays open.
    r.start_pass();
    r.start_pass();
    assert_eq!(r.open_files(), 0);
    assert!(threads.iter().all(|t| fds_on(t.tid) == 0));
    threads.into_iter().for_each(Idle::exit);
}

#[test]
fn a_reused_tid_reads_the_thread_that_has_it_now() {
    // A fake root whose `proc/1/task/2` links to a real thread's directory: re-pointing the
    // link is what a reused tid looks like to the reader (same path, another thread).
    let pid = std::process::id();
    let root = tempfile::tempdir().unwrap();
    let task = root.path().join("proc/1/task");
    std::fs::create_dir_all(&task).unwrap();
    let link = task.join("2");
    let (a, b) = (spawn_idle(), spawn_idle());
    std::os::unix::fs::symlink(task_dir(Path::new("/"), pid, a.tid), &link).unwrap();
    let mut r = SchedstatFiles::new(root.path(), 16);
    r.start_pass();
    assert!(r.read(1, 2).unwrap().is_some());
    assert_eq!(fds_on(a.tid), 1);
    let a_tid = a.tid;
    a.exit();
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(task_dir(Path::new("/"), pid, b.tid), &link).unwrap();
    let direct = || super::super::procfs::schedstat(Path::new("/"), pid, b.tid).unwrap().expect("b lives");
    let before = direct();
    r.start_pass();
    let got = r.read(1, 2).unwrap().expect("the tid names a live thread again");
    let after = direct();
    assert!(before.0 <= got.0 && got.0 <= after.0, "b's run time, not a's: {before:?} {got:?} {after:?}");
    assert_eq!(fds_on(a_tid), 0, "the dead thread's file is closed");
    assert_eq!(fds_on(b.tid), 1, "the new thread's file is kept");
    assert_eq!(r.open_files(), 1);
    b.exit();
}

#[test]
fn beyond_its_capacity_it_reads_without_keeping_files() {
    let pid = std::process::id();
    let threads: Vec<Idle> = (0..4).map(|_| spawn_idle()).collect();
    let mut r = SchedstatFiles::new(Path::new("/"), 2);
    for _ in 0..2 {
        r.start_pass();
        for t in &threads {
            assert!(r.read(pid, t.tid).unwrap().is_some(), "every thread is read");
        }
        assert_eq!(r.open_files(), 2);
    }
    assert_eq!(threads.iter().map(|t| fds_on(t.tid)).sum::<usize>(), 2);
    threads.into_iter().for_each(Idle::exit);
}

#[test]
fn fake_trees_and_bad_files() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("proc/42/task/43");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("schedstat"), "7521520270 91560117 3251\n").unwrap();
    let mut r = SchedstatFiles::new(root.path(), 16);
    r.start_pass();
    assert_eq!(r.read(42, 43).unwrap(), Some((7_521_520_270, 91_560_117)));
    // Rewritten in place, like procfs regenerates it: the open file shows the new text.
    std::fs::write(dir.join("schedstat"), "7521520999 91560117 3252\n").unwrap();
    assert_eq!(r.read(42, 43).unwrap(), Some((7_521_520_999, 91_560_117)));
    assert_eq!(r.read(42, 99).unwrap(), None, "no such thread");
    std::fs::write(dir.join("schedstat"), "garbage\n").unwrap();
    let e = r.read(42, 43).unwrap_err();
    assert!(matches!(e, HostError::Parse { .. }), "{e}");
    assert_eq!(r.open_files(), 0, "a file that does not parse is not kept");
}

#[test]
fn the_budget_leaves_room_under_the_limit() {
    let budget = open_file_budget();
    let (soft, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    assert!(soft >= FD_WANTED.min(hard), "the soft limit is raised as far as the hard one allows");
    assert!(u64::try_from(budget).unwrap() + FD_RESERVE <= soft.max(FD_RESERVE));
}
