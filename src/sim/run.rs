//! Running policies side by side over one workload, and the report.

use std::time::Duration;

use serde::Serialize;

use crate::daemon::{Agent, AgentConfig, thread_cpu_us};
use crate::repacker::RepackStats;
use crate::sim::baseline::{Baseline, BaselineConfig};
use crate::sim::host::{SimConfig, SimError, SimHost};
use crate::sim::plot::{Recorder, Series};
use crate::sim::workload::Workload;

/// The policies a run compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The real agent over the simulated host.
    Ours,
    /// The classic threshold rule ([`crate::sim::baseline`]).
    Baseline,
    /// Round-robin pins placed once, never moved; balloons never moved.
    Static,
    /// No pins: the ideal work-conserving scheduler.
    Floating,
    /// The real agent with `--consolidate` on.
    Consolidate,
    /// The real agent at `--pin-granularity core` (`simulate --compare-granularities`).
    OursCore,
    /// The real agent at `--pin-granularity llc` (`simulate --compare-granularities`).
    OursLlc,
}

impl Policy {
    pub const ALL: [Policy; 5] =
        [Policy::Ours, Policy::Baseline, Policy::Static, Policy::Floating, Policy::Consolidate];

    pub fn name(self) -> &'static str {
        match self {
            Policy::Ours => "vm-balancer",
            Policy::Baseline => "baseline",
            Policy::Static => "static",
            Policy::Floating => "floating",
            Policy::Consolidate => "vm-balancer-consolidate",
            Policy::OursCore => "vm-balancer-core",
            Policy::OursLlc => "vm-balancer-llc",
        }
    }
}

/// Everything a run needs besides the workload.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub host: SimConfig,
    pub quantum: Duration,
    pub quanta: u64,
    /// The agent's configuration (from the shared flags, built once by [`crate::sim::build`]).
    pub agent: AgentConfig,
    /// The same with consolidation on (the `vm-balancer-consolidate` policy).
    pub consolidate: AgentConfig,
    /// The classic rule's thresholds, from the same flags.
    pub baseline: BaselineConfig,
    /// The agent at other pin granularities, run beside the others (`--compare-granularities`).
    pub granularities: Vec<(Policy, AgentConfig)>,
}

/// The figures of one policy.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PolicyReport {
    pub name: String,
    /// Mean of busiest-cpu load / lower bound over quanta where the bound is at least 0.5.
    pub busiest_over_bound_mean: f64,
    pub busiest_over_bound_p99: f64,
    /// The same mean without the first tenth of the run (convergence).
    pub busiest_over_bound_mean_converged: f64,
    /// Core-seconds of unmet vCPU demand.
    pub delay_core_seconds: f64,
    /// Core-seconds of work lost to SMT sharing (cores whose two threads' busy time exceeded
    /// `--smt-yield`).
    pub smt_lost_core_seconds: f64,
    /// Core-seconds vCPUs ran off their guest's home NUMA node.
    pub remote_core_seconds: f64,
    /// Core-seconds of work lost to that (`remote_core_seconds` × `--remote-penalty`).
    pub remote_lost_core_seconds: f64,
    /// Pin changes of already pinned vCPUs per vCPU-hour (initial placements not counted).
    pub repins_per_vcpu_hour: f64,
    /// Pins of floating vCPUs (initial placement).
    pub placements: u64,
    /// Σ reclaimed / Σ reclaimable over quanta.
    pub mem_reclaimed_fraction: f64,
    /// Guest-quanta in which a guest swapped (need above its balloon size).
    pub starvation_events: u64,
    /// The workload's, the same for every policy: core-seconds of vCPU demand above the most
    /// work the online cpus can do (`--smt-yield` for a core with both threads, 1 for one
    /// thread). Work a policy serves beyond that is lost to SMT sharing, work it does not serve
    /// is delay, so no placement has `smt_lost_core_seconds` + `delay_core_seconds` below this.
    pub smt_floor_core_seconds: f64,
    /// Balloon statistics read from the host per guest-hour (each read costs libvirtd a call
    /// to the guest's QEMU; 720 is every guest every 5 s).
    pub balloon_reads_per_guest_hour: f64,
    /// Quanta whose balloon grants left committed host MemAvailable below the reserve.
    pub host_reserve_violations: u64,
    /// Policy CPU time per quantum (this thread, getrusage), µs.
    pub agent_cpu_us_per_quantum: f64,
    /// Mean over quanta of the cpus no vCPU is pinned to (nor floats over), after the policy acted.
    pub free_cpus_mean: f64,
    /// The figures over time, for `--plot` (not in the JSON).
    #[serde(skip)]
    pub series: Series,
    /// vm-balancer only: fraction of quanta in which the capacity advice named a guest to
    /// migrate (the host overloaded for `--overload-window`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice_quanta_fraction: Option<f64>,
    /// vm-balancer only: what the scheduled re-pack and the safeguard did (over several seeds:
    /// the totals).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repack: Option<RepackStats>,
}

