//! The scheduled re-pack: a placement of every movable vCPU computed from scratch, applied only
//! when it pays off, in steps a quantum apart.
//!
//! The balancer ([`crate::policy::cpu`]) makes one move or swap at a time, each of which must
//! pay off on its own; it can stop in a placement that only a rearrangement of several vCPUs
//! improves (two busy vCPUs that each need a partner swapped out). A re-pack looks at all of
//! them at once:
//!
//! - **Cost** of a placement, in cores: Σ over cpus of the load above `--high` plus Σ of the
//!   peaks above `--peak-limit` (load = fixed load + the smoothed demand of the vCPUs pinned
//!   there; peaks = fixed load + their recent peaks). It is 0 for a placement with nothing to
//!   gain, and the **gain** of a re-pack is the cost now minus the cost after it. A re-pack is
//!   applied only when the gain reaches `--repack-min-gain`.
//! - **Target**: longest processing time first: movable vCPUs by demand (then peak), each onto
//!   the cpu where it adds the least cost, among those the least loaded (within `about_equal`):
//!   the vCPU's own cpu (no move), the one holding the fewest vCPUs of its guest (siblings get
//!   busy together), one in its NUMA node, the lowest peaks. Then single moves that lower the
//!   cost, and every move that the cost does not need is undone (fewest repins). If the result
//!   is not cheaper than the placement now, the placement now is the target: a re-pack is never
//!   worse by its own measure.
//! - **Steps**: at most `max_repins` pins per quantum. A step's moves are chosen so that after
//!   it no cpu holds more load (or peaks) than the most of its load at the start, its load at
//!   the end, and `--high` (`--peak-limit`): moves onto cpus with room first. When no single
//!   move fits (a cycle: every target is full until its own vCPU leaves), the step follows the
//!   cycle, moving out of the cpus it overfilled, up to `max_repins` pins; only a cycle longer
//!   than that leaves a cpu over its bound between two steps.
//!
//! Pure: no I/O, no clock. Input is the balancer's own [`CpuInput`], built by the daemon with
//! cooldowns ignored (a re-pack is a placement from scratch, not a balancing move).

use serde::Serialize;

use crate::host::CpuSet;
use crate::policy::cpu::{CpuInput, CpuPolicy};
use crate::policy::{Action, PinKind};

const EPS: f64 = 1e-9;
/// Passes of single improving moves after the first placement.
const IMPROVE_PASSES: usize = 4;

/// Tunables of the re-pack, from the balancer's and its own flags.
#[derive(Debug, Clone, PartialEq)]
pub struct RepackPolicy {
    pub high: f64,
    pub peak_limit: f64,
    /// `--repack-min-gain`: the least drop of the cost, in cores, worth a re-pack.
    pub min_gain: f64,
    /// Most pins per step (quantum).
    pub max_repins: usize,
    /// Loads closer than this count as equal, cores.
    pub about_equal: f64,
}

impl RepackPolicy {
    pub fn new(cpu: &CpuPolicy, min_gain: f64) -> Self {
        RepackPolicy {
            high: cpu.high,
            peak_limit: cpu.peak_limit,
            min_gain,
            max_repins: cpu.max_repins,
            about_equal: cpu.about_equal,
        }
    }
}

/// A re-pack: its figures and its steps.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RepackPlan {
    /// Cost of the placement now, cores.
    pub cost_before: f64,
    /// Cost of the target placement, cores (never above `cost_before`).
    pub cost_after: f64,
    /// `cost_before - cost_after`.
    pub gain: f64,
    pub min_gain: f64,
    /// True when the gain reaches `min_gain` and there is something to move.
    pub worth_it: bool,
    /// The pins (kind `repack`), one list per quantum, in order.
    pub steps: Vec<Vec<Action>>,
}

impl RepackPlan {
    /// Number of pins over all steps.
    pub fn moves(&self) -> usize {
        self.steps.iter().map(Vec::len).sum()
    }
}

