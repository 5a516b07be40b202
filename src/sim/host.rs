//! [`SimHost`]: an in-memory [`Host`] driven by virtual time.
//!
//! The simulation sets each vCPU's demand and each guest's memory need, then calls
//! [`SimHost::advance`] to integrate one interval of virtual time. The agent (or a reference
//! policy) reads counters and acts through the [`Host`] trait exactly as on a real host.
//!
//! # CPU model
//!
//! Every cpu serves one core of demand per second. Demands are constant within an interval.
//!
//! - **Pinned vCPUs** (affinity = one cpu) share their cpu in proportion to their demand: when
//!   the demands `d_i` on a cpu sum to `D > 1`, each gets `d_i / D`.
//! - **Floating vCPUs** (affinity = several cpus, the start state) are served by an ideal
//!   work-conserving scheduler over what the pinned vCPUs left on their allowed cpus: the spare
//!   capacity of the allowed set is pooled and water-filled among them (each gets
//!   `min(d_i, level)`). Floating vCPUs are grouped by affinity and the groups with fewer allowed
//!   cpus go first. *Approximation:* pooling fragments of spare capacity ignores that one vCPU
//!   cannot run on two cpus at the same instant, and pinned vCPUs take precedence over floating
//!   ones on a shared cpu (CFS would share fairly).
//!
//! What a vCPU wanted and did not get is its delay: `run_ns` accumulates the served time and
//! `wait_ns` the unmet demand, like `/proc/<pid>/task/<tid>/schedstat`.
//!
//! # Memory model
//!
//! A guest has a provisioned maximum, a balloon size (`current`) that moves toward the target
//! set by [`Host::set_balloon`] at [`SimConfig::balloon_rate_kib_s`], clamped to
//! `[SimConfig::guest_min_kib, max]`, a resident need, and the part of its size the host backs
//! (`resident`: pages the guest has touched). As on a real host, a deflated balloon costs the
//! host nothing until the guest touches the pages: growing a balloon only moves `current`; the
//! guest then touches what it needs, up to its size, and the host backs each touched page out of
//! what is free. Memory is never created: `Σ resident + MemAvailable + overhead = total`, and a
//! touch the host cannot back (nothing free) is not made. Inflating a balloon frees the touched
//! pages above the new size. A guest starts with all of its start size touched (a guest that
//! has run a while has used its memory, for page cache at least). When `need > resident` the
//! guest swaps: `swap_in_kib` and `major_fault` rise in proportion to the deficit. A *liar* guest
//! reports almost no usable memory whatever its real need.
//!
//! So a policy that grants on credit (from MemAvailable alone) is shown its mistake only later,
//! when guests grow into what they were given; [`SimHost::mem_available_committed_kib`] is what
//! MemAvailable will be once every guest has touched all of its balloon.

use std::collections::HashMap;

use crate::host::{
    AgentPin, BalloonStats, CpuSet, DomainDesc, DomainRef, ErrorClass, Host, HostError, HostSample, OptOut, QemuThread,
    ThreadDesc, ThreadPin, Topology, VcpuTimes,
};

use topo::Layout;
pub use topo::TopologyKind;

/// Share of a guest's memory deficit paged in per second while it swaps.
const SWAP_IN_PER_S: f64 = 0.1;
/// A liar reports this fraction of its size as usable.
const LIAR_USABLE_FRACTION: f64 = 0.01;

