//! Cost of one procfs sampling pass over 4096 real threads of this process
//! (`/proc/self/task/<tid>/schedstat`), as the agent reads each vCPU thread every quantum:
//! - `warm pass`: the agent's steady state, each file kept open and re-read with `pread`
//!   (`host::schedstat::SchedstatFiles`). Goal: at most 1 µs per thread.
//! - `cold pass`: its first quantum (or a burst of new guests), every file opened and kept.
//! - `open+read+close`: the path read the agent did every quantum before (`procfs::schedstat`).
//! - `affinity`: the other per-thread read of a quantum, `sched_getaffinity`.
//!
//! Criterion's throughput line gives threads per second. Per-thread costs are printed too, in
//! wall time and in the thread's CPU time (steadier on a shared, busy machine).

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use vm_balancer::host::procfs;
use vm_balancer::host::schedstat::SchedstatFiles;

const THREADS: usize = 4096;

/// Starts up to `THREADS` parked threads; returns their tids, the stop flag and the handles.
fn spawn_threads() -> (Vec<u32>, Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::with_capacity(THREADS);
    for _ in 0..THREADS {
        let stop = Arc::clone(&stop);
        let h = std::thread::Builder::new().stack_size(64 << 10).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::park();
            }
        });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                eprintln!("could spawn only {} threads: {e}", handles.len());
                break;
            }
        }
    }
    let pid = std::process::id();
    let mut tids: Vec<u32> = std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&t| t != pid)
        .collect();
    tids.sort_unstable();
    tids.truncate(THREADS);
    (tids, stop, handles)
}

/// CPU time (user + system) of the calling thread, µs, from its `schedstat` (exact, where
/// getrusage counts in ticks): unlike wall time, it does not count the time other jobs of a
/// busy machine hold the cpu.
fn thread_cpu_us() -> f64 {
    let text = std::fs::read("/proc/thread-self/schedstat").unwrap_or_default();
    vm_balancer::host::schedstat::parse(&text).map_or(0.0, |(run_ns, _)| run_ns as f64 / 1e3)
}

/// Runs `pass` `times` times and prints its cost per thread: wall time (median and range of
/// the passes) and CPU time of this thread (the mean: the kernel updates a running thread's
/// count only at ticks and switches, too coarse for one pass).
fn per_thread(what: &str, n: usize, times: usize, mut pass: impl FnMut()) {
    let mut wall = Vec::with_capacity(times);
    let c0 = thread_cpu_us();
    for _ in 0..times {
        let t0 = Instant::now();
        pass();
        wall.push(t0.elapsed().as_secs_f64() * 1e6 / n as f64);
    }
    let cpu = (thread_cpu_us() - c0) / (times * n) as f64;
    wall.sort_by(f64::total_cmp);
    eprintln!(
        "{what}, {times} passes over {n} threads, µs per thread: wall median {:.2} ({:.2}-{:.2}), cpu mean {cpu:.2}",
        wall[times / 2],
        wall[0],
        wall[times - 1]
    );
}

fn sampling(c: &mut Criterion) {
    let (tids, stop, handles) = spawn_threads();
    let pid = std::process::id();
    let root = Path::new("/");
    let n = tids.len();

    // Passes timed one by one, as the agent meets them: the first quantum (cold), the next
    // ones (warm), and the path read of before.
    let mut files = SchedstatFiles::new(root, THREADS);
    let read_all = |files: &mut SchedstatFiles| {
        files.start_pass();
        let ok = tids.iter().filter(|&&t| matches!(files.read(pid, t), Ok(Some(_)))).count();
        assert_eq!(ok, n, "every thread read");
    };
    per_thread("cold pass", n, 10, || read_all(&mut SchedstatFiles::new(root, THREADS)));
    read_all(&mut files);
    per_thread("warm pass", n, 50, || read_all(&mut files));
    per_thread("open+read+close pass", n, 10, || {
        let ok = tids.iter().filter(|&&t| matches!(procfs::schedstat(root, pid, t), Ok(Some(_)))).count();
        assert_eq!(ok, n, "every thread read");
    });

    let mut g = c.benchmark_group("sampling");
    g.sample_size(20).measurement_time(Duration::from_secs(5)).throughput(Throughput::Elements(n as u64));
    g.bench_function(format!("warm pass over {n} threads"), |b| {
        b.iter(|| {
            files.start_pass();
            let mut sum = 0u64;
            for &t in &tids {
                if let Ok(Some((run, wait))) = files.read(pid, black_box(t)) {
                    sum = sum.wrapping_add(run ^ wait);
                }
            }
            black_box(sum)
        });
    });
    drop(files);
    g.bench_function(format!("cold pass over {n} threads"), |b| {
        // The reader is dropped (its files closed) outside the measurement.
        b.iter_batched(
            || SchedstatFiles::new(root, THREADS),
            |mut files| {
                files.start_pass();
                for &t in &tids {
                    black_box(files.read(pid, black_box(t)).ok());
                }
                files
            },
            BatchSize::PerIteration,
        );
    });
    g.bench_function(format!("open+read+close pass over {n} threads"), |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for &t in &tids {
                if let Ok(Some((run, wait))) = procfs::schedstat(root, pid, black_box(t)) {
                    sum = sum.wrapping_add(run ^ wait);
                }
            }
            black_box(sum)
        });
    });
    g.bench_function(format!("affinity pass over {n} threads"), |b| {
        b.iter(|| {
            let mut cpus = 0usize;
            for &t in &tids {
                cpus += procfs::affinity(root, pid, black_box(t)).map_or(0, |s| s.0.len());
            }
            black_box(cpus)
        });
    });
    g.finish();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.thread().unpark();
        let _ = h.join();
    }
}

criterion_group!(benches, sampling);
criterion_main!(benches);
