//! Cost of one procfs sampling pass: `schedstat` of 4096 real threads of this process
//! (`/proc/self/task/<tid>/schedstat`), as the agent reads each vCPU thread every quantum.
//! Criterion's throughput line gives threads per second; the per-thread cost is printed too.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vm_balancer::host::procfs;

const THREADS: usize = 4096;

fn sampling(c: &mut Criterion) {
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
    let root = Path::new("/");
    let t0 = Instant::now();
    let ok = tids.iter().filter(|&&t| matches!(procfs::schedstat(root, pid, t), Ok(Some(_)))).count();
    eprintln!(
        "one pass over {} threads ({ok} read): {:.2} µs per thread",
        tids.len(),
        t0.elapsed().as_secs_f64() * 1e6 / tids.len() as f64
    );

    let mut g = c.benchmark_group("sampling");
    g.sample_size(20).measurement_time(Duration::from_secs(5)).throughput(Throughput::Elements(tids.len() as u64));
    g.bench_function(format!("schedstat pass over {} threads", tids.len()), |b| {
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
    g.finish();
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.thread().unpark();
        let _ = h.join();
    }
}

criterion_group!(benches, sampling);
criterion_main!(benches);