/// Errors building a simulated host.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("the simulated host needs at least one cpu")]
    NoCpus,
    #[error("the simulated host needs at least one guest")]
    NoGuests,
    #[error("guest {0} has no vCPUs")]
    NoVcpus(String),
    #[error("host memory {total_kib} KiB is smaller than its overhead {overhead_kib} KiB")]
    TooLittleMemory { total_kib: u64, overhead_kib: u64 },
    #[error("trace: {0}")]
    Trace(#[from] crate::sim::traces::TraceError),
    #[error("{0}")]
    Workload(String),
    #[error("cannot write the plot {} (--plot)", .0.display())]
    Plot(std::path::PathBuf, #[source] std::io::Error),
    #[error(transparent)]
    Draw(#[from] crate::sim::plot::PlotError),
}

/// The fixed shape of a simulated host.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub cpus: u32,
    pub mem_total_kib: u64,
    /// Memory the host itself uses (kernel, QEMU overhead), never available to guests.
    pub host_overhead_kib: u64,
    /// Host reserve: start sizes leave at least this much MemAvailable.
    pub reserve_kib: u64,
    /// How fast a balloon moves toward its target, KiB per virtual second.
    pub balloon_rate_kib_s: u64,
    /// Smallest balloon size a guest can be driven to.
    pub guest_min_kib: u64,
    /// Virtual epoch seconds at virtual time 0.
    pub epoch0_s: u64,
    /// Layout of the cpus ([`topo`]).
    pub topology: TopologyKind,
    /// Work of a physical core with both threads busy, cores (1 to 2).
    pub smt_yield: f64,
    /// Fraction of work lost by a vCPU running off its guest's home node.
    pub remote_penalty: f64,
}

impl SimConfig {
    /// Defaults for a host of `cpus` cpus and `mem_total_kib` memory: overhead 1/64 of the
    /// memory but at least 1 GiB (capped at half the memory), balloons moving 512 MiB/s,
    /// guests never below 128 MiB; the `smt` layout with its SMT and NUMA costs.
    pub fn new(cpus: u32, mem_total_kib: u64, reserve_kib: u64) -> Self {
        SimConfig {
            cpus,
            mem_total_kib,
            host_overhead_kib: (mem_total_kib / 64).max(1 << 20).min(mem_total_kib / 2),
            reserve_kib,
            balloon_rate_kib_s: 512 << 10,
            guest_min_kib: 128 << 10,
            epoch0_s: 1_700_000_000,
            topology: TopologyKind::default(),
            smt_yield: topo::DEFAULT_SMT_YIELD,
            remote_penalty: topo::DEFAULT_REMOTE_PENALTY,
        }
    }
}

/// What the simulation needs to know to create a guest.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestSpec {
    pub name: String,
    pub vcpus: u32,
    pub max_kib: u64,
    /// Reports almost no usable memory while not needing it.
    pub liar: bool,
}

#[derive(Debug, Clone)]
struct SimVcpu {
    tid: u32,
    demand: f64,
    affinity: CpuSet,
    last_cpu: u32,
    run_ns: f64,
    wait_ns: f64,
    /// Served cores in the last interval.
    served: f64,
}

#[derive(Debug, Clone)]
struct SimGuest {
    dom: DomainRef,
    pid: u32,
    spec: GuestSpec,
    vcpus: Vec<SimVcpu>,
    current_kib: u64,
    target_kib: u64,
    need_kib: u64,
    /// Pages of `current` the guest has touched: what the host pays for, KiB.
    resident_kib: u64,
    swap_in_kib: f64,
    /// The agent's pin record (a real host keeps it in the live `<metadata>`).
    agent_pins: Vec<AgentPin>,
    /// The emulator thread's pin (`None`: floating over every cpu). Only recorded: the CPU
    /// model gives QEMU's own threads no load.
    emulator_pin: Option<CpuSet>,
    /// The thread entries of the agent's pin record.
    agent_threads: Vec<ThreadPin>,
    /// The node its memory is on, fixed when its vCPUs are first pinned ([`topo`]).
    home: Option<u32>,
}