/// The whole report of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Per policy; over several seeds, the mean of each figure (host-reserve violations: the
    /// worst seed).
    pub policies: Vec<PolicyReport>,
    /// Over several seeds: each seed's own report.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<SeedReport>,
}

/// One seed's report within a run over several seeds.
#[derive(Debug, Clone, Serialize)]
pub struct SeedReport {
    pub seed: u64,
    pub policies: Vec<PolicyReport>,
}

impl Report {
    /// Combines the reports of several seeds: the mean of each figure per policy, the worst
    /// seed's host-reserve violations; each seed's report is kept in `runs`.
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    pub fn combine(runs: Vec<SeedReport>) -> Report {
        let Some(first) = runs.first() else { return Report { policies: Vec::new(), runs } };
        let n = runs.len() as f64;
        let policies = first
            .policies
            .iter()
            .enumerate()
            .map(|(i, p0)| {
                let all: Vec<&PolicyReport> = runs.iter().filter_map(|r| r.policies.get(i)).collect();
                let m = |f: fn(&PolicyReport) -> f64| all.iter().map(|p| f(p)).sum::<f64>() / n;
                let mu =
                    |f: fn(&PolicyReport) -> u64| (all.iter().map(|p| f(p) as f64).sum::<f64>() / n).round() as u64;
                PolicyReport {
                    name: p0.name.clone(),
                    busiest_over_bound_mean: m(|p| p.busiest_over_bound_mean),
                    busiest_over_bound_p99: m(|p| p.busiest_over_bound_p99),
                    busiest_over_bound_mean_converged: m(|p| p.busiest_over_bound_mean_converged),
                    delay_core_seconds: m(|p| p.delay_core_seconds),
                    smt_lost_core_seconds: m(|p| p.smt_lost_core_seconds),
                    remote_core_seconds: m(|p| p.remote_core_seconds),
                    remote_lost_core_seconds: m(|p| p.remote_lost_core_seconds),
                    repins_per_vcpu_hour: m(|p| p.repins_per_vcpu_hour),
                    placements: mu(|p| p.placements),
                    mem_reclaimed_fraction: m(|p| p.mem_reclaimed_fraction),
                    starvation_events: mu(|p| p.starvation_events),
                    balloon_reads_per_guest_hour: m(|p| p.balloon_reads_per_guest_hour),
                    smt_floor_core_seconds: m(|p| p.smt_floor_core_seconds),
                    host_reserve_violations: all.iter().map(|p| p.host_reserve_violations).max().unwrap_or(0),
                    agent_cpu_us_per_quantum: m(|p| p.agent_cpu_us_per_quantum),
                    free_cpus_mean: m(|p| p.free_cpus_mean),
                    series: Series::mean(&all.iter().map(|p| &p.series).collect::<Vec<_>>()),
                    advice_quanta_fraction: p0
                        .advice_quanta_fraction
                        .map(|_| all.iter().filter_map(|p| p.advice_quanta_fraction).sum::<f64>() / n),
                    repack: p0.repack.map(|_| RepackStats::sum(all.iter().filter_map(|p| p.repack))),
                }
            })
            .collect();
        Report { policies, runs }
    }
}

