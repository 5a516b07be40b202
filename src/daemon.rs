//! The quantum loop: sample → model → plan → act, with reconnects and signals.
//!
//! [`Agent::step`] is one quantum; the daemon, `diagnose` and the simulator all drive the same
//! `Agent`, over the libvirt host or the simulated one.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::actuate::Outcome;
use crate::capacity::{Advisor, Announcer, CapacityReport};
use crate::collect::Collector;
use crate::failures::{Failures, Kind};
use crate::host::{Host, HostError};
use crate::memctl::MemTracker;
use crate::model::{Snapshot, Tracker};
use crate::policy::consolidate::{self, ConsolidatePolicy};
use crate::policy::cpu::{self, CpuPolicy};
use crate::policy::emulator::{self, EmulatorCpus, ThreadsSet};
use crate::policy::mem::Verdict;
use crate::policy::{Action, PinKind, Plan};
use crate::repacker::{RepackStats, Repacker};

mod config;
pub use config::{AgentConfig, MemConfig};
use config::{discovery_for, model_config, ns};

/// What one quantum did.
#[derive(Debug, Default)]
pub struct StepReport {
    /// The snapshot the plan was made from; `None` when there was no fresh data.
    pub snapshot: Option<Snapshot>,
    pub plan: Plan,
    /// The memory planner's verdict on each guest, on quanta with fresh balloon statistics.
    pub mem_verdicts: Vec<Verdict>,
    /// For each action of `plan`, in order: whether it was applied.
    pub was_applied: Vec<bool>,
    /// Each allowed cpu's load as the CPU planner sees it, indexed like the snapshot's cpus
    /// (empty without a snapshot).
    pub cpu_loads: Vec<f64>,
    /// Agent CPU time spent in this step, µs (user + system, this thread).
    pub cpu_us: u64,
    /// Actions the loop stopped trying (domain, action, why): they kept failing.
    pub blocked: Vec<(String, Kind, String)>,
    /// The capacity advice and spare capacity (with a snapshot only).
    pub capacity: Option<CapacityReport>,
    /// Allowed cpus no vCPU is pinned to (nor floats over) once the applied pins of this
    /// quantum are in place (empty without a snapshot).
    pub free_cpus: Vec<u32>,
    /// Why the end of the plan was dropped unapplied (it had grown stale), if it was.
    pub stale: Option<String>,
    /// Guests whose balloon statistics were read this quantum, and quiet ones whose last
    /// reading was carried forward (both 0 between memory intervals).
    pub balloon_reads: crate::collect::BalloonCounts,
}

impl StepReport {
    /// Number of actions applied.
    pub fn applied(&self) -> usize {
        self.was_applied.iter().filter(|&&a| a).count()
    }
}

/// Connection state, so an outage is logged once, not once per quantum.
#[derive(Debug, PartialEq, Eq)]
enum Link {
    Up,
    Down { since_ns: u64, next_try_ns: u64, backoff_ns: u64 },
}

/// One host's balancing agent.
pub struct Agent<H: Host> {
    pub host: H,
    cfg: AgentConfig,
    collector: Collector,
    tracker: Option<Tracker>,
    link: Link,
    /// When (host clock, ns) each vCPU was last moved, for the cooldown.
    moved_at: cpu::MovedAt,
    /// When (host clock, ns) each host cpu was last the source or target of a repin.
    touched_at: HashMap<u32, u64>,
    mem: MemTracker,
    last_balloons_ns: Option<u64>,
    /// Guests the last memory plan left steady (and not cooling down): only their readings
    /// may be carried forward while they are quiet (`collect::balloons`).
    mem_steady: HashSet<String>,
    /// Domains (name, runtime id) whose stats period the agent turned on (or tried to).
    period_set: HashMap<String, u32>,
    /// Actions that failed, by class: what not to try again, and for how long.
    failures: Failures,
    /// The cpus refused (`failures`) that the model's allowed cpus leave out now.
    refused: Vec<u32>,
    /// The emulator and I/O thread pins the agent made, per domain run: newer than the live
    /// definitions, which are re-read only every few quanta.
    threads_set: ThreadsSet,
    /// Every cpu allowed at some point of this run: a vCPU pinned to one that is no longer
    /// allowed (a reload narrowed `--cpus`) is placed again.
    ever_allowed: HashSet<u32>,
    /// The capacity advice's window and memory.
    advisor: Advisor,
    /// The scheduled re-pack and the safeguard.
    repacker: Repacker,
    /// Pins of this `--pin-granularity` (or a finer one) wait to be given back (a reload
    /// changed it).
    give_back: Option<cpu::Granularity>,
    /// The granularity the balancer last pinned at (acting, not in a dry run).
    pinned_at: Option<cpu::Granularity>,
}