/// Figures of the last interval, for the simulation's report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IntervalStats {
    pub dt_s: f64,
    /// Σ vCPU demand, cores.
    pub demand: f64,
    /// Σ served, cores.
    pub served: f64,
    /// Σ unmet demand, cores.
    pub delay: f64,
    /// Largest per-cpu load (demand placed on it, floating demand spread like its service).
    pub busiest_load: f64,
    /// Lower bound of the busiest load: max(demand / cpus, largest vCPU demand), capped at 1.
    pub bound: f64,
    /// Guests whose need exceeded their balloon size.
    pub swapping_guests: usize,
    /// Σ over guests of min(max − current, max − max(need, min)).
    pub reclaimed_kib: u64,
    /// Σ over guests of max − max(need, min): what perfect balloons could free.
    pub reclaimable_kib: u64,
    /// Work lost to SMT sharing, cores.
    pub smt_lost: f64,
    /// Busy time of vCPUs off their guest's home node, cores.
    pub remote: f64,
    /// Work lost to remote memory (`remote` × the penalty), cores.
    pub remote_lost: f64,
}

/// Action counters since the last [`SimHost::take_actions`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActionCounts {
    /// Pins of a vCPU that was pinned to another single cpu.
    pub repins: u64,
    /// Pins of a floating vCPU.
    pub placements: u64,
    /// Σ balloon growth asked for (target above current), KiB.
    pub grants_kib: u64,
    /// Guests whose balloon statistics were read (what a read costs libvirtd is per guest).
    pub balloon_reads: u64,
}

/// The simulated host. See the module documentation for the model.
#[derive(Debug, Clone)]
pub struct SimHost {
    cfg: SimConfig,
    topo: Topology,
    /// Siblings and nodes of every cpu (offline ones included), for the cost model.
    layout: Layout,
    /// Cpus taken offline ([`SimHost::set_cpu_online`]).
    offline: Vec<bool>,
    t_ns: u64,
    cpu_busy_ns: Vec<f64>,
    guests: Vec<SimGuest>,
    by_name: HashMap<String, usize>,
    actions: ActionCounts,
    last: IntervalStats,
}

/// Topology of `n` cpus in the default layout ([`topo::smt_topology`]).
pub use topo::smt_topology as topology;

#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn scale_kib(kib: u64, f: f64) -> u64 {
    (kib as f64 * f) as u64
}

impl SimHost {
    /// A host with the given guests, all vCPUs floating over every cpu. Guests start at their
    /// provisioned size when all of them fit with the reserve left free; otherwise every guest
    /// starts at the same fraction of its size, chosen so that they fit (never below the
    /// guest minimum).
    pub fn new(cfg: SimConfig, guests: &[GuestSpec]) -> Result<Self, SimError> {
        if cfg.cpus == 0 {
            return Err(SimError::NoCpus);
        }
        if guests.is_empty() {
            return Err(SimError::NoGuests);
        }
        if cfg.mem_total_kib <= cfg.host_overhead_kib {
            return Err(SimError::TooLittleMemory {
                total_kib: cfg.mem_total_kib,
                overhead_kib: cfg.host_overhead_kib,
            });
        }
        let room = cfg.mem_total_kib - cfg.host_overhead_kib;
        let room_for_guests = room.saturating_sub(cfg.reserve_kib);
        let sum_max: u64 = guests.iter().map(|g| g.max_kib).sum();
        #[allow(clippy::cast_precision_loss)]
        let f = if sum_max <= room_for_guests { 1.0 } else { room_for_guests as f64 / sum_max as f64 };
        let all = CpuSet((0..cfg.cpus).collect());
        let mut next_tid = 10_000u32;
        let mut list = Vec::with_capacity(guests.len());
        let mut by_name = HashMap::new();
        let mut used = 0u64;
        for (i, spec) in guests.iter().enumerate() {
            if spec.vcpus == 0 {
                return Err(SimError::NoVcpus(spec.name.clone()));
            }
            let min = cfg.guest_min_kib.min(spec.max_kib);
            // Never more than what is left: memory is not created.
            let start = scale_kib(spec.max_kib, f).clamp(min, spec.max_kib).min(room - used);
            used += start;
            let pid = next_tid;
            let vcpus = (0..spec.vcpus)
                .map(|v| SimVcpu {
                    tid: pid.saturating_add(1 + v),
                    demand: 0.0,
                    affinity: all.clone(),
                    last_cpu: v % cfg.cpus,
                    run_ns: 0.0,
                    wait_ns: 0.0,
                    served: 0.0,
                })
                .collect();
            next_tid = next_tid.saturating_add(spec.vcpus + 1);
            let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
            by_name.insert(spec.name.clone(), i);
            list.push(SimGuest {
                dom: DomainRef { name: spec.name.clone(), uuid: format!("00000000-0000-4000-8000-{:012x}", i + 1), id },
                pid,
                spec: spec.clone(),
                vcpus,
                current_kib: start,
                target_kib: start,
                need_kib: 0,
                resident_kib: start,
                swap_in_kib: 0.0,
                agent_pins: Vec::new(),
                emulator_pin: None,
                agent_threads: Vec::new(),
                home: None,
            });
        }
        let topo = topo::topology_of(cfg.cpus, cfg.topology);
        Ok(SimHost {
            layout: Layout::new(&topo, cfg.cpus as usize),
            topo,
            offline: vec![false; cfg.cpus as usize],
            cpu_busy_ns: vec![0.0; cfg.cpus as usize],
            cfg,
            t_ns: 0,
            guests: list,
            by_name,
            actions: ActionCounts::default(),
            last: IntervalStats::default(),
        })
    }

    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// Number of guests.
    pub fn guests(&self) -> usize {
        self.guests.len()
    }

