//! The scheduled re-pack and the safeguard in the loop: when `--repack-schedule` comes due,
//! plan a re-pack ([`crate::policy::repack`]) and apply it a step per quantum; watch it, and
//! every balancing move set, with the [`Safeguard`]; roll back what did not pay off.
//!
//! A run (a re-pack's or a rollback's steps) moves a step per quantum while the balancer has
//! nothing to do: in a quantum where the balancer, with the run's vCPUs held where they are,
//! has moves to make (an overload came up), those go first and the run waits. So the two never
//! pull the same vCPU two ways, and the balancer stays as quick as without a run. A run
//! is dropped, with a warning, when the set of domains changes, when a vCPU is no longer where
//! its next step expects it, or when a step fails. Kept in the agent between quanta; the
//! decisions are the pure planner's and the safeguard's.

use std::collections::VecDeque;

use log::{debug, info, warn};
use serde::Serialize;

use crate::model::Snapshot;
use crate::policy::cpu::{CpuInput, CpuPolicy};
use crate::policy::repack::{self, RepackPlan, RepackPolicy};
use crate::policy::{Action, PinKind, Plan};
use crate::safeguard::{Figure, Moved, Origin, Safeguard, SafeguardConfig, names};
use crate::schedule::{Schedule, Timer};

/// The re-pack's settings, from the flags.
#[derive(Debug, Clone, PartialEq)]
pub struct RepackConfig {
    /// `--repack-schedule`; `None`: never (the safeguard still watches balancing moves).
    pub schedule: Option<Schedule>,
    /// `--repack-min-gain`, cores.
    pub min_gain: f64,
}

/// What the re-pack and the safeguard did since the start (the simulator reports these).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RepackStats {
    /// Scheduled times reached.
    pub scheduled: u64,
    /// Of those, re-packs whose gain was below `--repack-min-gain`: nothing applied.
    pub below_gain: u64,
    /// Re-packs started, applied to the end, dropped on the way.
    pub started: u64,
    pub completed: u64,
    pub dropped: u64,
    /// Completed re-packs the safeguard kept, and rolled back.
    pub repack_kept: u64,
    pub repack_rolled_back: u64,
    /// Balancing move sets the safeguard judged, and rolled back.
    pub balancing_judged: u64,
    pub balancing_rolled_back: u64,
    /// Pins applied by re-packs, and by rollbacks.
    pub repack_pins: u64,
    pub rollback_pins: u64,
}

impl RepackStats {
    /// The sum of several runs' (the simulator's seeds).
    pub fn sum(all: impl Iterator<Item = RepackStats>) -> RepackStats {
        all.fold(RepackStats::default(), |a, b| RepackStats {
            scheduled: a.scheduled + b.scheduled,
            below_gain: a.below_gain + b.below_gain,
            started: a.started + b.started,
            completed: a.completed + b.completed,
            dropped: a.dropped + b.dropped,
            repack_kept: a.repack_kept + b.repack_kept,
            repack_rolled_back: a.repack_rolled_back + b.repack_rolled_back,
            balancing_judged: a.balancing_judged + b.balancing_judged,
            balancing_rolled_back: a.balancing_rolled_back + b.balancing_rolled_back,
            repack_pins: a.repack_pins + b.repack_pins,
            rollback_pins: a.rollback_pins + b.rollback_pins,
        })
    }
}

/// A re-pack or a rollback on its way.
#[derive(Debug)]
struct Run {
    kind: PinKind,
    steps: VecDeque<Vec<Action>>,
    /// The domains (name, id) when it was planned.
    domains: Vec<(String, u32)>,
    /// What it moves: the safeguard's watch once it is done.
    moved: Vec<Moved>,
    /// Its front step is this quantum's plan.
    in_flight: bool,
}

impl Run {
    fn what(&self) -> &'static str {
        if self.kind == PinKind::Repack { "re-pack" } else { "rollback" }
    }
}