fn excess(x: f64, limit: f64) -> f64 {
    (x - limit).max(0.0)
}

/// Loads and peak loads of each cpu with vCPU `i` on `at[i]`.
pub fn loads(input: &CpuInput, at: &[Option<usize>]) -> (Vec<f64>, Vec<f64>) {
    let mut load: Vec<f64> = input.cpus.iter().map(|c| c.fixed).collect();
    let mut peak = load.clone();
    for (v, c) in input.vcpus.iter().zip(at) {
        if let Some(c) = *c {
            load[c] += v.demand;
            peak[c] += v.peak;
        }
    }
    (load, peak)
}

fn total(load: &[f64], peak: &[f64], high: f64, peak_limit: f64) -> f64 {
    load.iter().map(|&l| excess(l, high)).sum::<f64>() + peak.iter().map(|&p| excess(p, peak_limit)).sum::<f64>()
}

/// The cost of a placement (`at[i]`: the cpu index of vCPU `i`, `None` floating), cores: load
/// above `high` plus peaks above `peak_limit`, summed over cpus.
pub fn cost(input: &CpuInput, at: &[Option<usize>], high: f64, peak_limit: f64) -> f64 {
    let (load, peak) = loads(input, at);
    total(&load, &peak, high, peak_limit)
}

/// The placement now: each vCPU on the cpu it is pinned to.
pub fn current(input: &CpuInput) -> Vec<Option<usize>> {
    input.vcpus.iter().map(|v| v.cpu).collect()
}

/// The re-pack of `input`: its target, gain and steps.
pub fn plan(input: &CpuInput, pol: &RepackPolicy) -> RepackPlan {
    let now = current(input);
    let cost_before = cost(input, &now, pol.high, pol.peak_limit);
    let mut to = target(input, pol);
    let mut cost_after = cost(input, &to, pol.high, pol.peak_limit);
    // Nothing may move (`--max-repins 0`), or nothing cheaper was found: the placement now.
    if pol.max_repins == 0 || cost_after > cost_before - EPS {
        to.clone_from(&now);
        cost_after = cost_before;
    }
    let gain = cost_before - cost_after;
    let moved = (0..now.len()).filter(|&i| to[i] != now[i]).count();
    let worth_it = moved > 0 && pol.max_repins > 0 && gain >= pol.min_gain - EPS;
    let steps = order_steps(input, &now, &to, pol, PinKind::Repack, &|v, from, to_cpu, k, n| {
        format!(
            "re-pack (step {k} of {n}): vCPU demand {:.0}%, peak {:.0}%, cpu {from} -> {to_cpu}; cost {cost_before:.2} -> {cost_after:.2} cores (gain {gain:.2}, --repack-min-gain {:.2})",
            v.demand * 100.0,
            v.peak * 100.0,
            pol.min_gain
        )
    });
    RepackPlan { cost_before, cost_after, gain, min_gain: pol.min_gain, worth_it, steps }
}