    /// vCPU count of each guest.
    pub fn vcpu_counts(&self) -> Vec<usize> {
        self.guests.iter().map(|g| g.vcpus.len()).collect()
    }

    /// The most work the online cpus can do in one second, in cores: `--smt-yield` for a
    /// core with both threads online, 1 for one with one thread online (or without SMT).
    pub fn work_capacity(&self) -> f64 {
        let online = |c: usize| !self.offline[c];
        let mut cap = 0.0;
        for (c, s) in self.layout.sibling.iter().enumerate() {
            match *s {
                Some(s) if s < c => {}
                Some(s) if online(c) && online(s) => cap += self.cfg.smt_yield.max(1.0),
                Some(s) if online(c) || online(s) => cap += 1.0,
                None if online(c) => cap += 1.0,
                _ => {}
            }
        }
        cap
    }

    /// Total vCPUs.
    pub fn total_vcpus(&self) -> usize {
        self.guests.iter().map(|g| g.vcpus.len()).sum()
    }

    /// Sets the demand (cores, clamped to [0, 1]) of vCPU `v` of guest `g` for the next
    /// interval. Out-of-range indices are ignored.
    pub fn set_demand(&mut self, g: usize, v: usize, demand: f64) {
        if let Some(x) = self.guests.get_mut(g).and_then(|g| g.vcpus.get_mut(v)) {
            x.demand = if demand.is_finite() { demand.clamp(0.0, 1.0) } else { 0.0 };
        }
    }

    /// Sets the resident memory need of guest `g`, KiB.
    pub fn set_mem_need(&mut self, g: usize, need_kib: u64) {
        if let Some(x) = self.guests.get_mut(g) {
            x.need_kib = need_kib;
        }
    }

    /// Pins vCPU `k` (counting over all guests in order) to cpu `k mod cpus`, without counting
    /// it as an action: the start state of the `static` and `baseline` policies.
    /// Takes a cpu offline or brings it back, as cpu hotplug does: an offline cpu is not in the
    /// samples or the topology and runs nothing; a vCPU whose affinity had only offline cpus
    /// falls back to every cpu (the kernel's cpuset fallback), and pins to an offline cpu are
    /// refused. The last online cpu stays online.
    pub fn set_cpu_online(&mut self, cpu: u32, online: bool) {
        let i = cpu as usize;
        if i >= self.offline.len() || (!online && self.offline.iter().filter(|&&o| !o).count() <= 1) {
            return;
        }
        self.offline[i] = !online;
        let up: Vec<u32> = (0..self.cfg.cpus).filter(|&c| !self.offline[c as usize]).collect();
        self.topo = Topology { cpus: self.full_topology().cpus.into_iter().filter(|t| up.contains(&t.cpu)).collect() };
        for v in self.guests.iter_mut().flat_map(|g| g.vcpus.iter_mut()) {
            if v.affinity.0.iter().all(|&c| self.offline.get(c as usize).copied().unwrap_or(true)) {
                v.affinity = CpuSet(up.clone());
            }
        }
    }