enum Driver {
    Agent(Box<Agent<SimHost>>),
    Baseline(SimHost, Baseline),
    Plain(SimHost),
}

impl Driver {
    fn host(&mut self) -> &mut SimHost {
        match self {
            Driver::Agent(a) => &mut a.host,
            Driver::Baseline(h, _) | Driver::Plain(h) => h,
        }
    }
    /// One quantum of the policy; true when the agent's capacity advice named a guest.
    fn act(&mut self) -> bool {
        match self {
            Driver::Agent(a) => a.step().capacity.is_some_and(|c| !c.advice.is_empty()),
            Driver::Baseline(h, b) => {
                if let Err(e) = b.step(h) {
                    log::warn!("baseline: {e}");
                }
                false
            }
            Driver::Plain(_) => false,
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[allow(clippy::cast_precision_loss)]
fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() { f64::NAN } else { xs.iter().sum::<f64>() / xs.len() as f64 }
}

/// Online cpus of the simulated host that no vCPU's affinity includes (an offline cpu is not
/// free: nothing can use it).
fn free_cpus(host: &SimHost, counts: &[usize]) -> u64 {
    let pins = counts.iter().enumerate().flat_map(|(g, &n)| (0..n).filter_map(move |v| host.affinity(g, v)));
    let all: Vec<u32> = (0..host.config().cpus).filter(|&c| host.is_online(c)).collect();
    crate::policy::consolidate::free_cpus(&all, pins).len() as u64
}

/// Runs one policy over a fresh copy of `workload`.
pub fn run_policy(policy: Policy, spec: &RunSpec, workload: Workload) -> Result<PolicyReport, SimError> {
    let cfg = match policy {
        Policy::Consolidate => spec.consolidate.clone(),
        _ => {
            spec.granularities.iter().find(|(p, _)| *p == policy).map_or_else(|| spec.agent.clone(), |(_, c)| c.clone())
        }
    };
    run_with(policy, spec, workload, cfg)
}

/// Runs the agent with the given configuration (not the one `spec.agent` holds) over a fresh
/// copy of `workload`: to compare variants of the agent on one workload.
pub fn run_agent(cfg: AgentConfig, spec: &RunSpec, workload: Workload) -> Result<PolicyReport, SimError> {
    run_with(Policy::Ours, spec, workload, cfg)
}

#[allow(clippy::cast_precision_loss)]
fn run_with(
    policy: Policy,
    spec: &RunSpec,
    mut workload: Workload,
    cfg: AgentConfig,
) -> Result<PolicyReport, SimError> {
    let mut host = SimHost::new(spec.host.clone(), workload.specs())?;
    let mut driver = match policy {
        Policy::Ours | Policy::Consolidate | Policy::OursCore | Policy::OursLlc => {
            Driver::Agent(Box::new(Agent::new(host, cfg)))
        }
        Policy::Baseline => {
            host.pin_round_robin();
            Driver::Baseline(host, Baseline::new(spec.baseline.clone()))
        }
        Policy::Static => {
            host.pin_round_robin();
            Driver::Plain(host)
        }
        Policy::Floating => Driver::Plain(host),
    };
    let counts = driver.host().vcpu_counts();
    let total_vcpus: usize = counts.iter().sum();
    let mut demand: Vec<Vec<f64>> = counts.iter().map(|&n| vec![0.0; n]).collect();
    let mut need = vec![0u64; counts.len()];
    let quantum_ns = u64::try_from(spec.quantum.as_nanos()).unwrap_or(u64::MAX);
    let reserve = i64::try_from(spec.host.reserve_kib).unwrap_or(i64::MAX);
    let converged_from = spec.quanta / 10;
    let (mut ratios, mut ratios_conv) = (Vec::new(), Vec::new());
    let (mut delay, mut reclaimed, mut reclaimable) = (0.0f64, 0.0f64, 0.0f64);
    let (mut smt_lost, mut remote, mut remote_lost) = (0.0f64, 0.0f64, 0.0f64);
    let (mut starving, mut violations, mut repins, mut placements, mut cpu_us) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut balloon_reads = 0u64;
    let mut smt_floor = 0.0f64;
    let mut series = Recorder::new(spec.quanta, spec.quantum.as_secs_f64());
    let mut advised = 0u64;
    let mut free_sum = 0u64;
    for q in 0..spec.quanta {
        workload.fill(q, &mut demand, &mut need);
        let host = driver.host();
        for (g, (d, n)) in demand.iter().zip(&need).enumerate() {
            for (v, &x) in d.iter().enumerate() {
                host.set_demand(g, v, x);
            }
            host.set_mem_need(g, *n);
        }
        let capacity = host.work_capacity();
        let s = host.advance(quantum_ns).clone();
        smt_floor += (s.demand - capacity).max(0.0) * s.dt_s;
        delay += s.delay * s.dt_s;
        smt_lost += s.smt_lost * s.dt_s;
        remote += s.remote * s.dt_s;
        remote_lost += s.remote_lost * s.dt_s;
        reclaimed += s.reclaimed_kib as f64;
        reclaimable += s.reclaimable_kib as f64;
        starving += s.swapping_guests as u64;
        let ratio = (s.bound >= 0.5).then(|| s.busiest_load / s.bound);
        if let Some(r) = ratio {
            ratios.push(r);
            if q >= converged_from {
                ratios_conv.push(r);
            }
        }
        series.push(ratio, s.delay, (s.reclaimed_kib as f64, s.reclaimable_kib as f64), s.swapping_guests);
        let t0 = thread_cpu_us();
        advised += u64::from(driver.act());
        cpu_us += thread_cpu_us().saturating_sub(t0);
        let host = driver.host();
        let a = host.take_actions();
        free_sum += free_cpus(host, &counts);
        repins += a.repins;
        placements += a.placements;
        balloon_reads += a.balloon_reads;
        if a.grants_kib > 0 && host.mem_available_committed_kib() < reserve {
            violations += 1;
        }
    }
    let repack = match &driver {
        Driver::Agent(a) if policy == Policy::Ours => Some(a.repack_stats()),
        _ => None,
    };
    let hours = spec.quanta as f64 * spec.quantum.as_secs_f64() / 3600.0;
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(PolicyReport {
        name: policy.name().into(),
        busiest_over_bound_mean: mean(&ratios),
        busiest_over_bound_p99: percentile(&sorted, 0.99),
        busiest_over_bound_mean_converged: mean(&ratios_conv),
        delay_core_seconds: delay,
        smt_lost_core_seconds: smt_lost,
        remote_core_seconds: remote,
        remote_lost_core_seconds: remote_lost,
        repins_per_vcpu_hour: if hours > 0.0 && total_vcpus > 0 {
            repins as f64 / (total_vcpus as f64 * hours)
        } else {
            0.0
        },
        placements,
        mem_reclaimed_fraction: if reclaimable > 0.0 { reclaimed / reclaimable } else { 1.0 },
        starvation_events: starving,
        smt_floor_core_seconds: smt_floor,
        balloon_reads_per_guest_hour: if hours > 0.0 && !counts.is_empty() {
            balloon_reads as f64 / (counts.len() as f64 * hours)
        } else {
            0.0
        },
        host_reserve_violations: violations,
        agent_cpu_us_per_quantum: if spec.quanta > 0 { cpu_us as f64 / spec.quanta as f64 } else { 0.0 },
        free_cpus_mean: free_sum as f64 / spec.quanta.max(1) as f64,
        series: series.finish(),
        advice_quanta_fraction: (policy == Policy::Ours).then(|| advised as f64 / spec.quanta.max(1) as f64),
        repack,
    })
}

/// Runs every policy over identical copies of `workload` on two threads, each taking the next
/// policy not yet run (the agents first: they take longest); reported in `Policy::ALL` order,
/// then the agents at other granularities.
pub fn run_all(spec: &RunSpec, workload: &Workload) -> Result<Report, SimError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    const BY_COST: [Policy; 5] =
        [Policy::Ours, Policy::Consolidate, Policy::Baseline, Policy::Static, Policy::Floating];
    // The agents at other granularities first: they cost as much as ours.
    let extra: Vec<Policy> = spec.granularities.iter().map(|(p, _)| *p).collect();
    let order: Vec<Policy> = extra.iter().copied().chain(BY_COST).collect();
    let next = AtomicUsize::new(0);
    let mut done: Vec<(Policy, Result<PolicyReport, SimError>)> = Vec::new();
    std::thread::scope(|s| {
        let worker = || {
            let mut mine = Vec::new();
            while let Some(&p) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                mine.push((p, run_policy(p, spec, workload.clone())));
            }
            mine
        };
        let handles: Vec<_> = (0..2).map(|_| s.spawn(worker)).collect();
        for h in handles {
            match h.join() {
                Ok(mine) => done.extend(mine),
                Err(_) => done.push((Policy::Ours, Err(SimError::Workload("a policy run panicked".into())))),
            }
        }
    });
    let mut policies = Vec::with_capacity(order.len());
    for p in Policy::ALL.into_iter().chain(extra) {
        let i = done.iter().position(|(q, _)| *q == p);
        match i.map(|i| done.swap_remove(i).1) {
            Some(r) => policies.push(r?),
            None => return Err(SimError::Workload(format!("policy {} did not run", p.name()))),
        }
    }
    Ok(Report { policies, runs: Vec::new() })
}

fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "-".into()
    } else if x.abs() >= 1000.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b.abs() < 1e-12 { if a.abs() < 1e-12 { "=".into() } else { "inf".into() } } else { format!("{:.2}x", a / b) }
}

/// The report as a table: one row per figure, one column per policy, then ours as a ratio to
/// each other policy.
#[allow(clippy::cast_precision_loss)]
pub fn render_table(r: &Report) -> String {
    use std::fmt::Write as _;
    type Row = (&'static str, fn(&PolicyReport) -> f64);
    let rows: [Row; 16] = [
        ("busiest/bound mean", |p| p.busiest_over_bound_mean),
        ("busiest/bound mean converged", |p| p.busiest_over_bound_mean_converged),
        ("busiest/bound p99", |p| p.busiest_over_bound_p99),
        ("vCPU delay (core-s)", |p| p.delay_core_seconds),
        ("SMT lost work (core-s)", |p| p.smt_lost_core_seconds),
        ("SMT + delay floor (core-s)", |p| p.smt_floor_core_seconds),
        ("off home node (core-s)", |p| p.remote_core_seconds),
        ("remote lost work (core-s)", |p| p.remote_lost_core_seconds),
        ("repins per vCPU-hour", |p| p.repins_per_vcpu_hour),
        ("initial placements", |p| p.placements as f64),
        ("memory reclaimed fraction", |p| p.mem_reclaimed_fraction),
        ("starvation (guest-quanta)", |p| p.starvation_events as f64),
        ("balloon reads per guest-hour", |p| p.balloon_reads_per_guest_hour),
        ("host-reserve violations", |p| p.host_reserve_violations as f64),
        ("policy CPU µs/quantum", |p| p.agent_cpu_us_per_quantum),
        ("free cpus mean", |p| p.free_cpus_mean),
    ];
    // Ours against the reference policies; the consolidating agent has a line of its own.
    let variants = [Policy::Ours, Policy::Consolidate, Policy::OursCore, Policy::OursLlc].map(Policy::name);
    let others = || r.policies.iter().filter(|p| !variants.contains(&p.name.as_str()));
    // A column as wide as its policy's name, at least 12.
    let width = |p: &PolicyReport| p.name.chars().count().max(12);
    let mut s = String::new();
    let _ = write!(s, "{:<30}", "figure");
    for p in &r.policies {
        let _ = write!(s, " {:>w$}", p.name, w = width(p));
    }
    let ours = r.policies.iter().find(|p| p.name == Policy::Ours.name());
    for p in others() {
        let _ = write!(s, " {:>12}", format!("ours/{}", p.name.chars().take(5).collect::<String>()));
    }
    s.push('\n');
    for (label, get) in rows {
        let _ = write!(s, "{label:<30}");
        for p in &r.policies {
            let _ = write!(s, " {:>w$}", fmt(get(p)), w = width(p));
        }
        if let Some(o) = ours {
            for p in others() {
                let _ = write!(s, " {:>12}", ratio(get(o), get(p)));
            }
        }
        s.push('\n');
    }
    let cons = r.policies.iter().find(|p| p.name == Policy::Consolidate.name());
    if let (Some(o), Some(c)) = (ours, cons) {
        let _ = writeln!(
            s,
            "\nconsolidation: {} free cpus on average (vm-balancer: {}); delay {} core-s, {:+.3} core-s vs vm-balancer ({}); repins per vCPU-hour {} (vm-balancer: {})",
            fmt(c.free_cpus_mean),
            fmt(o.free_cpus_mean),
            fmt(c.delay_core_seconds),
            c.delay_core_seconds - o.delay_core_seconds,
            ratio(c.delay_core_seconds, o.delay_core_seconds),
            fmt(c.repins_per_vcpu_hour),
            fmt(o.repins_per_vcpu_hour)
        );
    }
    if let Some(f) = ours.and_then(|o| o.advice_quanta_fraction) {
        let _ = writeln!(s, "\nvm-balancer's capacity advice named a guest to migrate in {:.1}% of quanta", f * 100.0);
    }
    if let Some(x) = ours.and_then(|o| o.repack) {
        let over = if r.runs.len() > 1 { format!(" (totals over {} seeds)", r.runs.len()) } else { String::new() };
        let _ = writeln!(
            s,
            "vm-balancer's re-pack{over}: {} scheduled, {} applied ({} pins), {} below --repack-min-gain, {} dropped; safeguard: {} of {} re-packs and {} of {} balancing move sets rolled back ({} pins)",
            x.scheduled,
            x.completed,
            x.repack_pins,
            x.below_gain,
            x.dropped,
            x.repack_rolled_back,
            x.repack_kept + x.repack_rolled_back,
            x.balancing_rolled_back,
            x.balancing_judged,
            x.rollback_pins
        );
    }
    if r.runs.len() > 1 {
        let _ = write!(s, "\nmeans over {} seeds (host-reserve violations: worst seed)\n", r.runs.len());
        for other in [Policy::Baseline, Policy::Static] {
            let _ = write!(s, "delay ours/{} per seed:", other.name());
            for run in &r.runs {
                let get = |p: Policy| run.policies.iter().find(|x| x.name == p.name()).map(|x| x.delay_core_seconds);
                if let (Some(o), Some(b)) = (get(Policy::Ours), get(other)) {
                    let _ = write!(s, " {}:{}", run.seed, ratio(o, b));
                }
            }
            s.push('\n');
        }
        let _ = write!(s, "consolidation per seed (free cpus, delay minus vm-balancer's):");
        for run in &r.runs {
            let get = |p: Policy| run.policies.iter().find(|x| x.name == p.name());
            if let (Some(o), Some(c)) = (get(Policy::Ours), get(Policy::Consolidate)) {
                let _ = write!(
                    s,
                    " {}:{}/{:+.3}",
                    run.seed,
                    fmt(c.free_cpus_mean),
                    c.delay_core_seconds - o.delay_core_seconds
                );
            }
        }
        s.push('\n');
    }
    s
}

/// The JSON document of `--json`.
pub fn render_json(r: &Report) -> String {
    serde_json::to_string_pretty(r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::Host;
    use crate::sim::{GuestSpec, SimConfig};

    #[test]
    fn an_offline_cpu_is_not_counted_free() {
        let g = GuestSpec { name: "a".into(), vcpus: 1, max_kib: 1 << 20, liar: false };
        let mut h = SimHost::new(SimConfig::new(4, 64 << 20, 1 << 20), &[g]).unwrap();
        let d = h.list_domains().unwrap()[0].clone();
        h.pin_vcpu(&d, 0, 0).unwrap();
        assert_eq!(free_cpus(&h, &[1]), 3);
        h.set_cpu_online(3, false);
        assert_eq!(free_cpus(&h, &[1]), 2);
    }
}