/// The target placement (see the module comment).
fn target(input: &CpuInput, pol: &RepackPolicy) -> Vec<Option<usize>> {
    let now = current(input);
    let n = input.cpus.len();
    if n == 0 {
        return now;
    }
    let movable = |i: usize| input.vcpus[i].movable && now[i].is_some();
    let mut at: Vec<Option<usize>> = (0..now.len()).map(|i| if movable(i) { None } else { now[i] }).collect();
    let (mut load, mut peak) = loads(input, &at);
    let mut order: Vec<usize> = (0..now.len()).filter(|&i| movable(i)).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&input.vcpus[a], &input.vcpus[b]);
        y.demand.total_cmp(&x.demand).then(y.peak.total_cmp(&x.peak)).then(a.cmp(&b))
    });
    let added = |load: &[f64], peak: &[f64], c: usize, d: f64, p: f64| {
        excess(load[c] + d, pol.high) - excess(load[c], pol.high) + excess(peak[c] + p, pol.peak_limit)
            - excess(peak[c], pol.peak_limit)
    };
    for &i in &order {
        let v = &input.vcpus[i];
        let home = now[i].unwrap_or(0);
        let least_added = (0..n).map(|c| added(&load, &peak, c, v.demand, v.peak)).fold(f64::INFINITY, f64::min);
        let cands: Vec<usize> =
            (0..n).filter(|&c| added(&load, &peak, c, v.demand, v.peak) <= least_added + EPS).collect();
        let least = cands.iter().map(|&c| load[c]).fold(f64::INFINITY, f64::min);
        let siblings =
            |c: usize| (0..at.len()).filter(|&j| at[j] == Some(c) && input.vcpus[j].domain == v.domain).count();
        let c = cands
            .iter()
            .copied()
            .filter(|&c| load[c] <= least + pol.about_equal + EPS)
            .min_by(|&a, &b| {
                let key = |c: usize| (c != home, siblings(c), input.cpus[c].node != input.cpus[home].node);
                key(a).cmp(&key(b)).then(peak[a].total_cmp(&peak[b])).then(load[a].total_cmp(&load[b])).then(a.cmp(&b))
            })
            .unwrap_or(home);
        at[i] = Some(c);
        load[c] += v.demand;
        peak[c] += v.peak;
    }
    // Single moves that lower the cost.
    for _ in 0..IMPROVE_PASSES {
        let mut improved = false;
        for &i in &order {
            let v = &input.vcpus[i];
            let Some(src) = at[i] else { continue };
            let removed = added(&load, &peak, src, -v.demand, -v.peak);
            let best = (0..n)
                .filter(|&c| c != src)
                .map(|c| (c, removed + added(&load, &peak, c, v.demand, v.peak)))
                .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
            if let Some((c, _)) = best.filter(|&(_, d)| d < -EPS) {
                load[src] -= v.demand;
                peak[src] -= v.peak;
                load[c] += v.demand;
                peak[c] += v.peak;
                at[i] = Some(c);
                improved = true;
            }
        }
        if !improved {
            break;
        }
    }
    // Undo every move the cost does not need, heaviest first (a heavy vCPU keeps its cache),
    // again while one undo makes room for another.
    for _ in 0..IMPROVE_PASSES {
        let mut undone = false;
        for &i in &order {
            let (Some(home), Some(c)) = (now[i], at[i]) else { continue };
            if home == c {
                continue;
            }
            let v = &input.vcpus[i];
            // `home` is another cpu than `c`: the two changes add up.
            let delta = added(&load, &peak, c, -v.demand, -v.peak) + added(&load, &peak, home, v.demand, v.peak);
            if delta <= EPS {
                load[c] -= v.demand;
                peak[c] -= v.peak;
                load[home] += v.demand;
                peak[home] += v.peak;
                at[i] = Some(home);
                undone = true;
            }
        }
        if !undone {
            break;
        }
    }
    at
}

/// The pin of vCPU `i` from its cpu now to `to`, for a step's reason.
type Reason<'a> = dyn Fn(&crate::policy::cpu::VcpuSlot, u32, u32, usize, usize) -> String + 'a;

/// Orders the moves from `now` to `to` into steps of at most `max_repins` pins (see the module
/// comment), as pins of `kind`; `reason(vcpu, from cpu, to cpu, step, steps)` explains each.
pub fn order_steps(
    input: &CpuInput,
    now: &[Option<usize>],
    to: &[Option<usize>],
    pol: &RepackPolicy,
    kind: PinKind,
    reason: &Reason<'_>,
) -> Vec<Vec<Action>> {
    let batches = batches(input, now, to, pol);
    let n = batches.len();
    batches
        .into_iter()
        .enumerate()
        .map(|(k, batch)| {
            batch
                .into_iter()
                .filter_map(|i| {
                    let v = &input.vcpus[i];
                    let (from, dest) = (input.cpus[now[i]?].id, input.cpus[to[i]?].id);
                    Some(Action::Pin {
                        domain: v.domain.to_string(),
                        vcpu: v.vcpu,
                        from: v.current.clone(),
                        to: CpuSet::single(dest),
                        kind,
                        reason: reason(v, from, dest, k + 1, n),
                    })
                })
                .collect()
        })
        .collect()
}