    fn full_topology(&self) -> Topology {
        topo::topology_of(self.cfg.cpus, self.cfg.topology)
    }

    /// Whether `cpu` is online ([`SimHost::set_cpu_online`]).
    pub fn is_online(&self, cpu: u32) -> bool {
        self.offline.get(cpu as usize).is_some_and(|&o| !o)
    }

    pub fn pin_round_robin(&mut self) {
        let n = self.cfg.cpus;
        let mut k = 0u32;
        for g in &mut self.guests {
            for v in &mut g.vcpus {
                v.affinity = CpuSet::single(k % n);
                v.last_cpu = k % n;
                k = k.wrapping_add(1);
            }
        }
    }

    /// Guest `g`'s emulator pin (`None`: floating over every cpu).
    pub fn emulator_pin(&self, g: usize) -> Option<&CpuSet> {
        self.guests.get(g).and_then(|x| x.emulator_pin.as_ref())
    }

    /// Restarts guest `g`: a new runtime id (the old [`DomainRef`] is gone), vCPUs floating over
    /// every cpu again and no live metadata, as after a real restart.
    pub fn restart_guest(&mut self, g: usize) {
        let all = CpuSet((0..self.cfg.cpus).collect());
        let next_id = self.guests.iter().map(|x| x.dom.id).max().unwrap_or(0).saturating_add(1);
        if let Some(x) = self.guests.get_mut(g) {
            x.dom.id = next_id;
            x.agent_pins.clear();
            x.agent_threads.clear();
            x.emulator_pin = None;
            for v in &mut x.vcpus {
                v.affinity = all.clone();
            }
        }
    }

    /// The affinity of vCPU `v` of guest `g`.
    pub fn affinity(&self, g: usize, v: usize) -> Option<&CpuSet> {
        self.guests.get(g).and_then(|g| g.vcpus.get(v)).map(|v| &v.affinity)
    }

    /// Returns and clears the action counters.
    pub fn take_actions(&mut self) -> ActionCounts {
        std::mem::take(&mut self.actions)
    }

    /// Figures of the last interval.
    pub fn last_interval(&self) -> &IntervalStats {
        &self.last
    }

    /// Host MemAvailable, KiB: total − overhead − Σ what guests have touched.
    pub fn mem_available_kib(&self) -> u64 {
        let used: u64 = self.guests.iter().map(|g| g.resident_kib).sum();
        self.cfg.mem_total_kib.saturating_sub(self.cfg.host_overhead_kib).saturating_sub(used)
    }

    /// MemAvailable once every balloon has reached its target where that target is larger
    /// than the current size, and every guest has touched all of its balloon (what the granted
    /// memory will leave), KiB; may be negative.
    pub fn mem_available_committed_kib(&self) -> i64 {
        let used: u64 = self.guests.iter().map(|g| g.current_kib.max(g.target_kib)).sum();
        let total = i64::try_from(self.cfg.mem_total_kib).unwrap_or(i64::MAX);
        let other = i64::try_from(self.cfg.host_overhead_kib.saturating_add(used)).unwrap_or(i64::MAX);
        total - other
    }

    /// Balloon size of each guest, KiB.
    pub fn guest_sizes_kib(&self) -> Vec<u64> {
        self.guests.iter().map(|g| g.current_kib).collect()
    }

    /// What the host backs of each guest (touched pages), KiB.
    pub fn guest_resident_kib(&self) -> Vec<u64> {
        self.guests.iter().map(|g| g.resident_kib).collect()
    }

    /// Served and unmet demand of vCPU `v` of guest `g` accumulated so far, core-seconds.
    pub fn vcpu_totals_s(&self, g: usize, v: usize) -> Option<(f64, f64)> {
        let x = self.guests.get(g)?.vcpus.get(v)?;
        Some((x.run_ns / 1e9, x.wait_ns / 1e9))
    }

