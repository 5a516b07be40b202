//! The safeguard: after a re-pack, and after each quantum's set of balancing moves, check that
//! the placement they made pays off; if it does not, give the old pins back, once.
//!
//! Each applied set of moves is *watched* on the figure it promised to improve ([`Figure`]):
//! a re-pack its cost ([`crate::policy::repack::cost`]: load above `--high` plus peaks above
//! `--peak-limit`, over all cpus), balancing moves and swaps the load of the busiest cpu they
//! touched, peak-safety moves the peaks above `--peak-limit` on the cpus they touched. The
//! figure is compared on **the same fresh demand** for the placement now and for the placement
//! with the watched vCPUs back where they were: the demand of a host moves on its own, and only
//! this comparison says what the moves did. The watch waits one settle time (two smoothing time
//! constants: the averages have absorbed the change), then averages the difference over the
//! next settle time:
//! - worse by more than the margin (`--min-gain`): **roll back**: the caller restores exactly
//!   the pins the set replaced (for the vCPUs still where the set put them). A rollback is not
//!   watched itself, so a placement and its rollback never alternate;
//! - a balancing set that made its figure worse at all is a **strike** against each of its
//!   vCPUs: their next cooldown is `cooldown × (2^strikes − 1)` longer (at most
//!   [`MAX_STRIKES`]), so a move that keeps failing to pay off backs off; one that pays off
//!   clears its vCPU's strikes.
//!
//! A watch whose vCPUs moved again, left, or whose old cpu is no longer allowed is dropped:
//! something newer decided for them. Pure: the state machine is fed each quantum's CPU planner
//! input and time.

use std::collections::HashMap;

use serde::Serialize;

use crate::policy::cpu::CpuInput;
use crate::policy::repack::{cost, current, loads};

/// The most strikes counted against one vCPU: its cooldown then is 2^5 − 1 = 31 cooldowns longer.
pub const MAX_STRIKES: u32 = 5;
const EPS: f64 = 1e-9;

/// The safeguard's settings, from the CPU balancer's.
#[derive(Debug, Clone, PartialEq)]
pub struct SafeguardConfig {
    /// Wait this long after the moves, then judge over the same length of time, ns.
    pub settle_ns: u64,
    /// Worse by more than this (cores) rolls the moves back.
    pub margin: f64,
    pub high: f64,
    pub peak_limit: f64,
    /// The balancer's cooldown, the unit of the back-off, ns.
    pub cooldown_ns: u64,
}

/// What made a watched set of moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    Repack,
    Balancing,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Origin::Repack => "re-pack",
            Origin::Balancing => "balancing moves",
        })
    }
}

/// What a watched set promised to lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Figure {
    /// The re-pack's cost over all cpus.
    Cost,
    /// The load of the busiest cpu the set touched (balancing moves and swaps).
    BusiestLoad,
    /// The peaks above `--peak-limit` on the cpus the set touched (peak-safety moves).
    PeakExcess,
}

impl std::fmt::Display for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Figure::Cost => "cost (load above --high, peaks above --peak-limit)",
            Figure::BusiestLoad => "load of the busiest cpu it touched",
            Figure::PeakExcess => "peaks above --peak-limit on the cpus it touched",
        })
    }
}

impl Figure {
    /// The figure of placement `at` (cpu indices), over `touched` (cpu indices) where it is local.
    fn of(self, input: &CpuInput, at: &[Option<usize>], touched: &[usize], cfg: &SafeguardConfig) -> f64 {
        match self {
            Figure::Cost => cost(input, at, cfg.high, cfg.peak_limit),
            Figure::BusiestLoad => {
                let (load, _) = loads(input, at);
                touched.iter().map(|&c| load[c]).fold(0.0, f64::max)
            }
            Figure::PeakExcess => {
                let (_, peak) = loads(input, at);
                touched.iter().map(|&c| (peak[c] - cfg.peak_limit).max(0.0)).sum()
            }
        }
    }
}

/// One vCPU a watched set moved: from cpu `before` to cpu `after` (cpu ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub domain: String,
    pub vcpu: u32,
    pub before: u32,
    pub after: u32,
}

/// The end of a watch.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub origin: Origin,
    pub figure: Figure,
    pub moves: Vec<Moved>,
    /// Mean over the judging window of (figure now − figure without the moves), cores:
    /// negative when the moves paid off.
    pub worse_by: f64,
    /// True when `worse_by` is above the margin: restore `moves`' `before` pins.
    pub roll_back: bool,
}

#[derive(Debug, Clone)]
struct Watch {
    origin: Origin,
    figure: Figure,
    since_ns: u64,
    moves: Vec<Moved>,
    sum: f64,
    n: u32,
}

