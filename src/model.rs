//! Model: raw counters of two quanta → rates, smoothed, in plain data the planners read.
//!
//! No I/O and no clock: [`Tracker::ingest`] takes the sample's own timestamp. A vCPU gets rates
//! only once it has two samples from the same thread; until then it is in the snapshot without
//! `rates` and the planners leave it alone.

use std::collections::HashMap;

use serde::Serialize;

use crate::collect::RawSample;
use crate::host::{BalloonStats, CpuSet, DomainDesc, DomainRef, Topology};

/// Tunables of the model.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Time constant of the exponential moving average of usage and delay, ns.
    pub smoothing_ns: u64,
    /// Window of a vCPU's peak demand, ns; 0 keeps no peak (the peak is the demand).
    pub peak_ns: u64,
    /// Host cpus the balancer may place vCPUs on.
    pub allowed_cpus: Vec<u32>,
    /// Domain names never touched.
    pub exclude: Vec<String>,
}

/// Smoothed rates of one vCPU, each a fraction of one core.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct VcpuRates {
    /// Time on a cpu per wall time.
    pub usage: f64,
    /// Time runnable but waiting per wall time.
    pub delay: f64,
    /// usage + delay: what the vCPU wanted, capped at one core.
    pub demand: f64,
    /// The highest demand of one interval over the peak window: what the vCPU may ask for
    /// again. At least `demand`.
    pub peak: f64,
}

/// One vCPU in a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VcpuView {
    pub id: u32,
    /// Host cpu it ran on last.
    pub pcpu: Option<u32>,
    /// Its current affinity.
    pub pinned_to: CpuSet,
    /// `None` until two samples of the same thread exist.
    #[serde(flatten)]
    pub rates: Option<VcpuRates>,
    /// Cumulative time runnable but waiting (the thread's `schedstat`), ns: for the metrics'
    /// delay counter. A new thread starts it over.
    #[serde(skip)]
    pub wait_ns: u64,
}

/// One domain in a snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainView {
    pub dom: DomainRef,
    pub desc: DomainDesc,
    /// Why CPU balancing leaves it alone, if it does.
    pub cpu_excluded: Option<String>,
    /// Why memory balancing leaves it alone, if it does.
    pub mem_excluded: Option<String>,
    pub vcpus: Vec<VcpuView>,
    /// Last balloon statistics and the time (ns) they were read, if any.
    pub balloon: Option<(BalloonStats, u64)>,
}

/// Host view of one quantum.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView {
    /// Cpus the balancer may use (online ∩ `--cpus`).
    pub cpus: Vec<u32>,
    pub topology: Topology,
    /// Smoothed busy fraction of each allowed cpu, indexed like `cpus`.
    pub cpu_busy: Vec<f64>,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub mem_pressure_some_avg10: Option<f64>,
}

/// What the planners see: one consistent quantum.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub t_ns: u64,
    pub epoch_s: u64,
    /// Sequence number of the quantum since the tracker started (or was reset).
    pub quantum: u64,
    pub host: HostView,
    pub domains: Vec<DomainView>,
}

#[derive(Debug, Clone)]
struct VcpuState {
    tid: Option<u32>,
    /// Moving average of usage + delay (the reported demand may be above it under contention).
    demand_ema: Option<f64>,
    peaks: PeakWindow,
    run_ns: u64,
    wait_ns: u64,
    rates: Option<VcpuRates>,
}

#[derive(Debug, Clone)]
struct DomainState {
    id: u32,
    vcpus: Vec<VcpuState>,
    balloon: Option<(BalloonStats, u64)>,
}

/// Turns successive raw samples into snapshots.
#[derive(Debug)]
pub struct Tracker {
    cfg: ModelConfig,
    topology: Topology,
    last_t_ns: Option<u64>,
    quantum: u64,
    cpu_prev: HashMap<u32, u64>,
    cpu_busy: HashMap<u32, f64>,
    domains: HashMap<String, DomainState>,
}

/// A vCPU's highest interval demands over a sliding window, in coarse buckets.
type PeakWindow = crate::window::WindowMax<f64>;

/// Fraction of a core a vCPU must have waited in one interval for its demand to count at once.
const CONTENTION: f64 = 0.05;