    /// Integrates `dt_ns` of virtual time at the current demands, balloon targets and memory
    /// needs, then moves the clock forward.
    #[allow(clippy::cast_precision_loss)]
    pub fn advance(&mut self, dt_ns: u64) -> &IntervalStats {
        let dt_s = dt_ns as f64 / 1e9;
        let mut stats = IntervalStats { dt_s, ..IntervalStats::default() };
        self.serve_cpus(dt_s, &mut stats);
        self.move_memory(dt_s, &mut stats);
        self.t_ns = self.t_ns.saturating_add(dt_ns);
        self.last = stats;
        &self.last
    }

    fn serve_cpus(&mut self, dt_s: f64, stats: &mut IntervalStats) {
        let n = self.cfg.cpus as usize;
        let mut pinned = vec![0.0f64; n];
        let mut max_demand = 0.0f64;
        let mut total = 0.0f64;
        // Floating vCPUs grouped by affinity.
        let mut groups: HashMap<Vec<u32>, Vec<(usize, usize)>> = HashMap::new();
        for (gi, g) in self.guests.iter().enumerate() {
            for (vi, v) in g.vcpus.iter().enumerate() {
                total += v.demand;
                max_demand = max_demand.max(v.demand);
                match v.affinity.as_single() {
                    Some(c) if (c as usize) < n => pinned[c as usize] += v.demand,
                    _ => groups.entry(v.affinity.0.clone()).or_default().push((gi, vi)),
                }
            }
        }
        let mut spare: Vec<f64> = pinned.iter().map(|&d| (1.0 - d).max(0.0)).collect();
        let mut busy: Vec<f64> = pinned.iter().map(|&d| d.min(1.0)).collect();
        let mut busy_before = busy.clone();
        let mut load = pinned.clone();
        self.fix_homes();
        // Pinned service.
        for g in &mut self.guests {
            for v in &mut g.vcpus {
                if let Some(c) = v.affinity.as_single().filter(|&c| (c as usize) < n) {
                    let d = pinned[c as usize];
                    v.served = if d <= 1.0 { v.demand } else { v.demand / d };
                }
            }
        }
        // Floating service: most constrained groups first.
        let mut order: Vec<_> = groups.into_iter().collect();
        order.sort_by(|a: &(Vec<u32>, _), b| a.0.len().cmp(&b.0.len()).then(a.0.cmp(&b.0)));
        let mut remote_share = HashMap::new();
        for (set, members) in order {
            let set: Vec<usize> = set.iter().map(|&c| c as usize).filter(|&c| c < n && !self.offline[c]).collect();
            let demands: Vec<f64> = members.iter().map(|&(g, v)| self.guests[g].vcpus[v].demand).collect();
            let want: f64 = demands.iter().sum();
            if set.is_empty() {
                for &(g, v) in &members {
                    self.guests[g].vcpus[v].served = 0.0;
                }
                continue;
            }
            let cap: f64 = set.iter().map(|&c| spare[c]).sum();
            let level = water_level(&demands, cap);
            let mut used_all = 0.0;
            // Each home node's members in turn: its work goes to its own node first.
            let mut homes: Vec<u32> = members.iter().map(|&(g, _)| self.home_or_default(g)).collect();
            homes.sort_unstable();
            homes.dedup();
            for home in homes {
                let mine: Vec<(usize, usize)> =
                    members.iter().copied().filter(|&(g, _)| self.home_or_default(g) == home).collect();
                let served: Vec<f64> = mine.iter().map(|&(g, v)| self.guests[g].vcpus[v].demand.min(level)).collect();
                let used: f64 = served.iter().sum();
                used_all += used;
                let add = topo::spread(used, &set, &spare, &mut busy, &self.layout, Some(home));
                let off: f64 =
                    set.iter().zip(&add).filter(|&(&c, _)| self.layout.node[c] != home).map(|(_, x)| x).sum();
                for (k, &c) in set.iter().enumerate() {
                    spare[c] = (spare[c] - add[k]).max(0.0);
                }
                // last_cpu by wrap-around over the added busy time (McNaughton).
                let (mut k, mut room) = (0usize, add.first().copied().unwrap_or(0.0));
                for (&(g, v), &s) in mine.iter().zip(&served) {
                    while room <= 1e-12 && k + 1 < set.len() {
                        k += 1;
                        room = add[k];
                    }
                    let x = &mut self.guests[g].vcpus[v];
                    x.served = s;
                    x.last_cpu = u32::try_from(set[k]).unwrap_or(0);
                    room -= s;
                    remote_share.insert((g, v), if used > 1e-12 { off / used } else { 0.0 });
                }
            }
            // Load: the group's demand spread like its service (evenly when it got none).
            for &c in &set {
                #[allow(clippy::cast_precision_loss)]
                let even = 1.0 / set.len() as f64;
                let part = if used_all > 1e-12 { (busy[c] - busy_before[c]) / used_all } else { even };
                load[c] += part * want;
            }
            busy_before.clone_from(&busy);
        }
        self.account_costs(&busy, &remote_share, stats);
        // Accumulate.
        let dt_ns = dt_s * 1e9;
        for g in &mut self.guests {
            for v in &mut g.vcpus {
                let served = v.served.min(v.demand).max(0.0);
                v.served = served;
                v.run_ns += served * dt_ns;
                v.wait_ns += (v.demand - served) * dt_ns;
                stats.served += served;
                stats.delay += v.demand - served;
                if let Some(c) = v.affinity.as_single().filter(|&c| (c as usize) < n) {
                    v.last_cpu = c;
                }
            }
        }
        for (c, b) in busy.iter().enumerate() {
            self.cpu_busy_ns[c] += b.min(1.0) * dt_ns;
        }
        stats.demand = total;
        stats.busiest_load = load.iter().copied().fold(0.0, f64::max);
        #[allow(clippy::cast_precision_loss)]
        let per_cpu = total / self.offline.iter().filter(|&&o| !o).count().max(1) as f64;
        stats.bound = per_cpu.max(max_demand).min(1.0);
    }

