//! Cost of one procfs sampling pass over 4096 real threads of this process
//! (`/proc/self/task/<tid>/schedstat`), as the agent reads each vCPU thread every quantum:
//! - `warm pass`: the agent's steady state, each file kept open and re-read with `pread`
//!   (`host::schedstat::SchedstatFiles`). Goal: at most 1 µs per thread.
//! - `cold pass`: its first quantum (or a burst of new guests), every file opened and kept.
//! - `open+read+close`: the path read the agent did every quantum before (`procfs::schedstat`).
//! - `affinity`: the other per-thread read of a quantum, `sched_getaffinity`.
//!
//! Criterion's throughput line gives threads per second; per-thread costs are printed too.

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

fn per_thread_us(what: &str, n: usize, t0: Instant) {
    eprintln!("{what} over {n} threads: {:.2} µs per thread", t0.elapsed().as_secs_f64() * 1e6 / n as f64);
}

fn sampling(c: &mut Criterion) {
    let (tids, stop, handles) = spawn_threads();
    let pid = std::process::id();
    let root = Path::new("/");
    let n = tids.len();

    // Single passes, as the agent meets them: the first quantum, then the next ones.
    let mut files = SchedstatFiles::new(root, THREADS);
    let t0 = Instant::now();
    files.start_pass();
    let ok = tids.iter().filter(|&&t| matches!(files.read(pid, t), Ok(Some(_)))).count();
    per_thread_us(&format!("one cold pass ({ok} read)"), n, t0);
    let t0 = Instant::now();
    files.start_pass();
    let ok = tids.iter().filter(|&&t| matches!(files.read(pid, t), Ok(Some(_)))).count();
    per_thread_us(&format!("the next (warm) pass ({ok} read)"), n, t0);

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