/// CPU time (user + system) of the calling thread, µs: what one `Agent::step` costs, even
/// when other threads (the simulator's other policies) run beside it.
pub fn thread_cpu_us() -> u64 {
    use nix::sys::resource::{UsageWho, getrusage};
    getrusage(UsageWho::RUSAGE_THREAD)
        .map(|u| {
            let t = |tv: nix::sys::time::TimeVal| {
                u64::try_from(tv.tv_sec()).unwrap_or(0) * 1_000_000 + u64::try_from(tv.tv_usec()).unwrap_or(0)
            };
            t(u.user_time()) + t(u.system_time())
        })
        .unwrap_or(0)
}

impl<H: Host> Agent<H> {
    pub fn new(host: H, cfg: AgentConfig) -> Self {
        let quantum = cfg.quantum;
        Agent {
            host,
            cfg,
            collector: Collector::with_config(discovery_for(quantum)),
            tracker: None,
            link: Link::Down { since_ns: 0, next_try_ns: 0, backoff_ns: 0 },
            moved_at: HashMap::new(),
            touched_at: HashMap::new(),
            mem: MemTracker::new(),
            last_balloons_ns: None,
            mem_steady: HashSet::new(),
            period_set: HashMap::new(),
            failures: Failures::new(),
            refused: Vec::new(),
            threads_set: HashMap::new(),
            ever_allowed: HashSet::new(),
            advisor: Advisor::default(),
            repacker: Repacker::default(),
            give_back: None,
            pinned_at: None,
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The granularity whose groups count as the agent's when its pins are given back: the
    /// one in force, or a coarser one whose pins are still out (a coarser group holds the
    /// finer ones: an LLC its cores, a core its threads).
    pub fn release_granularity(&self) -> cpu::Granularity {
        [self.give_back, self.pinned_at].into_iter().flatten().fold(self.cfg.pin_granularity(), Ord::max)
    }

    /// Takes new settings (SIGHUP) from the next quantum on, keeping all history: samples,
    /// cooldowns, peaks, memory history. Logs each setting that changed. Returns how many did.
    pub fn reconfigure(&mut self, new: AgentConfig) -> usize {
        let old = &self.cfg;
        let mut changed: Vec<String> = Vec::new();
        macro_rules! diff {
            ($($f:ident),*) => {$(
                if format!("{:?}", old.$f) != format!("{:?}", new.$f) {
                    changed.push(format!("{}: {:?} -> {:?}", stringify!($f), old.$f, new.$f));
                }
            )*};
        }
        diff!(
            quantum,
            smoothing,
            peak_window,
            cpus,
            exclude,
            cpu,
            emulator,
            consolidate,
            mem,
            dry_run,
            keep_pins_on_exit,
            advice,
            repack
        );
        if changed.is_empty() {
            info!("settings reloaded: nothing changed");
            return 0;
        }
        for c in &changed {
            info!("settings reloaded: {c}");
        }
        // The balancer now pins at another granularity than its last pins were made at (also
        // after a dry run or a stretch with the balancer off): those pins are given back.
        if let (Some(old), Some(p)) = (self.pinned_at, new.cpu.as_ref())
            && old != p.granularity
        {
            self.give_back = Some(self.give_back.map_or(old, |g| g.max(old)));
        }
        // Only a plan made under the new settings may let a reading be carried.
        self.mem_steady.clear();
        self.cfg = new;
        self.give_back_for_new_granularity();
        self.collector.set_config(discovery_for(self.cfg.quantum));
        if let Some(t) = self.tracker.as_mut() {
            let mc = model_config(&self.cfg, t.topology(), &self.refused);
            t.reconfigure(mc);
        }
        changed.len()
    }

    /// `--pin-granularity` changed: the pins of the old one (a cpu, a core's threads, an LLC)
    /// would read as someone else's sets under the new one, so every pin is given back (as on
    /// a clean stop) and the vCPUs are placed again. Tried at the reload and, while it fails
    /// (libvirtd down), at every quantum the connection is up.
    fn give_back_for_new_granularity(&mut self) {
        let Some(old) = self.give_back.filter(|_| !self.cfg.dry_run) else { return };
        // Pins of the new granularity made meanwhile are given back with them.
        let g = old.max(self.cfg.pin_granularity());
        match crate::release::release_all(&mut self.host, g) {
            Ok(s) => {
                info!(
                    "pin granularity changed: gave back {} pins on {} domain(s) ({} failed); placing the vCPUs again",
                    s.restored, s.domains, s.failed
                );
                self.give_back = None;
                self.pinned_at = None;
                self.threads_set.clear();
                self.moved_at.clear();
            }
            Err(e) => warn!("pin granularity changed, but the pins cannot be given back now: {e}; trying again"),
        }
    }

    /// The re-pack planned now on `snap` (`diagnose --repack`), cooldowns ignored; `None` with
    /// the CPU balancer off.
    pub fn repack_plan(&self, snap: &Snapshot) -> Option<crate::policy::repack::RepackPlan> {
        let pol = self.cfg.cpu.as_ref()?;
        let blocked = self.failures.blocked_pins(snap.t_ns);
        let input = cpu::input_from(snap, &cpu::MovedAt::new(), &HashMap::new(), &blocked, &self.retired(snap), pol);
        Some(crate::repacker::plan_now(&input, pol, &self.cfg.repack))
    }

    /// What the scheduled re-pack and the safeguard did since the start.
    pub fn repack_stats(&self) -> RepackStats {
        self.repacker.stats()
    }

    /// True once connected and until the connection is lost.
    pub fn connected(&self) -> bool {
        self.link == Link::Up
    }

    fn connect(&mut self, now: u64) -> bool {
        let Link::Down { since_ns, next_try_ns, backoff_ns } = self.link else { return true };
        if now < next_try_ns {
            return false;
        }
        let r = self.host.ensure_connected().and_then(|()| self.host.topology());
        match r {
            Ok(topo) => {
                let mc = model_config(&self.cfg, &topo, &self.refused);
                let online: Vec<u32> = topo.cpus.iter().map(|c| c.cpu).collect();
                if since_ns > 0 || backoff_ns > 0 {
                    info!("hypervisor connection is back; resuming after fresh samples");
                } else {
                    info!(
                        "connected; {} cpus online, balancing on {}",
                        online.len(),
                        crate::cpulist::format(&mc.allowed_cpus)
                    );
                }
                self.tracker = Some(Tracker::new(mc, topo));
                self.collector.reset();
                self.last_balloons_ns = None;
                self.mem_steady.clear();
                self.link = Link::Up;
                true
            }
            Err(e) => {
                if backoff_ns == 0 {
                    warn!("cannot reach the hypervisor: {e}; retrying with back-off, acting on nothing meanwhile");
                }
                let quantum = ns(self.cfg.quantum);
                let cap = quantum.saturating_mul(16).min(30_000_000_000);
                let next = if backoff_ns == 0 { quantum } else { backoff_ns.saturating_mul(2).min(cap) };
                self.link = Link::Down { since_ns: since_ns.max(1), next_try_ns: now + next, backoff_ns: next };
                false
            }
        }
    }

    fn disconnect(&mut self, e: &HostError) {
        warn!("{e}; dropping all samples, reconnecting with back-off");
        let now = self.host.now_ns();
        self.link = Link::Down { since_ns: now.max(1), next_try_ns: now, backoff_ns: 0 };
        self.tracker = None;
        self.collector.reset();
        self.advisor.reset();
        self.repacker.reset();
    }

    /// Turns on the balloon statistics period (live) of guests that have a balloon without one.
    fn turn_on_stats_periods(&mut self, snap: &Snapshot) {
        let Some(m) = &self.cfg.mem else { return };
        self.period_set.retain(|n, id| snap.domains.iter().any(|d| &d.dom.name == n && d.dom.id == *id));
        if !m.set_stats_period || self.cfg.dry_run {
            return;
        }
        let period = u32::try_from(m.interval.as_secs()).unwrap_or(u32::MAX).max(1);
        for d in &snap.domains {
            if !d.desc.has_balloon || d.desc.stats_period_s > 0 || d.mem_excluded.is_some() {
                continue;
            }
            if self.period_set.insert(d.dom.name.clone(), d.dom.id).is_some() {
                continue;
            }
            match self.host.set_stats_period(&d.dom, period) {
                Ok(()) => info!("turned on balloon statistics of {} (every {period}s)", d.dom.name),
                Err(e) if e.class() == crate::host::ErrorClass::Permanent => {
                    warn!("cannot turn on balloon statistics of {}: {e}", d.dom.name);
                }
                // A passing failure (its QEMU busy, a timeout): tried again next quantum.
                Err(e) => {
                    debug!("cannot turn on balloon statistics of {} yet: {}", d.dom.name, crate::host::chain(&e));
                    self.period_set.remove(&d.dom.name);
                }
            }
        }
    }

    /// One quantum: sample, plan, act (unless dry-run). Never panics on host data; errors are
    /// logged and the quantum is skipped.
    pub fn step(&mut self) -> StepReport {
        let cpu0 = thread_cpu_us();
        let mut report = self.step_inner();
        report.cpu_us = thread_cpu_us().saturating_sub(cpu0);
        report
    }

    fn step_inner(&mut self) -> StepReport {
        let mut report = StepReport::default();
        let now = self.host.now_ns();
        if !self.connect(now) {
            return report;
        }
        self.give_back_for_new_granularity();
        if let (None, false, Some(p)) = (self.give_back, self.cfg.dry_run, self.cfg.cpu.as_ref()) {
            self.pinned_at = Some(p.granularity);
        }
        let want_balloons =
            self.cfg.mem.as_ref().is_some_and(|m| {
                self.last_balloons_ns.is_none_or(|t| now.saturating_sub(t) + 1_000_000 >= ns(m.interval))
            });
        let read = self.cfg.mem.as_ref().filter(|_| want_balloons).map(|m| crate::collect::BalloonRead {
            quiet_ns: ns(m.quiet_interval),
            interval_ns: ns(m.interval),
            may_carry: &self.mem_steady,
        });
        let raw = match self.collector.sample(&mut self.host, read) {
            Ok(r) => r,
            Err(e) if e.is_disconnect() => {
                self.disconnect(&e);
                return report;
            }
            Err(e) => {
                warn!("sampling failed, skipping this quantum: {e}");
                return report;
            }
        };
        if want_balloons {
            self.last_balloons_ns = Some(now);
        }
        report.balloon_reads = raw.balloon_counts;
        self.follow_hotplug(&raw.host.cpu_ids);
        self.follow_refused();
        let Some(tracker) = self.tracker.as_mut() else { return report };
        let Some(snap) = tracker.ingest(&raw) else { return report };
        self.turn_on_stats_periods(&snap);

        let running: Vec<(String, u32)> = snap.domains.iter().map(|d| (d.dom.name.clone(), d.dom.id)).collect();
        self.failures.expire(&running, snap.t_ns);
        let mut plan: Plan = Vec::new();
        let cpu_input = {
            // The planner's view of the cpus: planned on when the CPU balancer is on, and
            // reported (loads) and advised on either way.
            let default_policy;
            let pol = match &self.cfg.cpu {
                Some(p) => p,
                None => {
                    default_policy = CpuPolicy::default();
                    &default_policy
                }
            };
            let blocked = self.failures.blocked_pins(snap.t_ns);
            self.ever_allowed.extend(snap.host.cpus.iter().copied());
            let retired = self.retired(&snap);
            let input = cpu::input_from(&snap, &self.moved_at, &self.touched_at, &blocked, &retired, pol);
            // Planned on groups of cpus (`--pin-granularity core|llc`): the loads are reported
            // per cpu all the same (the advice reads the groups' loads in cores).
            let per_cpu = (pol.granularity != cpu::Granularity::Cpu).then(|| {
                let p = CpuPolicy { granularity: cpu::Granularity::Cpu, ..pol.clone() };
                cpu::input_from(&snap, &self.moved_at, &self.touched_at, &blocked, &retired, &p)
            });
            report.cpu_loads = cpu::loads(per_cpu.as_ref().unwrap_or(&input));
            if self.cfg.cpu.is_some() {
                if log::log_enabled!(log::Level::Debug) {
                    debug!("cpu loads (fixed + vCPU demand): {}", cpu::describe_loads(&input));
                }
                // A re-pack from scratch ignores cooldowns and settling cpus.
                let fresh = || cpu::input_from(&snap, &cpu::MovedAt::new(), &HashMap::new(), &blocked, &retired, pol);
                // While a re-pack or a rollback is on its way, the balancer goes first, with the
                // run's vCPUs held; the run's next step waits for a quantum it has nothing to do.
                let held = self.repacker.held();
                let first = if held.is_empty() { Vec::new() } else { cpu::plan(&hold(&input, &held), pol) };
                if !first.is_empty() {
                    plan.extend(first);
                } else {
                    match self.repacker.turn(&snap, &input, &fresh, &self.cfg.repack, pol) {
                        Some(step) => plan.extend(step),
                        None => {
                            let moves = cpu::plan(&input, pol);
                            // Consolidation only when the balancer has nothing to do: it always wins.
                            if moves.is_empty() && self.cfg.consolidate {
                                let cores = consolidate::core_groups(&input.cpus, &snap.host.topology);
                                plan.extend(consolidate::plan(&input, &cores, &ConsolidatePolicy::from_cpu(pol)));
                            } else {
                                plan.extend(moves);
                            }
                        }
                    }
                }
            }
            input
        };
        self.threads_set.retain(|n, (id, _)| running.iter().any(|(rn, rid)| rn == n && rid == id));
        if self.cfg.cpu.is_some() && self.cfg.emulator != EmulatorCpus::Off {
            // After the vCPU pins, from where they leave the vCPUs: the threads follow at once.
            let input = emulator::input_from(&snap, &plan, &self.threads_set);
            let mut pins = emulator::plan(&input, &self.cfg.emulator);
            // A thread pin that keeps failing is not planned again; the thread stays where it is.
            pins.retain(|a| self.failures.blocked(a.domain(), &Kind::of(a), snap.t_ns).is_none());
            plan.extend(pins);
        }
        if raw.balloons.is_some()
            && let Some(mp) = self.plan_memory(&snap)
        {
            plan.extend(mp.actions);
            report.mem_verdicts = mp.verdicts;
        }
        report.capacity = Some(self.advisor.observe(&snap, &cpu_input, self.mem.outstanding_kib(), &self.cfg.advice));
        report.blocked = self.failures.list(snap.t_ns);
        report.was_applied = vec![false; plan.len()];
        if !self.cfg.dry_run && !plan.is_empty() {
            let max_age = crate::actuate::max_plan_age_ns(self.cfg.quantum);
            let g = self.cfg.pin_granularity();
            match crate::release::apply_recorded(&mut self.host, &snap, &plan, max_age, g) {
                Ok(outcomes) => {
                    report.stale = crate::actuate::stale_warning(&outcomes);
                    for (k, (a, o)) in plan.iter().zip(&outcomes).enumerate() {
                        let id = snap.domains.iter().find(|d| d.dom.name == a.domain()).map_or(0, |d| d.dom.id);
                        match o {
                            Outcome::Applied => self.failures.succeeded(a.domain(), Kind::of(a)),
                            Outcome::Failed(e) => {
                                let shared =
                                    e.class() == crate::host::ErrorClass::CpuRefused && others_may_run_there(&snap, a);
                                self.failures.failed(a.domain(), id, a, e, snap.t_ns, shared);
                                continue;
                            }
                            Outcome::Gone | Outcome::Stale { .. } => continue,
                        }
                        report.was_applied[k] = true;
                        match a {
                            // A repin starts the vCPU's cooldown and lets both cpus settle. A
                            // placement (the vCPU floated) does neither: it was made on the
                            // least evidence, and the balancer must be free to correct it at once.
                            // (At `--pin-granularity core|llc` a repin is from a group of cpus.)
                            Action::Pin { domain, vcpu, from, to, kind, .. } => {
                                if *kind != PinKind::Placement || from.as_single().is_some() {
                                    self.moved_at.entry(domain.clone()).or_default().insert(*vcpu, snap.t_ns);
                                    for c in from.0.iter().chain(&to.0) {
                                        self.touched_at.insert(*c, snap.t_ns);
                                    }
                                }
                            }
                            Action::Balloon { domain, to_kib, .. } => self.mem.set_target(domain, *to_kib, snap.t_ns),
                            Action::PinThread { domain, thread, to, .. } => {
                                let e = self.threads_set.entry(domain.clone()).or_insert_with(|| (id, HashMap::new()));
                                if e.0 != id {
                                    *e = (id, HashMap::new());
                                }
                                e.1.insert(*thread, to.clone());
                            }
                        }
                    }
                }
                Err(e) => self.disconnect(&e),
            }
        }
        if self.cfg.cpu.is_some() {
            self.repacker.acted(&plan, &report.was_applied, snap.t_ns, self.cfg.dry_run);
            // Moves that did not pay off: their vCPUs cool down longer (the safeguard's back-off).
            for (d, v, until) in self.repacker.take_backoffs() {
                let t = self.moved_at.entry(d).or_default().entry(v).or_insert(until);
                *t = (*t).max(until);
            }
        }
        report.free_cpus = consolidate::free_cpus_after(
            &snap,
            plan.iter().zip(&report.was_applied).filter(|(_, a)| **a).map(|(a, _)| a),
        );
        // Forget cooldowns of vCPUs that no longer exist.
        self.moved_at.retain(|d, _| snap.domains.iter().any(|x| &x.dom.name == d));
        report.plan = plan;
        report.snapshot = Some(snap);
        report
    }
}

/// `input` with the vCPUs `held` (domain, vCPU) not movable.
fn hold(input: &cpu::CpuInput, held: &[(String, u32)]) -> cpu::CpuInput {
    let held: HashSet<(&str, u32)> = held.iter().map(|(d, n)| (d.as_str(), *n)).collect();
    let mut out = input.clone();
    for v in &mut out.vcpus {
        if held.contains(&(&*v.domain, v.vcpu)) {
            v.movable = false;
        }
    }
    out
}

/// How long a stop may wait for the quantum in progress (a libvirt call to a frozen libvirtd
/// can block until its keepalive gives up) before the process exits without it.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `READY=1` goes to systemd at the latest this long after start, connected or not.
pub const READY_WITHOUT_HYPERVISOR: Duration = Duration::from_secs(30);

/// Rate-limits a warning that can repeat every quantum: the first is logged, then at most one
/// summary with a count per `every`.
#[derive(Debug)]
pub struct Repeated {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Repeated {
    pub fn new(every: Duration) -> Self {
        Repeated { every, last: None, suppressed: 0 }
    }

    /// Logs `msg` now, or counts it; returns whether it was logged.
    pub fn warn(&mut self, now: Instant, msg: impl std::fmt::Display) -> bool {
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                false
            }
            _ => {
                if self.suppressed > 0 {
                    warn!("{msg} (and {} more like it since the last such warning)", self.suppressed);
                } else {
                    warn!("{msg}");
                }
                self.last = Some(now);
                self.suppressed = 0;
                true
            }
        }
    }
}

/// One line for systemd's `STATUS=`: what the agent is doing now.
fn status_line<H: Host>(agent: &Agent<H>, report: &StepReport, last_action: &str) -> String {
    if !agent.connected() {
        return "waiting for the hypervisor connection".into();
    }
    let doms = report.snapshot.as_ref().map_or(0, |s| s.domains.len());
    let mode = if agent.config().dry_run { "dry run, " } else { "" };
    let blocked =
        if report.blocked.is_empty() { String::new() } else { format!(", {} action(s) blocked", report.blocked.len()) };
    format!("{mode}{doms} domains{blocked}; last action: {last_action}")
}

/// What the signal thread tells the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Stop(i32),
    Reload,
}