    /// Fixes the home node of each guest pinned for the first time: where most of its pinned
    /// vCPUs are (their memory is touched there first), a vCPU pinned to a set of cpus counting
    /// when the set is inside one node.
    fn fix_homes(&mut self) {
        let n = self.cfg.cpus as usize;
        for g in self.guests.iter_mut().filter(|g| g.home.is_none()) {
            // A vCPU pinned to one cpu, or to a group of cpus inside one node (a core, an LLC).
            let node_of = |set: &CpuSet| {
                let mut nodes = set.0.iter().filter(|&&c| (c as usize) < n).map(|&c| self.layout.node[c as usize]);
                let first = nodes.next()?;
                let one = nodes.all(|x| x == first) && set.0.len() < n;
                one.then_some(first)
            };
            let nodes: Vec<u32> = g.vcpus.iter().filter_map(|v| node_of(&v.affinity)).collect();
            g.home = crate::host::home_node(&nodes);
        }
    }

    /// A guest's home node; while it was never pinned, guest index mod nodes.
    fn home_or_default(&self, g: usize) -> u32 {
        self.guests[g].home.unwrap_or_else(|| u32::try_from(g).unwrap_or(0) % self.layout.nodes.max(1))
    }

    /// SMT loss from the busy time of each cpu, and the time vCPUs ran off their home node
    /// (`remote_share`: the off-home fraction of each floating vCPU's service).
    fn account_costs(&self, busy: &[f64], remote_share: &HashMap<(usize, usize), f64>, stats: &mut IntervalStats) {
        let (_, lost) = topo::smt_factors(busy, &self.layout, self.cfg.smt_yield);
        stats.smt_lost = lost;
        let n = self.cfg.cpus as usize;
        let mut remote = 0.0;
        for (gi, g) in self.guests.iter().enumerate() {
            let home = self.home_or_default(gi);
            for (vi, v) in g.vcpus.iter().enumerate() {
                let served = v.served.min(v.demand).max(0.0);
                remote += match v.affinity.as_single().filter(|&c| (c as usize) < n) {
                    Some(c) if self.layout.node[c as usize] != home => served,
                    Some(_) => 0.0,
                    None => served * remote_share.get(&(gi, vi)).copied().unwrap_or(0.0),
                };
            }
        }
        stats.remote = remote;
        stats.remote_lost = remote * self.cfg.remote_penalty;
    }

    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn move_memory(&mut self, dt_s: f64, stats: &mut IntervalStats) {
        let step = (self.cfg.balloon_rate_kib_s as f64 * dt_s) as u64;
        for g in &mut self.guests {
            if g.target_kib < g.current_kib {
                // Inflating frees the touched pages above the new size.
                g.current_kib -= (g.current_kib - g.target_kib).min(step);
                g.resident_kib = g.resident_kib.min(g.current_kib);
            } else if g.target_kib > g.current_kib {
                // Deflating is free: the host pays only when the guest touches the pages.
                g.current_kib += (g.target_kib - g.current_kib).min(step);
            }
        }
        // Guests touch what they need, up to their size, out of what the host has free.
        let mut free = self.mem_available_kib();
        let min_global = self.cfg.guest_min_kib;
        for g in &mut self.guests {
            let want = g.need_kib.min(g.current_kib);
            if want > g.resident_kib {
                let d = (want - g.resident_kib).min(free);
                g.resident_kib += d;
                free -= d;
            }
            if g.need_kib > g.resident_kib {
                stats.swapping_guests += 1;
                g.swap_in_kib += (g.need_kib - g.resident_kib) as f64 * SWAP_IN_PER_S * dt_s;
            }
            let floor = g.need_kib.max(min_global.min(g.spec.max_kib)).min(g.spec.max_kib);
            let reclaimable = g.spec.max_kib - floor;
            stats.reclaimable_kib += reclaimable;
            stats.reclaimed_kib += (g.spec.max_kib - g.current_kib.min(g.spec.max_kib)).min(reclaimable);
        }
    }

