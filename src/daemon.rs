//! The quantum loop: sample → model → plan → act, with reconnects and signals.
//!
//! [`Agent::step`] is one quantum; the daemon, `diagnose` and the simulator all drive the same
//! `Agent`, over the libvirt host or the simulated one.

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};

use crate::actuate::{self, Outcome};
use crate::cli::Common;
use crate::collect::Collector;
use crate::host::{Host, HostError};
use crate::memctl::{MemTiming, MemTracker};
use crate::model::{ModelConfig, Snapshot, Tracker};
use crate::policy::cpu::{self, CpuPolicy};
use crate::policy::mem::{self, MemPolicy, Verdict};
use crate::policy::{Action, Plan};

/// Everything the agent is told by its flags.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub quantum: Duration,
    pub smoothing: Duration,
    /// Window of each vCPU's peak demand.
    pub peak_window: Duration,
    /// `None`: all online cpus.
    pub cpus: Option<Vec<u32>>,
    pub exclude: Vec<String>,
    pub cpu: Option<CpuPolicy>,
    pub mem: Option<MemConfig>,
    /// Change nothing; plans are still made and reported.
    pub dry_run: bool,
}

impl AgentConfig {
    /// The agent's configuration from its flags: the one place flags become policy.
    pub fn from_flags(c: &Common, dry_run: bool) -> Self {
        AgentConfig {
            quantum: c.quantum,
            smoothing: c.smoothing,
            peak_window: c.peak_window,
            cpus: c.cpus.clone(),
            exclude: c.exclude.clone(),
            cpu: (!c.no_cpu).then(|| CpuPolicy {
                high: c.high,
                min_gain: c.min_gain,
                max_repins: c.max_repins,
                flip_margin: c.flip_margin,
                // Two smoothing time constants: the moving averages have absorbed ~86% of the change.
                settle_ns: ns(c.smoothing).saturating_mul(2),
                cooldown_ns: ns(c.cooldown),
                peak_limit: c.peak_limit,
                ..CpuPolicy::default()
            }),
            mem: (!c.no_memory).then(|| MemConfig {
                policy: MemPolicy {
                    floor_kib: c.guest_floor,
                    host_reserve_kib: c.host_reserve,
                    reclaim_above: c.reclaim_above,
                    starve_below: c.starve_below,
                    step_kib: c.mem_step,
                    grant_step_kib: c.mem_step.saturating_mul(4),
                    ..MemPolicy::default()
                },
                timing: MemTiming {
                    min_age_ns: ns(c.min_age),
                    cooldown_ns: ns(c.mem_cooldown),
                    // A balloon moves hundreds of MiB per second; a guest that has not followed
                    // after several stats intervals is not going to soon.
                    target_timeout_ns: ns(c.mem_interval * 4).max(20_000_000_000),
                    backoff_ns: 300_000_000_000,
                    reclaim_window_ns: ns(c.reclaim_window),
                    // A grant the host has not paid for yet counts against the budget a day at
                    // most (memctl/credit.rs: shorter timeouts broke the reserve in the simulator).
                    credit_timeout_ns: 86_400_000_000_000,
                },
                interval: c.mem_interval,
                set_stats_period: !c.no_stats_period,
            }),
            dry_run,
        }
    }
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The memory balancer's configuration.
#[derive(Debug, Clone)]
pub struct MemConfig {
    pub policy: MemPolicy,
    pub timing: MemTiming,
    /// Cadence of the bulk balloon statistics call (and so of memory plans).
    pub interval: Duration,
    /// Turn on the balloon stats period of guests that have a balloon but no period.
    pub set_stats_period: bool,
}

/// What one quantum did.
#[derive(Debug, Default)]
pub struct StepReport {
    /// The snapshot the plan was made from; `None` when there was no fresh data.
    pub snapshot: Option<Snapshot>,
    pub plan: Plan,
    /// The memory planner's verdict on each guest, on quanta with fresh balloon statistics.
    pub mem_verdicts: Vec<Verdict>,
    /// Number of actions applied.
    pub applied: usize,
    /// Agent CPU time spent in this step, µs (user + system, this thread).
    pub cpu_us: u64,
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
    /// Domains (name, runtime id) whose stats period the agent turned on (or tried to).
    period_set: HashMap<String, u32>,
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
        Agent {
            host,
            cfg,
            collector: Collector::new(),
            tracker: None,
            link: Link::Down { since_ns: 0, next_try_ns: 0, backoff_ns: 0 },
            moved_at: HashMap::new(),
            touched_at: HashMap::new(),
            mem: MemTracker::new(),
            last_balloons_ns: None,
            period_set: HashMap::new(),
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
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
                let online: Vec<u32> = topo.cpus.iter().map(|c| c.cpu).collect();
                let allowed: Vec<u32> = match &self.cfg.cpus {
                    Some(want) => want.iter().copied().filter(|c| online.contains(c)).collect(),
                    None => online.clone(),
                };
                if allowed.is_empty() {
                    error!("none of the cpus given by --cpus is online (online: {})", crate::cpulist::format(&online));
                }
                if since_ns > 0 || backoff_ns > 0 {
                    info!("hypervisor connection is back; resuming after fresh samples");
                } else {
                    info!("connected; {} cpus online, balancing on {}", online.len(), crate::cpulist::format(&allowed));
                }
                let mc = ModelConfig {
                    smoothing_ns: u64::try_from(self.cfg.smoothing.as_nanos()).unwrap_or(u64::MAX),
                    peak_ns: u64::try_from(self.cfg.peak_window.as_nanos()).unwrap_or(u64::MAX),
                    allowed_cpus: allowed,
                    exclude: self.cfg.exclude.clone(),
                };
                self.tracker = Some(Tracker::new(mc, topo));
                self.collector.reset();
                self.last_balloons_ns = None;
                self.link = Link::Up;
                true
            }
            Err(e) => {
                if backoff_ns == 0 {
                    warn!("cannot reach the hypervisor: {e}; retrying with back-off, acting on nothing meanwhile");
                }
                let quantum = u64::try_from(self.cfg.quantum.as_nanos()).unwrap_or(u64::MAX);
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
                Err(e) => warn!("cannot turn on balloon statistics of {}: {e}", d.dom.name),
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
        let want_balloons = self.cfg.mem.as_ref().is_some_and(|m| {
            self.last_balloons_ns.is_none_or(|t| {
                now.saturating_sub(t) + 1_000_000 >= u64::try_from(m.interval.as_nanos()).unwrap_or(u64::MAX)
            })
        });
        let raw = match self.collector.sample(&mut self.host, want_balloons) {
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
        let Some(tracker) = self.tracker.as_mut() else { return report };
        let Some(snap) = tracker.ingest(&raw) else { return report };
        self.turn_on_stats_periods(&snap);

        let mut plan: Plan = Vec::new();
        if let Some(pol) = &self.cfg.cpu {
            let input = cpu::input_from(&snap, &self.moved_at, &self.touched_at, pol);
            plan.extend(cpu::plan(&input, pol));
        }
        if let (Some(m), true) = (&self.cfg.mem, raw.balloons.is_some()) {
            let (guests, host) = self.mem.input(&snap, &m.timing);
            let mp = mem::plan(&guests, &host, &m.policy);
            plan.extend(mp.actions);
            report.mem_verdicts = mp.verdicts;
        }
        if !self.cfg.dry_run && !plan.is_empty() {
            match actuate::apply(&mut self.host, &snap, &plan) {
                Ok(outcomes) => {
                    for (a, o) in plan.iter().zip(&outcomes) {
                        if !matches!(o, Outcome::Applied) {
                            continue;
                        }
                        report.applied += 1;
                        match a {
                            // A repin starts the vCPU's cooldown and lets both cpus settle. A
                            // placement (the vCPU floated) does neither: it was made on the
                            // least evidence, and the balancer must be free to correct it at once.
                            Action::Pin { domain, vcpu, from, to, .. } => {
                                if let Some(src) = from.as_single() {
                                    self.moved_at.entry(domain.clone()).or_default().insert(*vcpu, snap.t_ns);
                                    for c in std::iter::once(&src).chain(&to.0) {
                                        self.touched_at.insert(*c, snap.t_ns);
                                    }
                                }
                            }
                            Action::Balloon { domain, to_kib, .. } => self.mem.set_target(domain, *to_kib, snap.t_ns),
                        }
                    }
                }
                Err(e) => self.disconnect(&e),
            }
        }
        // Forget cooldowns of vCPUs that no longer exist.
        self.moved_at.retain(|d, _| snap.domains.iter().any(|x| &x.dom.name == d));
        report.plan = plan;
        report.snapshot = Some(snap);
        report
    }
}

/// Runs the daemon loop until SIGTERM or SIGINT; returns after finishing the current step.
pub fn run<H: Host>(mut agent: Agent<H>) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<i32>();
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut count = 0;
        for sig in signals.forever() {
            count += 1;
            if count > 1 {
                eprintln!("second signal {sig}: exiting at once");
                std::process::exit(1);
            }
            let _ = tx.send(sig);
        }
    })?;
    let quantum = agent.config().quantum;
    info!(
        "vm-balancer {} starting: quantum {}, {}",
        env!("CARGO_PKG_VERSION"),
        humantime::format_duration(quantum),
        if agent.config().dry_run { "dry run (changing nothing)" } else { "applying plans" }
    );
    let (mut quanta, mut cpu_us_total, mut last_summary) = (0u64, 0u64, Instant::now());
    loop {
        let started = Instant::now();
        let report = agent.step();
        quanta += 1;
        cpu_us_total += report.cpu_us;
        if agent.config().dry_run {
            for a in &report.plan {
                info!("dry run, would {a}");
            }
        }
        for v in &report.mem_verdicts {
            debug!("memory: {}: {}: {}", v.name, v.state, v.why);
        }
        debug!("quantum took {:?} ({} µs CPU), {} actions", started.elapsed(), report.cpu_us, report.plan.len());
        if last_summary.elapsed() >= Duration::from_secs(300) {
            info!("{} quanta, agent CPU time {} µs per quantum on average", quanta, cpu_us_total / quanta.max(1));
            last_summary = Instant::now();
        }
        let elapsed = started.elapsed();
        if elapsed > quantum {
            warn!("quantum overran: took {elapsed:?}, quantum is {quantum:?}");
        }
        match rx.recv_timeout(quantum.saturating_sub(elapsed)) {
            Ok(sig) => {
                info!("signal {sig}: stopping");
                return Ok(());
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}