/// New settings on SIGHUP: the agent's configuration and the log level, or why the settings
/// cannot be used (the old ones stay).
pub type Reload<'a> = dyn Fn() -> Result<(AgentConfig, log::LevelFilter), String> + 'a;

/// Runs the daemon loop until SIGTERM or SIGINT; returns after finishing the current step.
/// SIGHUP calls `reload` and applies the new settings from the next quantum on. `metrics`, when
/// given, is updated after each quantum.
///
/// Under systemd (`Type=notify`) it sends `READY=1` once connected, `WATCHDOG=1` at least
/// twice per `WatchdogSec=` while the loop turns, and a `STATUS=` line when it changes. A
/// signal is answered within [`SHUTDOWN_GRACE`] even when a libvirt call hangs.
pub fn run<H: Host>(
    mut agent: Agent<H>,
    reload: &Reload<'_>,
    mut metrics: Option<crate::metrics::Metrics>,
) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let (tx, rx) = mpsc::channel::<Signal>();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut stops = 0;
        for sig in signals.forever() {
            if sig == SIGHUP {
                let _ = tx.send(Signal::Reload);
                continue;
            }
            stops += 1;
            if stops > 1 {
                warn!("second signal {sig}: exiting at once");
                std::process::exit(1);
            }
            let _ = tx.send(Signal::Stop(sig));
            // The loop answers between two quanta; a quantum stuck in a hung libvirt call
            // does not hold the stop up for more than the grace period.
            let _ = std::thread::Builder::new().name("stop-deadline".into()).spawn(|| {
                std::thread::sleep(SHUTDOWN_GRACE);
                warn!("still inside a quantum {SHUTDOWN_GRACE:?} after the stop signal (hung hypervisor call?): exiting without it");
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                std::process::exit(0);
            });
        }
    })?;
    let quantum = agent.config().quantum;
    // Ping the watchdog at least twice per its period, whatever the quantum.
    let watchdog = sd_notify::watchdog_enabled();
    info!(
        "vm-balancer {} starting: quantum {}, {}{}",
        env!("CARGO_PKG_VERSION"),
        humantime::format_duration(quantum),
        if agent.config().dry_run { "dry run (changing nothing)" } else { "applying plans" },
        watchdog.map_or(String::new(), |w| format!(", systemd watchdog {}", humantime::format_duration(w)))
    );
    let (mut quanta, mut cpu_us_total, mut last_summary) = (0u64, 0u64, Instant::now());
    let run_started = Instant::now();
    let mut overran = Repeated::new(Duration::from_secs(60));
    let mut stale = Repeated::new(Duration::from_secs(60));
    let mut advice_log = Announcer::default();
    let (mut ready, mut status, mut last_action) = (false, String::new(), "none yet".to_string());
    loop {
        let quantum = agent.config().quantum;
        let slice = watchdog.map_or(quantum, |w| quantum.min(w / 2)).max(Duration::from_millis(10));
        let started = Instant::now();
        let report = agent.step();
        if let Some(m) = metrics.as_mut() {
            m.observe(&report, agent.connected(), started.elapsed());
        }
        quanta += 1;
        cpu_us_total += report.cpu_us;
        if agent.config().dry_run {
            for a in &report.plan {
                info!("dry run, would {a}");
            }
        }
        if let Some(a) = report.plan.last().filter(|_| report.applied() > 0 || agent.config().dry_run) {
            last_action = a.to_string();
        }
        for v in &report.mem_verdicts {
            debug!("memory: {}: {}: {}", v.name, v.state, v.why);
        }
        for (level, line) in report.capacity.as_ref().map(|c| advice_log.update(c)).unwrap_or_default() {
            match level {
                crate::capacity::Level::Warn => warn!("{line}"),
                crate::capacity::Level::Info => info!("{line}"),
            }
        }
        if let Some(why) = &report.stale {
            stale.warn(Instant::now(), why);
        }
        debug!("quantum took {:?} ({} µs CPU), {} actions", started.elapsed(), report.cpu_us, report.plan.len());
        if last_summary.elapsed() >= Duration::from_secs(300) {
            info!("{} quanta, agent CPU time {} µs per quantum on average", quanta, cpu_us_total / quanta.max(1));
            last_summary = Instant::now();
        }
        let mut notes = vec![sd_notify::NotifyState::Watchdog];
        // Ready once sampling; or, while the hypervisor stays away, after READY_WITHOUT_HYPERVISOR:
        // the agent is up and waiting, and a start must not fail because libvirtd is late.
        if !ready && (report.snapshot.is_some() || run_started.elapsed() >= READY_WITHOUT_HYPERVISOR) {
            ready = true;
            if report.snapshot.is_none() {
                warn!(
                    "no hypervisor connection after {READY_WITHOUT_HYPERVISOR:?}; telling systemd the agent is up and waiting"
                );
            }
            notes.push(sd_notify::NotifyState::Ready);
        }
        let now_status = status_line(&agent, &report, &last_action);
        if now_status != status {
            status = now_status;
            notes.push(sd_notify::NotifyState::Status(&status));
        }
        if let Err(e) = sd_notify::notify(&notes) {
            debug!("cannot notify systemd: {e}");
        }
        let elapsed = started.elapsed();
        if elapsed > quantum {
            overran.warn(Instant::now(), format_args!("quantum overran: took {elapsed:?}, quantum is {quantum:?}"));
        }
        let next = started + quantum;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left.min(slice)) {
                Ok(Signal::Stop(sig)) => {
                    info!("signal {sig}: stopping");
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
                    crate::release::on_stop(&mut agent);
                    return Ok(());
                }
                Ok(Signal::Reload) => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
                    match reload() {
                        Ok((cfg, level)) => {
                            log::set_max_level(level);
                            agent.reconfigure(cfg);
                        }
                        Err(why) => warn!("SIGHUP: keeping the current settings: {why}"),
                    }
                    // Not before the agent's own first READY=1 (once it samples).
                    if ready {
                        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) if left > slice => {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => break,
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }
}

mod cpus;
mod memory;
use cpus::others_may_run_there;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod repack_tests;