/// The moves (vCPU indices) of each step.
fn batches(input: &CpuInput, now: &[Option<usize>], to: &[Option<usize>], pol: &RepackPolicy) -> Vec<Vec<usize>> {
    let mut pending: Vec<usize> =
        (0..now.len()).filter(|&i| now[i].is_some() && to[i].is_some() && now[i] != to[i]).collect();
    if pol.max_repins == 0 || pending.is_empty() {
        return Vec::new();
    }
    pending.sort_by(|&a, &b| input.vcpus[b].demand.total_cmp(&input.vcpus[a].demand).then(a.cmp(&b)));
    let (start_load, start_peak) = loads(input, now);
    let (end_load, end_peak) = loads(input, to);
    let bound: Vec<f64> = (0..input.cpus.len()).map(|c| start_load[c].max(end_load[c]).max(pol.high)).collect();
    let bound_peak: Vec<f64> =
        (0..input.cpus.len()).map(|c| start_peak[c].max(end_peak[c]).max(pol.peak_limit)).collect();
    let (mut load, mut peak) = (start_load, start_peak);
    let over = |load: &[f64], peak: &[f64], c: usize| excess(load[c], bound[c]) + excess(peak[c], bound_peak[c]);
    let shift = |load: &mut Vec<f64>, peak: &mut Vec<f64>, i: usize| {
        let v = &input.vcpus[i];
        let (a, b) = (now[i].unwrap_or(0), to[i].unwrap_or(0));
        load[a] -= v.demand;
        peak[a] -= v.peak;
        load[b] += v.demand;
        peak[b] += v.peak;
    };
    let mut steps = Vec::new();
    while !pending.is_empty() {
        let mut step: Vec<usize> = Vec::new();
        // Moves that fit where they go, heaviest first.
        while step.len() < pol.max_repins {
            let fits = pending.iter().position(|&i| {
                let (v, b) = (&input.vcpus[i], to[i].unwrap_or(0));
                load[b] + v.demand <= bound[b] + EPS && peak[b] + v.peak <= bound_peak[b] + EPS
            });
            let Some(k) = fits else { break };
            let i = pending.remove(k);
            shift(&mut load, &mut peak, i);
            step.push(i);
        }
        // None fits: a cycle. Start with the move that overfills least, then move out of the
        // cpu it overfilled until nothing is over its bound (or the step is full).
        if step.is_empty() {
            let overfill = |i: usize| {
                let (v, b) = (&input.vcpus[i], to[i].unwrap_or(0));
                excess(load[b] + v.demand, bound[b]) + excess(peak[b] + v.peak, bound_peak[b])
            };
            let k = (0..pending.len())
                .min_by(|&x, &y| overfill(pending[x]).total_cmp(&overfill(pending[y])).then(x.cmp(&y)))
                .unwrap_or(0);
            let mut i = pending.remove(k);
            loop {
                shift(&mut load, &mut peak, i);
                step.push(i);
                if step.len() >= pol.max_repins {
                    break;
                }
                // Out of a cpu over its bound (the one just filled, or one still waiting for a
                // second vCPU to leave), heaviest first.
                let out = pending.iter().position(|&j| now[j].is_some_and(|a| over(&load, &peak, a) > EPS));
                let Some(k) = out else { break };
                i = pending.remove(k);
            }
        }
        steps.push(step);
    }
    steps
}

#[cfg(test)]
mod tests;