/// The loop's re-pack and safeguard state.
#[derive(Debug, Default)]
pub struct Repacker {
    timer: Timer,
    /// The schedule the timer was computed for.
    schedule_text: Option<String>,
    run: Option<Run>,
    guard: Safeguard,
    stats: RepackStats,
    /// (domain, vCPU, until ns): cooldowns the safeguard lengthened, for the loop to apply.
    backoffs: Vec<(String, u32, u64)>,
}

/// The safeguard's settings from the CPU balancer's: judged over its settle time, rolled back
/// when worse by more than `--min-gain` (what a repin must gain), backed off in cooldowns.
pub fn guard_config(pol: &CpuPolicy) -> SafeguardConfig {
    SafeguardConfig {
        settle_ns: pol.settle_ns,
        margin: pol.min_gain,
        high: pol.high,
        peak_limit: pol.peak_limit,
        cooldown_ns: pol.cooldown_ns,
    }
}

fn domain_set(snap: &Snapshot) -> Vec<(String, u32)> {
    let mut d: Vec<(String, u32)> = snap.domains.iter().map(|d| (d.dom.name.clone(), d.dom.id)).collect();
    d.sort();
    d
}

/// What a pin moves: from one cpu to another.
fn moved_of(a: &Action) -> Option<Moved> {
    match a {
        Action::Pin { domain, vcpu, from, to, .. } => {
            Some(Moved { domain: domain.clone(), vcpu: *vcpu, before: from.as_single()?, after: to.as_single()? })
        }
        Action::Balloon { .. } | Action::PinThread { .. } => None,
    }
}

/// The moves of a list of steps.
fn moved_by(steps: &[Vec<Action>]) -> Vec<Moved> {
    steps.iter().flatten().filter_map(moved_of).collect()
}

impl Repacker {
    /// What the re-pack and the safeguard did so far.
    pub fn stats(&self) -> RepackStats {
        self.stats
    }

    /// Forgets the run and the watches (a lost connection: nothing old is trusted).
    pub fn reset(&mut self) {
        self.run = None;
        self.guard.clear();
    }

    /// Cooldowns to lengthen: (domain, vCPU, moved-at time in ns to record, in the future).
    pub fn take_backoffs(&mut self) -> Vec<(String, u32, u64)> {
        std::mem::take(&mut self.backoffs)
    }

