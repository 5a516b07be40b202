//! Cost of the CPU planner's decide step (`input_from` + `plan`) and of a whole simulated
//! quantum (`SimHost` + `Agent::step`) at host sizes from 8 to 512 cpus.
//!
//! Domains have 1 to 8 vCPUs (seeded) with heavy-tailed demand, pinned round-robin, so the
//! planner has real balancing work. Goal: the decide step (`input_from+plan`) at 512 cpus /
//! 1024 domains under 1 ms on one core; `input_from` and `plan` are also measured alone.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use vm_balancer::cli::Common;
use vm_balancer::collect::Collector;
use vm_balancer::daemon::{Agent, AgentConfig};
use vm_balancer::host::Host as _;
use vm_balancer::model::{ModelConfig, Snapshot, Tracker};
use vm_balancer::policy::cpu::{self, CpuPolicy};
use vm_balancer::sim::{GuestSpec, SimConfig, SimHost};

const QUANTUM_NS: u64 = 2_000_000_000;

/// A host of `cpus` cpus with `domains` guests of 1-8 vCPUs, round-robin pinned, demands set.
fn host(cpus: u32, domains: usize, seed: u64) -> SimHost {
    let mut rng = fastrand::Rng::with_seed(seed);
    let specs: Vec<GuestSpec> = (0..domains)
        .map(|i| GuestSpec { name: format!("g{i}"), vcpus: rng.u32(1..=8), max_kib: 1 << 20, liar: false })
        .collect();
    let mem = (specs.len() as u64 + 64) << 20;
    let mut h = SimHost::new(SimConfig::new(cpus, mem, 1 << 20), &specs).expect("sim host");
    h.pin_round_robin();
    let total: u32 = specs.iter().map(|s| s.vcpus).sum();
    let mean = (0.8 * f64::from(cpus) / f64::from(total)).min(0.9);
    for (g, s) in specs.iter().enumerate() {
        for v in 0..s.vcpus as usize {
            h.set_demand(g, v, (-(1.0 - rng.f64()).ln() * mean).min(1.0));
        }
    }
    h
}

/// A snapshot of that host after two samples, through the real collector and model.
fn snapshot(cpus: u32, domains: usize) -> Snapshot {
    let mut h = host(cpus, domains, 7);
    let topo = h.topology().expect("topology");
    let cfg = ModelConfig {
        smoothing_ns: 6_000_000_000,
        peak_ns: 4 * 3_600_000_000_000,
        allowed_cpus: (0..cpus).collect(),
        exclude: vec![],
    };
    let mut tracker = Tracker::new(cfg, topo);
    let mut col = Collector::new();
    let mut snap = None;
    for _ in 0..3 {
        h.advance(QUANTUM_NS);
        let raw = col.sample(&mut h, None).expect("sample");
        snap = tracker.ingest(&raw).or(snap);
    }
    snap.expect("snapshot")
}

/// CPU time (user + system) of the calling thread, µs, from its `schedstat` (exact, where
/// getrusage counts in ticks): unlike wall time, it does not count the time other jobs of a
/// busy machine hold the cpu.
fn thread_cpu_us() -> f64 {
    let text = std::fs::read("/proc/thread-self/schedstat").unwrap_or_default();
    vm_balancer::host::schedstat::parse(&text).map_or(0.0, |(run_ns, _)| run_ns as f64 / 1e3)
}

/// Mean CPU time of `f` over `times` runs, µs.
fn cpu_us_per_run(times: u32, mut f: impl FnMut()) -> f64 {
    let c0 = thread_cpu_us();
    for _ in 0..times {
        f();
    }
    (thread_cpu_us() - c0) / f64::from(times)
}

fn decide(c: &mut Criterion) {
    let pol = CpuPolicy::default();
    let moved = HashMap::new();
    let touched = HashMap::new();
    let mut g = c.benchmark_group("decide");
    g.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    for cpus in [8u32, 64, 256, 512] {
        for domains in [16usize, 256, 1024] {
            let snap = snapshot(cpus, domains);
            let vcpus: usize = snap.domains.iter().map(|d| d.vcpus.len()).sum();
            let id = format!("{cpus}cpus/{domains}doms/{vcpus}vcpus");
            g.bench_with_input(BenchmarkId::new("input_from+plan", &id), &snap, |b, s| {
                b.iter(|| {
                    let input =
                        cpu::input_from(black_box(s), &moved, &touched, &Default::default(), &Default::default(), &pol);
                    black_box(cpu::plan(&input, &pol))
                });
            });
            if cpus == 512 || domains == 1024 {
                g.bench_with_input(BenchmarkId::new("input_from", &id), &snap, |b, s| {
                    b.iter(|| {
                        black_box(cpu::input_from(
                            black_box(s),
                            &moved,
                            &touched,
                            &Default::default(),
                            &Default::default(),
                            &pol,
                        ))
                    });
                });
                let input = cpu::input_from(&snap, &moved, &touched, &Default::default(), &Default::default(), &pol);
                if cpus == 512 && domains == 1024 {
                    let both = cpu_us_per_run(500, || {
                        let i =
                            cpu::input_from(&snap, &moved, &touched, &Default::default(), &Default::default(), &pol);
                        black_box(cpu::plan(&i, &pol));
                    });
                    let alone = cpu_us_per_run(500, || {
                        black_box(cpu::plan(black_box(&input), &pol));
                    });
                    eprintln!("{id}: CPU time per decide step {both:.0} µs (plan alone {alone:.0} µs), mean of 500");
                }
                g.bench_with_input(BenchmarkId::new("plan", &id), &input, |b, i| {
                    b.iter(|| black_box(cpu::plan(black_box(i), &pol)))
                });
            }
        }
    }
    g.finish();
}

fn quantum(c: &mut Criterion) {
    let mut g = c.benchmark_group("sim_quantum");
    g.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for (cpus, domains) in [(64u32, 128usize), (512, 1024)] {
        // The agent as `run` configures it by default, memory balancer included.
        let cfg = AgentConfig::from_flags(&Common::defaults().expect("valid VM_BALANCER_* variables"), false);
        let mut agent = Agent::new(host(cpus, domains, 11), cfg);
        for _ in 0..30 {
            agent.host.advance(QUANTUM_NS);
            agent.step();
        }
        g.bench_function(BenchmarkId::new("advance+Agent::step", format!("{cpus}cpus/{domains}doms")), |b| {
            b.iter(|| {
                agent.host.advance(QUANTUM_NS);
                black_box(agent.step().applied())
            });
        });
    }
    g.finish();
}

criterion_group!(benches, decide, quantum);
criterion_main!(benches);