    fn guest(&self, dom: &DomainRef) -> Result<usize, HostError> {
        self.by_name
            .get(&dom.name)
            .copied()
            .filter(|&i| self.guests[i].dom.id == dom.id)
            .ok_or_else(|| HostError::DomainGone(dom.name.clone()))
    }

    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn balloon_of(&self, g: &SimGuest) -> BalloonStats {
        let free = g.current_kib.saturating_sub(g.need_kib);
        let usable = if g.spec.liar { (g.current_kib as f64 * LIAR_USABLE_FRACTION) as u64 } else { free };
        let swap = g.swap_in_kib as u64;
        BalloonStats {
            current_kib: g.current_kib,
            maximum_kib: g.spec.max_kib,
            unused_kib: Some(if g.spec.liar { usable } else { free }),
            available_kib: Some(g.current_kib),
            usable_kib: Some(usable),
            swap_in_kib: Some(swap),
            major_fault: Some(swap / 4),
            last_update_s: Some(self.epoch_s()),
            carried_for_s: None,
        }
    }
}

/// Water level `L` such that `Σ min(d_i, L) = cap`, or the largest demand when all fit.
fn water_level(demands: &[f64], cap: f64) -> f64 {
    let want: f64 = demands.iter().sum();
    if want <= cap {
        return f64::INFINITY;
    }
    if cap <= 0.0 {
        return 0.0;
    }
    let mut sorted: Vec<f64> = demands.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut left = cap;
    let mut rest = sorted.len();
    for &d in &sorted {
        #[allow(clippy::cast_precision_loss)]
        let even = left / rest as f64;
        if d >= even {
            return even;
        }
        left -= d;
        rest -= 1;
    }
    f64::INFINITY
}

mod host_impl;
#[cfg(test)]
mod tests;
pub mod topo;