fn ema(prev: Option<f64>, x: f64, alpha: f64) -> f64 {
    match prev {
        Some(p) => p + alpha * (x - p),
        None => x,
    }
}

#[allow(clippy::cast_precision_loss)]
fn ratio(delta: u64, wall: u64) -> f64 {
    (delta as f64 / wall as f64).clamp(0.0, 1.0)
}

impl Tracker {
    pub fn new(cfg: ModelConfig, topology: Topology) -> Self {
        Tracker {
            cfg,
            topology,
            last_t_ns: None,
            quantum: 0,
            cpu_prev: HashMap::new(),
            cpu_busy: HashMap::new(),
            domains: HashMap::new(),
        }
    }

    /// New settings (reloaded with SIGHUP), keeping every vCPU's history.
    pub fn reconfigure(&mut self, cfg: ModelConfig) {
        self.cfg = cfg;
    }

    /// The online cpus changed (hotplug): the new topology and the settings that follow from
    /// it, keeping every vCPU's history; the busy history of cpus gone is dropped.
    pub fn set_topology(&mut self, topology: Topology, cfg: ModelConfig) {
        self.cpu_prev.retain(|c, _| topology.cpus.iter().any(|t| t.cpu == *c));
        self.cpu_busy.retain(|c, _| topology.cpus.iter().any(|t| t.cpu == *c));
        self.topology = topology;
        self.cfg = cfg;
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Forget all history: after a reconnect nothing old is trusted.
    pub fn reset(&mut self, topology: Topology) {
        *self = Tracker::new(self.cfg.clone(), topology);
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Folds in one quantum. Returns `None` for the first sample (no rates yet) or when time
    /// did not move forward.
    pub fn ingest(&mut self, raw: &RawSample) -> Option<Snapshot> {
        let wall = match self.last_t_ns {
            Some(t) if raw.t_ns > t => Some(raw.t_ns - t),
            Some(_) => return None,
            None => None,
        };
        self.last_t_ns = Some(raw.t_ns);
        let now_ns = raw.t_ns;
        #[allow(clippy::cast_precision_loss)]
        let alpha = match wall {
            Some(w) => 1.0 - (-(w as f64) / self.cfg.smoothing_ns.max(1) as f64).exp(),
            None => 1.0,
        };

        // Host cpus.
        for (i, &cpu) in raw.host.cpu_ids.iter().enumerate() {
            let busy = raw.host.cpu_busy_ns.get(i).copied().unwrap_or(0);
            if let (Some(w), Some(prev)) = (wall, self.cpu_prev.get(&cpu)) {
                let r = ratio(busy.saturating_sub(*prev), w);
                let p = self.cpu_busy.get(&cpu).copied();
                self.cpu_busy.insert(cpu, ema(p, r, alpha));
            }
            self.cpu_prev.insert(cpu, busy);
        }

        // Balloons arrive on their own cadence; keep the last one per domain.
        let balloons: HashMap<&str, &BalloonStats> =
            raw.balloons.iter().flatten().map(|(n, b)| (n.as_str(), b)).collect();

        // Domains.
        let mut seen = Vec::with_capacity(raw.domains.len());
        let mut views = Vec::with_capacity(raw.domains.len());
        for rd in &raw.domains {
            let name = &rd.desc.dom.name;
            seen.push(name.clone());
            let st = self.domains.entry(name.clone()).or_insert_with(|| DomainState {
                id: rd.desc.dom.id,
                vcpus: Vec::new(),
                balloon: None,
            });
            // Restarted or vCPU count changed: start the domain's history over.
            if st.id != rd.desc.dom.id || st.vcpus.len() != rd.vcpus.len() {
                st.id = rd.desc.dom.id;
                st.vcpus = rd
                    .vcpus
                    .iter()
                    .map(|_| VcpuState {
                        tid: None,
                        demand_ema: None,
                        peaks: PeakWindow::default(),
                        run_ns: 0,
                        wait_ns: 0,
                        rates: None,
                    })
                    .collect();
                st.balloon = None;
            }
            if let Some(b) = balloons.get(name.as_str()) {
                st.balloon = Some(((*b).clone(), raw.t_ns));
            }
            let mut vviews = Vec::with_capacity(rd.vcpus.len());
            for (i, (t, vs)) in rd.vcpus.iter().zip(st.vcpus.iter_mut()).enumerate() {
                let tid = rd.desc.vcpu_tids.get(i).copied().flatten();
                let Some(t) = t else {
                    vs.tid = None;
                    vs.rates = None;
                    vs.demand_ema = None;
                    vs.peaks = PeakWindow::default();
                    continue;
                };
                let same_thread = vs.tid.is_some() && vs.tid == tid;
                if let (true, Some(w)) = (same_thread, wall) {
                    if t.run_ns >= vs.run_ns && t.wait_ns >= vs.wait_ns {
                        let usage = ratio(t.run_ns - vs.run_ns, w);
                        let delay = ratio(t.wait_ns - vs.wait_ns, w);
                        let prev = vs.rates;
                        let u = ema(prev.map(|r| r.usage), usage, alpha);
                        let d = ema(prev.map(|r| r.delay), delay, alpha);
                        let raw = (usage + delay).min(1.0);
                        let dm = ema(vs.demand_ema, raw, alpha);
                        vs.demand_ema = Some(dm);
                        // Waiting is evidence, not a forecast: a vCPU that was kept waiting in
                        // this interval is planned on what it wanted now, not on a slow average.
                        // A spike on an idle core causes no wait, so it stays smoothed.
                        let demand = if delay >= CONTENTION { dm.max(raw) } else { dm };
                        let peak = vs.peaks.record_max(now_ns, self.cfg.peak_ns, raw).max(demand);
                        vs.rates = Some(VcpuRates { usage: u, delay: d, demand, peak });
                    } else {
                        vs.rates = None; // counters went backwards: a new thread
                        vs.demand_ema = None;
                        vs.peaks = PeakWindow::default();
                    }
                } else {
                    vs.rates = None;
                    vs.demand_ema = None;
                    vs.peaks = PeakWindow::default();
                }
                vs.tid = tid;
                vs.run_ns = t.run_ns;
                vs.wait_ns = t.wait_ns;
                vviews.push(VcpuView {
                    id: u32::try_from(i).unwrap_or(u32::MAX),
                    pcpu: t.last_cpu,
                    pinned_to: t.affinity_mask.clone(),
                    rates: vs.rates,
                    wait_ns: t.wait_ns,
                });
            }
            let by_flag = self.cfg.exclude.iter().any(|e| e == name).then(|| "excluded by --exclude".to_string());
            let cpu_excluded = by_flag.clone().or_else(|| rd.desc.opt_out.cpu.clone());
            let mem_excluded = by_flag.or_else(|| rd.desc.opt_out.memory.clone());
            views.push(DomainView {
                dom: rd.desc.dom.clone(),
                desc: rd.desc.clone(),
                cpu_excluded,
                mem_excluded,
                vcpus: vviews,
                balloon: st.balloon.clone(),
            });
        }
        self.domains.retain(|n, _| seen.contains(n));

        wall?;
        self.quantum += 1;
        let cpus: Vec<u32> = raw.host.cpu_ids.iter().copied().filter(|c| self.cfg.allowed_cpus.contains(c)).collect();
        let cpu_busy = cpus.iter().map(|c| self.cpu_busy.get(c).copied().unwrap_or(0.0)).collect();
        Some(Snapshot {
            t_ns: raw.t_ns,
            epoch_s: raw.epoch_s,
            quantum: self.quantum,
            host: HostView {
                cpus,
                topology: self.topology.clone(),
                cpu_busy,
                mem_total_kib: raw.host.mem_total_kib,
                mem_available_kib: raw.host.mem_available_kib,
                mem_pressure_some_avg10: raw.host.mem_pressure_some_avg10,
            },
            domains: views,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::RawDomain;
    use crate::host::{DomainDesc, HostSample, OptOut, VcpuTimes};

    const S: u64 = 1_000_000_000;

    fn raw(t_s: u64, id: u32, times: &[(u64, u64)]) -> RawSample {
        let dom = DomainRef { name: "g".into(), uuid: "u".into(), id };
        let desc = DomainDesc {
            dom,
            vcpu_tids: (0..times.len()).map(|i| Some(100 + u32::try_from(i).unwrap())).collect(),
            vcpu_count: u32::try_from(times.len()).unwrap(),
            pid: Some(1),
            max_kib: 1 << 20,
            has_balloon: true,
            stats_period_s: 1,
            opt_out: OptOut::default(),
            started_epoch_s: None,
            default_affinity: None,
            threads: vec![],
        };
        let vcpus = times
            .iter()
            .map(|&(run_ns, wait_ns)| {
                Some(VcpuTimes { run_ns, wait_ns, affinity_mask: CpuSet(vec![0]), last_cpu: Some(0) })
            })
            .collect();
        RawSample {
            t_ns: t_s * S,
            epoch_s: t_s,
            domains: vec![RawDomain { desc, vcpus }],
            host: HostSample {
                cpu_ids: vec![0, 1],
                cpu_busy_ns: vec![t_s * S, 0],
                mem_total_kib: 1,
                mem_available_kib: 1,
                mem_pressure_some_avg10: None,
            },
            balloons: None,
            balloon_counts: crate::collect::BalloonCounts::default(),
        }
    }

    fn tracker(smoothing_s: u64) -> Tracker {
        Tracker::new(
            ModelConfig { smoothing_ns: smoothing_s * S, peak_ns: 0, allowed_cpus: vec![0, 1], exclude: vec![] },
            Topology::flat(2),
        )
    }

    fn rates(s: &Snapshot) -> VcpuRates {
        s.domains[0].vcpus[0].rates.unwrap()
    }

    #[test]
    fn rates_need_two_samples_and_are_fractions_of_a_core() {
        let mut t = tracker(1);
        assert!(t.ingest(&raw(10, 1, &[(0, 0)])).is_none(), "no rates from one sample");
        let s = t.ingest(&raw(12, 1, &[(S, S / 2)])).unwrap();
        let r = rates(&s);
        assert!((r.usage - 0.5).abs() < 1e-9 && (r.delay - 0.25).abs() < 1e-9, "{r:?}");
        assert!((r.demand - 0.75).abs() < 1e-9);
        assert!((s.host.cpu_busy[0] - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_spike_without_waiting_is_smoothed_but_waiting_counts_at_once() {
        let mut t = tracker(10);
        t.ingest(&raw(0, 1, &[(0, 0)]));
        t.ingest(&raw(1, 1, &[(0, 0)]));
        // One second fully busy, no wait: the average moves only part of the way.
        let r = rates(&t.ingest(&raw(2, 1, &[(S, 0)])).unwrap());
        assert!(r.demand > 0.05 && r.demand < 0.2, "{r:?}");
        // Then half a second of waiting: demand is what it wanted now.
        let r = rates(&t.ingest(&raw(3, 1, &[(S + S / 2, S / 2)])).unwrap());
        assert!((r.demand - 1.0).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn a_restarted_domain_starts_over() {
        let mut t = tracker(1);
        t.ingest(&raw(0, 1, &[(0, 0)]));
        assert!(t.ingest(&raw(1, 1, &[(S, 0)])).unwrap().domains[0].vcpus[0].rates.is_some());
        // Same name, new runtime id, counters back near zero: no rates, no nonsense.
        let s = t.ingest(&raw(2, 2, &[(10, 0)])).unwrap();
        assert!(s.domains[0].vcpus[0].rates.is_none());
        // vCPU count changed: history dropped too.
        let s = t.ingest(&raw(3, 2, &[(S, 0), (0, 0)])).unwrap();
        assert!(s.domains[0].vcpus.iter().all(|v| v.rates.is_none()));
    }

    #[test]
    fn excluded_names_are_marked() {
        let mut t = Tracker::new(
            ModelConfig { smoothing_ns: S, peak_ns: 0, allowed_cpus: vec![0], exclude: vec!["g".into()] },
            Topology::flat(2),
        );
        t.ingest(&raw(0, 1, &[(0, 0)]));
        let s = t.ingest(&raw(1, 1, &[(0, 0)])).unwrap();
        assert!(s.domains[0].cpu_excluded.as_deref().unwrap().contains("--exclude"));
        assert_eq!(s.host.cpus, vec![0], "only allowed cpus");
    }
}