    /// Before the balancer plans: the next step of a run, a rollback the safeguard asks for, or
    /// the scheduled re-pack when it is due. `Some(pins)` takes the quantum's CPU turn.
    /// `fresh` builds the planner's input with cooldowns ignored (for a re-pack).
    pub fn turn(
        &mut self,
        snap: &Snapshot,
        input: &CpuInput,
        fresh: &dyn Fn() -> CpuInput,
        cfg: &RepackConfig,
        pol: &CpuPolicy,
    ) -> Option<Plan> {
        let text = cfg.schedule.as_ref().map(ToString::to_string);
        if text != self.schedule_text {
            self.timer.reset();
            self.schedule_text = text;
        }
        let fired = cfg.schedule.as_ref().filter(|s| self.timer.due(s, snap.epoch_s));
        if fired.is_some() {
            self.stats.scheduled += 1;
        }
        if let Some(run) = self.run.as_mut() {
            if let Some(s) = fired {
                info!("scheduled re-pack ({s}): skipped, a {} is still on its way", run.what());
            }
            match next_step(run, snap) {
                Ok(step) => {
                    run.in_flight = true;
                    return Some(step);
                }
                Err(why) => {
                    warn!("{} dropped after {} step(s) left: {why}", run.what(), run.steps.len());
                    if run.kind == PinKind::Repack {
                        self.stats.dropped += 1;
                    }
                    self.run = None;
                    return None;
                }
            }
        }
        let gcfg = guard_config(pol);
        let mut back: Vec<Moved> = Vec::new();
        let mut why = Vec::new();
        for v in self.guard.observe(input, snap.t_ns, &gcfg) {
            match (v.origin, v.roll_back) {
                (Origin::Repack, true) => self.stats.repack_rolled_back += 1,
                (Origin::Repack, false) => self.stats.repack_kept += 1,
                (Origin::Balancing, rb) => {
                    self.stats.balancing_judged += 1;
                    self.stats.balancing_rolled_back += u64::from(rb);
                }
            }
            if v.origin == Origin::Balancing && v.worse_by > 0.0 {
                for m in &v.moves {
                    let extra = self.guard.backoff_ns(&m.domain, m.vcpu, &gcfg);
                    self.backoffs.push((m.domain.clone(), m.vcpu, snap.t_ns.saturating_add(extra)));
                }
            }
            let line = format!(
                "the {} of {} left the {} {:.2} cores {} than the old pins would on the same demand",
                v.origin,
                names(&v.moves),
                v.figure,
                v.worse_by.abs(),
                if v.worse_by > 0.0 { "higher" } else { "lower" }
            );
            if v.roll_back {
                warn!("safeguard: rolling back: {line} (margin --min-gain {:.2})", gcfg.margin);
                why.push(format!("{} worse by {:.2} cores", v.origin, v.worse_by));
                back.extend(v.moves);
            } else if v.origin == Origin::Repack {
                info!("safeguard: re-pack kept: {line}");
            } else {
                debug!("safeguard: kept: {line}");
            }
        }
        if !back.is_empty() {
            let steps = rollback_steps(input, &back, pol, &why.join("; "));
            if let Some(first) = self.start(PinKind::Rollback, steps, snap) {
                return Some(first);
            }
        }
        let s = fired?;
        let p = repack::plan(&fresh(), &RepackPolicy::new(pol, cfg.min_gain));
        let at = s.local_time(snap.epoch_s);
        if !p.worth_it {
            self.stats.below_gain += 1;
            info!(
                "scheduled re-pack ({s}) at {at}: cost {:.2} -> {:.2} cores, gain {:.2} below --repack-min-gain {:.2}: nothing applied",
                p.cost_before, p.cost_after, p.gain, p.min_gain
            );
            return None;
        }
        info!(
            "scheduled re-pack ({s}) at {at}: cost {:.2} -> {:.2} cores (gain {:.2}, --repack-min-gain {:.2}): {} pins in {} step(s)",
            p.cost_before,
            p.cost_after,
            p.gain,
            p.min_gain,
            p.moves(),
            p.steps.len()
        );
        self.guard.clear();
        self.stats.started += 1;
        self.start(PinKind::Repack, p.steps, snap)
    }

    /// Starts a run; returns its first step.
    fn start(&mut self, kind: PinKind, steps: Vec<Vec<Action>>, snap: &Snapshot) -> Option<Plan> {
        let first = steps.first()?.clone();
        let moved = moved_by(&steps);
        self.run = Some(Run { kind, steps: steps.into(), domains: domain_set(snap), moved, in_flight: true });
        Some(first)
    }

