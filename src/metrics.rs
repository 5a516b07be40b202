//! Prometheus metrics of the daemon loop (`--metrics-listen`): what the agent saw, decided
//! and did, for dashboards and alerts, without reading its log.
//!
//! [`Metrics`] owns a `prometheus-client` [`Registry`] and updates it after each quantum from
//! the [`StepReport`] alone ([`Metrics::observe`]): the planners stay pure, and the same update
//! runs over the simulated host in the tests. Counters count only actions actually applied.
//! Series of objects that are gone (a domain, a vCPU, a cpu taken out of `--cpus`) are
//! removed, so the number of series stays proportional to what runs on the host now.
//! [`server`] serves the registry over HTTP on a thread of its own.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::capacity::CapacityReport;
use crate::daemon::StepReport;
use crate::model::Snapshot;
use crate::policy::mem::{NotGranted, State};
use crate::policy::{Action, PinKind};

pub mod server;

pub use server::MetricsError;

type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VcpuLabels {
    domain: String,
    vcpu: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CpuLabels {
    cpu: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabels {
    domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    domain: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HowLabels {
    how: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// Buckets of the step duration, seconds: a quantum with procfs sampling only takes about a
/// millisecond, one with the bulk balloon call tens of milliseconds, a slow libvirtd seconds.
const STEP_BUCKETS: [f64; 13] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The label sets each per-object family holds now, to remove those of objects that are gone.
#[derive(Debug, Default)]
struct Seen {
    /// vCPUs with rates (usage, delay, demand, peak gauges).
    rated: HashSet<VcpuLabels>,
    /// Each vCPU's delay counter: the domain's runtime id and the cumulative wait seen last, ns.
    waits: HashMap<VcpuLabels, (u32, u64)>,
    cpus: HashSet<CpuLabels>,
    /// Domains with balloon statistics (current and maximum size).
    balloons: HashSet<DomainLabels>,
    /// Domains whose guest reports its usable memory.
    usable: HashSet<DomainLabels>,
    /// Domains with a memory balancer state.
    states: HashSet<String>,
    /// Domains the capacity advice names.
    advised: HashSet<DomainLabels>,
}

/// The agent's metrics and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    /// Shared with the HTTP thread; held while updating so a scrape sees whole quanta.
    registry: Arc<Mutex<Registry>>,
    up: Gauge,
    last_sample: Gauge,
    step_duration: Histogram,
    step_cpu: FloatCounter,
    domains: Gauge,
    blocked: Gauge,
    host_available: Gauge,
    vcpu_usage: Family<VcpuLabels, FloatGauge>,
    vcpu_delay: Family<VcpuLabels, FloatGauge>,
    vcpu_demand: Family<VcpuLabels, FloatGauge>,
    vcpu_peak: Family<VcpuLabels, FloatGauge>,
    vcpu_delay_seconds: Family<VcpuLabels, FloatCounter>,
    cpu_load: Family<CpuLabels, FloatGauge>,
    cpu_busy: Family<CpuLabels, FloatGauge>,
    repins: Family<KindLabels, Counter>,
    balloon_changes: Family<DirectionLabels, Counter>,
    balloon_reads: Family<HowLabels, Counter>,
    balloon_unread: Counter,
    balloon_current: Family<DomainLabels, Gauge>,
    balloon_max: Family<DomainLabels, Gauge>,
    balloon_usable: Family<DomainLabels, Gauge>,
    memory_state: Family<StateLabels, Gauge>,
    grants_refused: Family<ReasonLabels, Counter>,
    advice_migrate: Family<DomainLabels, Gauge>,
    spare_cpu: FloatGauge,
    spare_memory: Gauge,
    free_cpus: Gauge,
    seen: Seen,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn bytes(kib: u64) -> i64 {
    i64::try_from(kib.saturating_mul(1024)).unwrap_or(i64::MAX)
}

#[allow(clippy::cast_precision_loss)]
fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// Removes from `family` the label sets of `old` missing from `now`; `now` becomes `old`.
fn prune<S: Clone + Hash + Eq, M: Default>(families: &[&Family<S, M>], old: &mut HashSet<S>, now: HashSet<S>) {
    for gone in old.difference(&now) {
        for f in families {
            f.remove(gone);
        }
    }
    *old = now;
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("vm_balancer");
        let cores = || Unit::Other("cores".into());
        let m = Metrics {
            registry: Arc::new(Mutex::new(Registry::default())),
            up: Gauge::default(),
            last_sample: Gauge::default(),
            step_duration: Histogram::new(STEP_BUCKETS),
            step_cpu: FloatCounter::default(),
            domains: Gauge::default(),
            blocked: Gauge::default(),
            host_available: Gauge::default(),
            vcpu_usage: Family::default(),
            vcpu_delay: Family::default(),
            vcpu_demand: Family::default(),
            vcpu_peak: Family::default(),
            vcpu_delay_seconds: Family::default(),
            cpu_load: Family::default(),
            cpu_busy: Family::default(),
            repins: Family::default(),
            balloon_changes: Family::default(),
            balloon_reads: Family::default(),
            balloon_unread: Counter::default(),
            balloon_current: Family::default(),
            balloon_max: Family::default(),
            balloon_usable: Family::default(),
            memory_state: Family::default(),
            grants_refused: Family::default(),
            advice_migrate: Family::default(),
            spare_cpu: FloatGauge::default(),
            spare_memory: Gauge::default(),
            free_cpus: Gauge::default(),
            seen: Seen::default(),
        };
        let info: Family<VersionLabels, Gauge> = Family::default();
        info.get_or_create(&VersionLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        r.register("build_info", "The agent's version (always 1)", info);
        r.register("libvirt_up", "1 while the hypervisor connection is up, else 0", m.up.clone());
        r.register_with_unit(
            "last_sample_timestamp",
            "Unix time of the last complete sample (two samples in a row: rates known)",
            Unit::Seconds,
            m.last_sample.clone(),
        );
        r.register_with_unit(
            "step_duration",
            "Wall time of one quantum (sample, model, plan, act)",
            Unit::Seconds,
            m.step_duration.clone(),
        );
        r.register_with_unit("step_cpu", "Agent CPU time spent in quanta", Unit::Seconds, m.step_cpu.clone());
        r.register("domains", "Running domains in the last sample", m.domains.clone());
        r.register("actions_blocked", "Actions the agent stopped trying because they kept failing", m.blocked.clone());
        r.register_with_unit(
            "host_memory_available",
            "Host MemAvailable in the last sample",
            Unit::Bytes,
            m.host_available.clone(),
        );
        r.register_with_unit("vcpu_usage", "Smoothed time on a cpu per wall time", cores(), m.vcpu_usage.clone());
        r.register_with_unit(
            "vcpu_delay",
            "Smoothed time runnable but waiting for a cpu per wall time",
            cores(),
            m.vcpu_delay.clone(),
        );
        r.register_with_unit(
            "vcpu_demand",
            "Demand the planner uses: usage + delay, at most one core",
            cores(),
            m.vcpu_demand.clone(),
        );
        r.register_with_unit(
            "vcpu_peak_demand",
            "Highest one-interval demand over --peak-window",
            cores(),
            m.vcpu_peak.clone(),
        );
        r.register_with_unit(
            "vcpu_delay",
            "Time the vCPU thread was runnable but waiting for a cpu (its schedstat)",
            Unit::Seconds,
            m.vcpu_delay_seconds.clone(),
        );
        r.register_with_unit(
            "cpu_load",
            "Load of an allowed host cpu as the CPU planner sees it: fixed load + demand of the vCPUs pinned to it",
            cores(),
            m.cpu_load.clone(),
        );
        r.register_with_unit(
            "cpu_busy",
            "Smoothed busy fraction of an allowed host cpu (/proc/stat)",
            Unit::Other("ratio".into()),
            m.cpu_busy.clone(),
        );
        r.register(
            "repins",
            "vCPU pins applied, by the planner rule that chose them (placement: first pin of a floating vCPU)",
            m.repins.clone(),
        );
        r.register("balloon_changes", "Balloon changes applied, by direction", m.balloon_changes.clone());
        r.register(
            "balloon_reads",
            "Guests' balloon statistics per memory interval: read from the host (each read costs libvirtd a call to the guest's QEMU), or carried forward for a quiet guest (--mem-quiet-interval)",
            m.balloon_reads.clone(),
        );
        r.register(
            "balloon_intervals_unread",
            "Memory intervals whose balloon statistics call failed or went unanswered (a guest's QEMU not answering its monitor, libvirtd busy): memory balancing waited",
            m.balloon_unread.clone(),
        );
        r.register_with_unit(
            "balloon_current",
            "Guest balloon size (last balloon statistics)",
            Unit::Bytes,
            m.balloon_current.clone(),
        );
        r.register_with_unit(
            "balloon_max",
            "Guest maximum memory (domain definition)",
            Unit::Bytes,
            m.balloon_max.clone(),
        );
        r.register_with_unit(
            "balloon_usable",
            "Usable memory the guest reports (untrusted; last balloon statistics)",
            Unit::Bytes,
            m.balloon_usable.clone(),
        );
        r.register(
            "memory_state",
            "Memory balancer state of a guest at its last memory plan: 1 for the current state, 0 for the others",
            m.memory_state.clone(),
        );
        r.register(
            "memory_grants_refused",
            "Memory plans in which a starving guest was granted nothing, by what stopped the grant",
            m.grants_refused.clone(),
        );
        r.register(
            "advice_migrate",
            "1 while the capacity advice names this guest to migrate elsewhere (the host was overloaded for --overload-window); no series otherwise",
            m.advice_migrate.clone(),
        );
        r.register_with_unit(
            "spare_cpu",
            "Cores of vCPU demand this host could still take under --high on the allowed cpus (0 while it cannot see its guests)",
            cores(),
            m.spare_cpu.clone(),
        );
        r.register_with_unit(
            "spare_memory",
            "Memory this host could still give within --host-reserve, less what starving guests want (0 while it cannot see its guests)",
            Unit::Bytes,
            m.spare_memory.clone(),
        );
        r.register(
            "free_cpus",
            "Allowed cpus no vCPU is pinned to (nor floats over) after the last quantum's pins: what --consolidate frees",
            m.free_cpus.clone(),
        );
        // Counters of every kind exist from the start at 0: `increase()` then sees the first one.
        for k in PinKind::ALL {
            let _ = m.repins.get_or_create(&KindLabels { kind: k.as_str() });
        }
        for direction in ["grow", "shrink"] {
            let _ = m.balloon_changes.get_or_create(&DirectionLabels { direction });
        }
        for how in ["read", "carried"] {
            let _ = m.balloon_reads.get_or_create(&HowLabels { how });
        }
        for n in NotGranted::ALL {
            let _ = m.grants_refused.get_or_create(&ReasonLabels { reason: n.as_str() });
        }
        *m.registry.lock().unwrap_or_else(PoisonError::into_inner) = r;
        m
    }

    /// Metrics served at `http://addr/metrics` from a thread of its own; fails when the address
    /// cannot be bound.
    pub fn listen(addr: SocketAddr) -> Result<Self, MetricsError> {
        let m = Metrics::new();
        server::serve(addr, Arc::clone(&m.registry))?;
        Ok(m)
    }

    /// Folds in one quantum: its report, whether the hypervisor connection is up after it, and
    /// how long it took (wall time).
    pub fn observe(&mut self, r: &StepReport, connected: bool, took: Duration) {
        let registry = Arc::clone(&self.registry);
        let _whole = registry.lock().unwrap_or_else(PoisonError::into_inner);
        self.up.set(i64::from(connected));
        self.step_duration.observe(took.as_secs_f64());
        #[allow(clippy::cast_precision_loss)]
        self.step_cpu.inc_by(r.cpu_us as f64 / 1e6);
        self.blocked.set(i64::try_from(r.blocked.len()).unwrap_or(i64::MAX));
        for (a, _) in r.plan.iter().zip(&r.was_applied).filter(|(_, applied)| **applied) {
            match a {
                Action::Pin { kind, .. } => self.repins.get_or_create(&KindLabels { kind: kind.as_str() }).inc(),
                Action::Balloon { from_kib, to_kib, .. } => {
                    let direction = if to_kib > from_kib { "grow" } else { "shrink" };
                    self.balloon_changes.get_or_create(&DirectionLabels { direction }).inc()
                }
                // Thread pins follow the vCPUs; the repins counted above are the decisions.
                Action::PinThread { .. } => continue,
            };
        }
        self.balloon_reads.get_or_create(&HowLabels { how: "read" }).inc_by(r.balloon_reads.read);
        self.balloon_reads.get_or_create(&HowLabels { how: "carried" }).inc_by(r.balloon_reads.carried);
        self.balloon_unread.inc_by(r.balloon_reads.unread);
        for v in &r.mem_verdicts {
            if let Some(n) = v.not_granted {
                self.grants_refused.get_or_create(&ReasonLabels { reason: n.as_str() }).inc();
            }
            for st in State::ALL {
                let l = StateLabels { domain: v.name.clone(), state: st.as_str() };
                self.memory_state.get_or_create(&l).set(i64::from(st == v.state));
            }
            self.seen.states.insert(v.name.clone());
        }
        if let Some(c) = &r.capacity {
            self.observe_capacity(c);
        }
        match &r.snapshot {
            Some(s) => {
                self.observe_snapshot(s, &r.cpu_loads);
                self.free_cpus.set(i64::try_from(r.free_cpus.len()).unwrap_or(i64::MAX));
            }
            // Without a connection nothing about the domains is known any more.
            None if !connected => self.forget_objects(),
            None => {}
        }
    }

    /// `loads`: each allowed cpu's load as the planner saw it, indexed like `s.host.cpus`.
    fn observe_snapshot(&mut self, s: &Snapshot, loads: &[f64]) {
        self.last_sample.set(i64::try_from(s.epoch_s).unwrap_or(i64::MAX));
        self.domains.set(i64::try_from(s.domains.len()).unwrap_or(i64::MAX));
        self.host_available.set(bytes(s.host.mem_available_kib));

        let (mut rated, mut waits) = (HashSet::new(), HashMap::new());
        let (mut balloons, mut usable) = (HashSet::new(), HashSet::new());
        for d in &s.domains {
            for v in &d.vcpus {
                let l = VcpuLabels { domain: d.dom.name.clone(), vcpu: v.id };
                if let Some(x) = v.rates {
                    self.vcpu_usage.get_or_create(&l).set(x.usage);
                    self.vcpu_delay.get_or_create(&l).set(x.delay);
                    self.vcpu_demand.get_or_create(&l).set(x.demand);
                    self.vcpu_peak.get_or_create(&l).set(x.peak);
                    rated.insert(l.clone());
                }
                // The counter follows the thread's cumulative wait; a new thread (or a
                // restarted domain) starts a new series, which Prometheus reads as a reset.
                let delta = match self.seen.waits.get(&l) {
                    Some(&(id, w)) if id == d.dom.id && v.wait_ns >= w => v.wait_ns - w,
                    Some(_) => {
                        self.vcpu_delay_seconds.remove(&l);
                        v.wait_ns
                    }
                    None => v.wait_ns,
                };
                self.vcpu_delay_seconds.get_or_create(&l).inc_by(seconds(delta));
                waits.insert(l, (d.dom.id, v.wait_ns));
            }
            let dl = DomainLabels { domain: d.dom.name.clone() };
            if let Some((b, _)) = &d.balloon {
                self.balloon_current.get_or_create(&dl).set(bytes(b.current_kib));
                self.balloon_max.get_or_create(&dl).set(bytes(d.desc.max_kib));
                if let Some(u) = b.usable_kib {
                    self.balloon_usable.get_or_create(&dl).set(bytes(u));
                    usable.insert(dl.clone());
                }
                balloons.insert(dl);
            }
        }
        let families = [&self.vcpu_usage, &self.vcpu_delay, &self.vcpu_demand, &self.vcpu_peak];
        prune(&families, &mut self.seen.rated, rated);
        for gone in self.seen.waits.keys().filter(|k| !waits.contains_key(*k)) {
            self.vcpu_delay_seconds.remove(gone);
        }
        self.seen.waits = waits;
        prune(&[&self.balloon_current, &self.balloon_max], &mut self.seen.balloons, balloons);
        prune(&[&self.balloon_usable], &mut self.seen.usable, usable);
        let running: HashSet<&str> = s.domains.iter().map(|d| d.dom.name.as_str()).collect();
        self.forget_states(|name| !running.contains(name));

        let mut cpus = HashSet::new();
        for (i, &cpu) in s.host.cpus.iter().enumerate() {
            let l = CpuLabels { cpu };
            self.cpu_busy.get_or_create(&l).set(s.host.cpu_busy.get(i).copied().unwrap_or(0.0));
            self.cpu_load.get_or_create(&l).set(loads.get(i).copied().unwrap_or(0.0));
            cpus.insert(l);
        }
        prune(&[&self.cpu_busy, &self.cpu_load], &mut self.seen.cpus, cpus);
    }

    /// The capacity advice: one series per advised guest, removed when the advice clears.
    fn observe_capacity(&mut self, c: &CapacityReport) {
        let mut advised = HashSet::new();
        for a in &c.advice {
            let l = DomainLabels { domain: a.domain().to_string() };
            self.advice_migrate.get_or_create(&l).set(1);
            advised.insert(l);
        }
        prune(&[&self.advice_migrate], &mut self.seen.advised, advised);
        self.spare_cpu.set(c.spare.cpu_cores);
        self.spare_memory.set(bytes(c.spare.mem_kib));
    }

    /// Removes the memory state series of the domains `gone` says are gone.
    fn forget_states(&mut self, gone: impl Fn(&str) -> bool) {
        let memory_state = &self.memory_state;
        self.seen.states.retain(|name| {
            if !gone(name) {
                return true;
            }
            for st in State::ALL {
                memory_state.remove(&StateLabels { domain: name.clone(), state: st.as_str() });
            }
            false
        });
    }

    /// Removes every per-domain and per-cpu series.
    fn forget_objects(&mut self) {
        let families = [&self.vcpu_usage, &self.vcpu_delay, &self.vcpu_demand, &self.vcpu_peak];
        prune(&families, &mut self.seen.rated, HashSet::new());
        self.vcpu_delay_seconds.clear();
        self.seen.waits.clear();
        prune(&[&self.balloon_current, &self.balloon_max], &mut self.seen.balloons, HashSet::new());
        prune(&[&self.balloon_usable], &mut self.seen.usable, HashSet::new());
        prune(&[&self.cpu_busy, &self.cpu_load], &mut self.seen.cpus, HashSet::new());
        self.forget_states(|_| true);
        prune(&[&self.advice_migrate], &mut self.seen.advised, HashSet::new());
        self.spare_cpu.set(0.0);
        self.spare_memory.set(0);
        self.free_cpus.set(0);
        self.domains.set(0);
    }

    /// The metrics in the Prometheus text format (0.0.4), what `promtool check metrics` reads.
    pub fn encode_text(&self) -> String {
        server::encode(&self.registry, server::Format::Text)
    }

    /// The metrics in the OpenMetrics text format, what a Prometheus server asks for.
    pub fn encode_openmetrics(&self) -> String {
        server::encode(&self.registry, server::Format::OpenMetrics)
    }
}

#[cfg(test)]
mod tests;