/// The watches and the strikes; owned by the loop.
#[derive(Debug, Default)]
pub struct Safeguard {
    watches: Vec<Watch>,
    strikes: HashMap<(String, u32), u32>,
}

impl Safeguard {
    /// Starts watching a set of moves applied at `t_ns`, on the figure it promised to lower.
    pub fn watch(&mut self, origin: Origin, figure: Figure, moves: Vec<Moved>, t_ns: u64) {
        if !moves.is_empty() {
            self.watches.push(Watch { origin, figure, since_ns: t_ns, moves, sum: 0.0, n: 0 });
        }
    }

    /// Drops every watch (a re-pack is about to move everything; a lost connection).
    pub fn clear(&mut self) {
        self.watches.clear();
    }

    /// Sets being watched.
    pub fn watching(&self) -> usize {
        self.watches.len()
    }

    /// Strikes against a vCPU.
    pub fn strikes(&self, domain: &str, vcpu: u32) -> u32 {
        self.strikes.get(&(domain.to_string(), vcpu)).copied().unwrap_or(0)
    }

    /// How much longer than the cooldown a vCPU with strikes stays put after its next move, ns.
    pub fn backoff_ns(&self, domain: &str, vcpu: u32, cfg: &SafeguardConfig) -> u64 {
        let s = self.strikes(domain, vcpu);
        cfg.cooldown_ns.saturating_mul((1u64 << s) - 1)
    }

    /// One quantum: advances every watch on `input` (the CPU planner's view now) and returns
    /// the watches that ended.
    pub fn observe(&mut self, input: &CpuInput, t_ns: u64, cfg: &SafeguardConfig) -> Vec<Verdict> {
        if self.watches.is_empty() {
            return Vec::new();
        }
        let index: HashMap<(&str, u32), usize> =
            input.vcpus.iter().enumerate().map(|(i, v)| ((&*v.domain, v.vcpu), i)).collect();
        let cpu: HashMap<u32, usize> = input.cpus.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
        let now = current(input);
        let mut verdicts = Vec::new();
        let mut keep = Vec::with_capacity(self.watches.len());
        for mut w in std::mem::take(&mut self.watches) {
            // (vCPU index, its old cpu index) for each move, if every one still stands.
            let undo: Option<Vec<(usize, usize)>> = w
                .moves
                .iter()
                .map(|m| {
                    let i = *index.get(&(m.domain.as_str(), m.vcpu))?;
                    let here = now[i]?;
                    (input.cpus[here].id == m.after).then_some(())?;
                    Some((i, *cpu.get(&m.before)?))
                })
                .collect();
            let Some(undo) = undo else {
                log::debug!(
                    "safeguard: {} of {} superseded (moved again, gone, or cpu retired)",
                    w.origin,
                    names(&w.moves)
                );
                continue;
            };
            if t_ns < w.since_ns.saturating_add(cfg.settle_ns) {
                keep.push(w);
                continue;
            }
            let mut old = now.clone();
            let mut touched: Vec<usize> = Vec::with_capacity(undo.len() * 2);
            for &(i, c) in &undo {
                touched.extend(now[i]);
                touched.push(c);
                old[i] = Some(c);
            }
            touched.sort_unstable();
            touched.dedup();
            w.sum += w.figure.of(input, &now, &touched, cfg) - w.figure.of(input, &old, &touched, cfg);
            w.n += 1;
            if t_ns < w.since_ns.saturating_add(cfg.settle_ns.saturating_mul(2)) {
                keep.push(w);
                continue;
            }
            let worse_by = w.sum / f64::from(w.n);
            if w.origin == Origin::Balancing {
                for m in &w.moves {
                    let key = (m.domain.clone(), m.vcpu);
                    if worse_by > EPS {
                        let s = self.strikes.entry(key).or_insert(0);
                        *s = (*s + 1).min(MAX_STRIKES);
                    } else {
                        self.strikes.remove(&key);
                    }
                }
            }
            verdicts.push(Verdict {
                origin: w.origin,
                figure: w.figure,
                moves: w.moves,
                worse_by,
                roll_back: worse_by > cfg.margin + EPS,
            });
        }
        self.watches = keep;
        // Strikes of vCPUs that are gone are forgotten.
        self.strikes.retain(|(d, v), _| index.contains_key(&(d.as_str(), *v)));
        verdicts
    }
}

/// `web/0, db/1` for logs.
pub fn names(moves: &[Moved]) -> String {
    let list: Vec<String> = moves.iter().map(|m| format!("{}/{}", m.domain, m.vcpu)).collect();
    list.join(", ")
}

#[cfg(test)]
mod tests;