    /// After acting on the quantum's plan: advances the run whose step it held, or starts
    /// watching the balancing moves applied.
    pub fn acted(&mut self, plan: &[Action], applied: &[bool], t_ns: u64, dry_run: bool) {
        if let Some(run) = self.run.as_mut().filter(|r| r.in_flight) {
            run.in_flight = false;
            let n = run.steps.front().map_or(0, Vec::len);
            if dry_run {
                debug!("dry run: the {} stops after its first step", run.what());
                self.run = None;
                return;
            }
            // The step's pins come first in the plan.
            if applied.len() < n || !applied[..n].iter().all(|&a| a) {
                warn!("{} dropped: a pin of its step was not applied", run.what());
                if run.kind == PinKind::Repack {
                    self.stats.dropped += 1;
                }
                self.run = None;
                return;
            }
            let pins = n as u64;
            if run.kind == PinKind::Repack {
                self.stats.repack_pins += pins;
            } else {
                self.stats.rollback_pins += pins;
            }
            run.steps.pop_front();
            if run.steps.is_empty() {
                let Some(run) = self.run.take() else { return };
                if run.kind == PinKind::Repack {
                    self.stats.completed += 1;
                    info!("re-pack done: {} vCPUs moved; the safeguard watches it", run.moved.len());
                    self.guard.watch(Origin::Repack, Figure::Cost, run.moved, t_ns);
                } else {
                    info!("rollback done: {} vCPUs back on their old cpus", run.moved.len());
                }
            }
            return;
        }
        // Balancing moves and swaps promised a less busy cpu; peak-safety moves, lower peaks.
        for (figure, kinds) in [
            (Figure::BusiestLoad, &[PinKind::Move, PinKind::Swap][..]),
            (Figure::PeakExcess, &[PinKind::PeakSafety][..]),
        ] {
            let moves: Vec<Moved> = plan
                .iter()
                .zip(applied)
                .filter(|(a, ok)| **ok && matches!(a, Action::Pin { kind, .. } if kinds.contains(kind)))
                .filter_map(|(a, _)| moved_of(a))
                .collect();
            self.guard.watch(Origin::Balancing, figure, moves, t_ns);
        }
    }

    /// Sets of moves being watched.
    pub fn watching(&self) -> usize {
        self.guard.watching()
    }

    /// True while a re-pack or a rollback is on its way.
    pub fn running(&self) -> bool {
        self.run.is_some()
    }

    /// The vCPUs (domain, vCPU) a run on its way still has to move: the balancer holds them.
    pub fn held(&self) -> Vec<(String, u32)> {
        let Some(run) = &self.run else { return Vec::new() };
        run.steps
            .iter()
            .flatten()
            .filter_map(|a| match a {
                Action::Pin { domain, vcpu, .. } => Some((domain.clone(), *vcpu)),
                Action::Balloon { .. } | Action::PinThread { .. } => None,
            })
            .collect()
    }
}

/// The front step of a run, if it still applies to the host in `snap`.
fn next_step(run: &Run, snap: &Snapshot) -> Result<Vec<Action>, String> {
    if run.domains != domain_set(snap) {
        return Err("the set of domains changed".into());
    }
    let step = run.steps.front().ok_or_else(|| "no step left".to_string())?;
    for a in step {
        if let Action::Pin { domain, vcpu, from, .. } = a {
            let now = snap
                .domains
                .iter()
                .find(|d| &d.dom.name == domain)
                .and_then(|d| d.vcpus.iter().find(|v| v.id == *vcpu))
                .map(|v| &v.pinned_to);
            if now != Some(from) {
                return Err(format!("vCPU {vcpu} of {domain} is no longer on cpus {from}"));
            }
        }
    }
    Ok(step.clone())
}

/// The steps that put `back`'s vCPUs on their `before` cpus again.
fn rollback_steps(input: &CpuInput, back: &[Moved], pol: &CpuPolicy, why: &str) -> Vec<Vec<Action>> {
    let now = repack::current(input);
    let mut to = now.clone();
    for m in back {
        let i = input.vcpus.iter().position(|v| *v.domain == *m.domain && v.vcpu == m.vcpu);
        let c = input.cpus.iter().position(|c| c.id == m.before);
        if let (Some(i), Some(c)) = (i, c) {
            to[i] = Some(c);
        }
    }
    let rpol = RepackPolicy::new(pol, 0.0);
    repack::order_steps(input, &now, &to, &rpol, PinKind::Rollback, &|_, from, dest, k, n| {
        format!("rollback (step {k} of {n}): back from cpu {from} to cpu {dest}: {why}")
    })
}

/// The re-pack `diagnose --repack` shows: planned now on `input` (cooldowns ignored).
pub fn plan_now(input: &CpuInput, pol: &CpuPolicy, cfg: &RepackConfig) -> RepackPlan {
    repack::plan(input, &RepackPolicy::new(pol, cfg.min_gain))
}
