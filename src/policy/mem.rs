//! The memory balancer: reclaim idle guest memory through the balloon, grant it to starving
//! guests, and never let the host or a guest run out.
//!
//! Improvements over the classic rule (reclaim `(free − threshold) / 2`, grant a fixed amount):
//! - free memory is the guest's *usable* memory (what it can use without swapping), clamped to
//!   its size; a report that contradicts itself (usable above current, current above maximum)
//!   counts as no report;
//! - reclaim looks at the guest's peak use over a window (`--reclaim-window`), not at one
//!   sample: a guest whose use swings is not squeezed in a trough and then left swapping;
//! - thresholds are fractions of the guest's current size with absolute floors, and between the
//!   starve and the reclaim threshold lies a dead band: a change aims at the middle of that band,
//!   so a steady guest is left alone after one change;
//! - each reclaim is at most `step_kib` and each grant at most `grant_step_kib` (4× by
//!   default: starving costs more than idle memory); a guest changed recently gives nothing back for a
//!   cooldown (a starving one may still be granted once its last target is reached), and a
//!   guest that did not reach its last target is backed off (by the caller);
//! - rising `swap_in` or `major_fault` counts as starving even when free memory looks fine, and
//!   a guest whose balloon moved without the agent (setmem, deflate-on-oom) is not moved back;
//! - a grant never goes above the guest's configured maximum, and all grants together never
//!   take host `MemAvailable` below the reserve; memory reclaimed this quantum is granted only
//!   once the host sees it free (next quantum), never on credit;
//! - earlier grants the host has not paid for yet (a deflated balloon costs nothing until the
//!   guest touches the pages; the caller tracks them) are subtracted from the budget, so grants
//!   in consecutive quanta together stay within it too;
//! - a guest whose balloon is above its known maximum (a maximum read before a memory
//!   hot-plug, or a bad report) is held: every change is measured from a size the planner cannot
//!   trust, and one "reclaim step" could take far more than `step_kib`;
//! - when the host is below its reserve nothing is granted and the guests with the most free
//!   memory give first, down to the middle of the dead band.
//!
//! Pure: no I/O, no clock.

use serde::Serialize;

use crate::policy::Action;

const MIB: u64 = 1024;

/// Tunables of the memory balancer (sizes in KiB, fractions of the guest's current size).
#[derive(Debug, Clone, PartialEq)]
pub struct MemPolicy {
    /// Never inflate a guest below this.
    pub floor_kib: u64,
    /// Never let grants drive host MemAvailable below this.
    pub host_reserve_kib: u64,
    /// Usable fraction above which a guest gives memory back.
    pub reclaim_above: f64,
    /// Usable fraction below which a guest is starving.
    pub starve_below: f64,
    /// Absolute floor of the reclaim threshold.
    pub reclaim_min_kib: u64,
    /// Absolute floor of the starve threshold.
    pub starve_min_kib: u64,
    /// Largest reclaim from one guest in one plan.
    pub step_kib: u64,
    /// Largest grant to one guest in one plan: larger than `step_kib`, because a starving
    /// guest costs more than idle memory does.
    pub grant_step_kib: u64,
    /// Smallest change worth making.
    pub min_change_kib: u64,
    /// Major faults per stats interval above which a guest counts as swapping.
    pub major_fault_threshold: u64,
    /// Host memory pressure (PSI some avg10, %) above which nothing is granted.
    pub host_psi_limit: f64,
}

impl Default for MemPolicy {
    fn default() -> Self {
        MemPolicy {
            floor_kib: 256 * MIB,
            host_reserve_kib: 1024 * MIB,
            reclaim_above: 0.30,
            starve_below: 0.10,
            reclaim_min_kib: 128 * MIB,
            starve_min_kib: 32 * MIB,
            step_kib: 256 * MIB,
            grant_step_kib: 1024 * MIB,
            min_change_kib: 8 * MIB,
            major_fault_threshold: 100,
            host_psi_limit: 20.0,
        }
    }
}

/// Why a guest is left out this quantum (decided by the caller, which holds the history).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    Excluded(String),
    /// Younger than `--min-age`.
    Young,
    /// No balloon, no stats, stats not updating, or inconsistent.
    NoReport(String),
    /// Did not reach its last target in time.
    BackedOff,
}

/// One guest's memory as the planner sees it. Guest-reported numbers are raw here; the planner
/// clamps them.
#[derive(Debug, Clone, PartialEq)]
pub struct GuestMem {
    pub name: String,
    /// Balloon size now (reported by QEMU, trusted).
    pub current_kib: u64,
    /// Configured maximum (domain definition, trusted).
    pub max_kib: u64,
    /// Guest-reported usable memory (untrusted).
    pub usable_kib: Option<u64>,
    /// Usable memory had the guest's peak use over the reclaim window been now: current size
    /// minus the most it used lately. Reclaim decisions use it, so a guest whose use swings is
    /// not squeezed in a trough. `None`: no history, use `usable_kib`.
    pub usable_low_kib: Option<u64>,
    /// Growth of swap_in (KiB) and major faults since the previous stats.
    pub swap_in_delta_kib: u64,
    pub major_fault_delta: u64,
    /// The balloon moved away from the last target the agent set, without the agent (an
    /// operator's `virsh setmem`, the guest's deflate-on-oom): nothing is done this interval.
    pub moved_by_others: bool,
    /// Changed recently: may still be granted memory while starving, gives none back.
    pub cooling: bool,
    pub hold: Option<Hold>,
}

/// The host side.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HostMem {
    pub available_kib: u64,
    pub psi_some_avg10: Option<f64>,
    /// Granted earlier, not yet paid for by the host (untouched by the guest): still to leave
    /// `available_kib`, so not to be granted again.
    pub outstanding_kib: u64,
}

/// The memory balancer's state of one guest: one spelling for logs, JSON and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Gives memory back.
    Reclaim,
    /// Is granted memory.
    Grant,
    /// Left as it is.
    Steady,
    /// Needs memory and is not granted any (the verdict says why).
    Starving,
    /// Left out this quantum (excluded, young, no usable report, backed off, blocked).
    Hold,
}

impl State {
    pub const ALL: [State; 5] = [State::Reclaim, State::Grant, State::Steady, State::Starving, State::Hold];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Reclaim => "reclaim",
            State::Grant => "grant",
            State::Steady => "steady",
            State::Starving => "starving",
            State::Hold => "hold",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a starving guest was granted nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotGranted {
    /// Host `MemAvailable` is below `--host-reserve`.
    HostReserve,
    /// Host memory pressure (PSI) is above its limit.
    HostPressure,
    /// The budget above the reserve is spent this quantum.
    Budget,
    /// The guest is at its configured maximum.
    AtMaximum,
}

impl NotGranted {
    pub const ALL: [NotGranted; 4] =
        [NotGranted::HostReserve, NotGranted::HostPressure, NotGranted::Budget, NotGranted::AtMaximum];

    pub fn as_str(self) -> &'static str {
        match self {
            NotGranted::HostReserve => "host_reserve",
            NotGranted::HostPressure => "host_pressure",
            NotGranted::Budget => "budget",
            NotGranted::AtMaximum => "at_maximum",
        }
    }
}

/// What the planner decided about one guest, for `diagnose` and logs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub name: String,
    pub state: State,
    pub why: String,
    /// A starving guest that was granted nothing: what stopped the grant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub not_granted: Option<NotGranted>,
    /// What a starving guest refused for the host's sake (reserve, pressure, budget) wanted,
    /// KiB; 0 otherwise. The capacity advice adds these up.
    #[serde(skip)]
    pub unmet_kib: u64,
}

/// The host is short of its reserve, or its memory pressure is above the limit: guests are
/// reclaimed down to the middle of the band, and nothing is granted.
pub fn host_pressure(host: &HostMem, p: &MemPolicy) -> bool {
    short_of_memory(host.available_kib, host.psi_some_avg10, p.host_reserve_kib, p.host_psi_limit)
}

/// `MemAvailable` below the reserve, or memory pressure (PSI some avg10, %) above the limit.
/// The memory planner grants nothing then, and the capacity advice counts no memory as free.
pub fn short_of_memory(available_kib: u64, psi_some_avg10: Option<f64>, reserve_kib: u64, psi_limit: f64) -> bool {
    available_kib < reserve_kib || psi_some_avg10.is_some_and(|v| v > psi_limit)
}

/// Usable memory below which a guest of this balloon size is starving.
fn starve_threshold(current_kib: u64, p: &MemPolicy) -> u64 {
    frac(current_kib, p.starve_below).max(p.starve_min_kib)
}

/// A guest with at least twice its starving threshold usable (by its last report), so that
/// some growth while nobody looks does not starve it.
pub fn comfortable(g: &GuestMem, p: &MemPolicy) -> bool {
    g.usable_kib.is_some_and(|u| u >= starve_threshold(g.current_kib, p).saturating_mul(2))
}

/// A plan and the verdict on every guest.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MemPlan {
    pub actions: Vec<Action>,
    pub verdicts: Vec<Verdict>,
}

fn mib(kib: u64) -> String {
    crate::units::mib(kib)
}

#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn frac(x: u64, f: f64) -> u64 {
    (x as f64 * f) as u64
}

/// Size change that brings `usable` to `target` × the new size, from a guest of size `current`:
/// solving usable ± g = target × (current ± g).
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn to_band_middle(current: u64, usable: u64, target: f64) -> u64 {
    let want = target * current as f64;
    let g = ((usable as f64 - want) / (1.0 - target)).abs();
    g as u64
}

/// Plans one memory quantum.
pub fn plan(guests: &[GuestMem], host: &HostMem, p: &MemPolicy) -> MemPlan {
    let mut out = MemPlan::default();
    let middle = (p.reclaim_above + p.starve_below) / 2.0;
    let reserve_short = p.host_reserve_kib.saturating_sub(host.available_kib);
    let host_pressure = host_pressure(host, p);

    // Classify.
    struct Give {
        i: usize,
        usable: u64,
    }
    let mut givers: Vec<Give> = Vec::new();
    let mut starving: Vec<(usize, u64, bool)> = Vec::new(); // (index, wanted, swapping)
    for (i, g) in guests.iter().enumerate() {
        let verdict =
            |state, why: String| Verdict { name: g.name.clone(), state, why, not_granted: None, unmet_kib: 0 };
        if let Some(h) = &g.hold {
            let why = match h {
                Hold::Excluded(w) => w.clone(),
                Hold::Young => "younger than --min-age".into(),
                Hold::NoReport(w) => w.clone(),
                Hold::BackedOff => "did not reach its last target; backed off".into(),
            };
            out.verdicts.push(verdict(State::Hold, why));
            continue;
        }
        let max = g.max_kib;
        if g.current_kib > max {
            out.verdicts.push(verdict(
                State::Hold,
                format!(
                    "balloon {} is above its known maximum {} (read before a memory hot-plug?): held until its definition is read again",
                    mib(g.current_kib),
                    mib(max)
                ),
            ));
            continue;
        }
        let current = g.current_kib;
        let usable = match g.usable_kib {
            Some(u) if u <= g.current_kib => u,
            Some(u) => {
                out.verdicts.push(verdict(
                    State::Hold,
                    format!("inconsistent report: usable {} above current {}", mib(u), mib(g.current_kib)),
                ));
                continue;
            }
            None => {
                out.verdicts.push(verdict(State::Hold, "guest reports no usable memory".into()));
                continue;
            }
        };
        let starve_thr = starve_threshold(current, p);
        let reclaim_thr = frac(current, p.reclaim_above).max(p.reclaim_min_kib);
        let swapping = g.swap_in_delta_kib > 0 || g.major_fault_delta > p.major_fault_threshold;
        if g.moved_by_others {
            out.verdicts.push(verdict(
                State::Hold,
                "balloon moved without the agent (virsh setmem, or deflate-on-oom): not moved back".into(),
            ));
            continue;
        }
        if swapping || usable < starve_thr {
            let to_middle = to_band_middle(current, usable, middle);
            let wanted = if swapping { to_middle.max(p.step_kib) } else { to_middle };
            let why = if swapping {
                format!("swapping (swap_in +{} KiB, major faults +{})", g.swap_in_delta_kib, g.major_fault_delta)
            } else {
                format!("usable {} below {}", mib(usable), mib(starve_thr))
            };
            starving.push((i, wanted, swapping));
            out.verdicts.push(verdict(State::Starving, why));
            continue;
        }
        let thr = if host_pressure { frac(current, middle).max(p.starve_min_kib) } else { reclaim_thr };
        let usable = usable.min(g.usable_low_kib.unwrap_or(usable));
        if usable > thr && g.cooling {
            out.verdicts.push(verdict(
                State::Steady,
                format!("usable {} above {}, but changed recently (--mem-cooldown)", mib(usable), mib(thr)),
            ));
        } else if usable > thr {
            givers.push(Give { i, usable });
            out.verdicts.push(verdict(State::Reclaim, format!("usable {} above {}", mib(usable), mib(thr))));
        } else {
            out.verdicts.push(verdict(
                State::Steady,
                format!("usable {} (at its recent peak use) within the dead band", mib(usable)),
            ));
        }
    }

    // Reclaim: most free memory first.
    givers.sort_by(|a, b| b.usable.cmp(&a.usable).then(a.i.cmp(&b.i)));
    for gv in &givers {
        let g = &guests[gv.i];
        let current = g.current_kib;
        let to_middle = to_band_middle(current, gv.usable, middle);
        let give = to_middle.min(p.step_kib).min(current.saturating_sub(p.floor_kib));
        let v = out.verdicts.iter_mut().find(|v| v.name == g.name);
        if give < p.min_change_kib {
            if let Some(v) = v {
                v.state = State::Steady;
                v.why = format!("{}; at the floor {} or change too small", v.why, mib(p.floor_kib));
            }
            continue;
        }
        let to = current - give;
        out.actions.push(Action::Balloon {
            domain: g.name.clone(),
            from_kib: g.current_kib,
            to_kib: to,
            reason: format!(
                "{}{}: reclaim {} toward {:.0}% usable (floor {})",
                v.map(|v| v.why.clone()).unwrap_or_default(),
                if host_pressure { " (host under pressure)" } else { "" },
                mib(give),
                middle * 100.0,
                mib(p.floor_kib)
            ),
        });
    }

    // Grant: swapping guests first, then the most starved; within the host budget.
    if !starving.is_empty() {
        if host_pressure {
            let (refused, why) = if reserve_short > 0 {
                let why = format!(
                    "host reserve: MemAvailable {} is below --host-reserve {}",
                    mib(host.available_kib),
                    mib(p.host_reserve_kib)
                );
                (NotGranted::HostReserve, why)
            } else {
                let why = format!("host memory pressure (PSI some avg10 {:.1}%)", host.psi_some_avg10.unwrap_or(0.0));
                (NotGranted::HostPressure, why)
            };
            for (i, wanted, _) in &starving {
                let g = &guests[*i];
                if let Some(v) = out.verdicts.iter_mut().find(|v| v.name == g.name) {
                    v.why = format!("{}; not granted: {why}", v.why);
                    v.not_granted = Some(refused);
                    // No host could give it more than its maximum allows.
                    v.unmet_kib = (*wanted).min(g.max_kib.saturating_sub(g.current_kib));
                }
            }
            return out;
        }
        starving.sort_by(|a, b| {
            let fa = guests[a.0].usable_kib.unwrap_or(0) as f64 / guests[a.0].current_kib.max(1) as f64;
            let fb = guests[b.0].usable_kib.unwrap_or(0) as f64 / guests[b.0].current_kib.max(1) as f64;
            b.2.cmp(&a.2).then(fa.total_cmp(&fb)).then(a.0.cmp(&b.0))
        });
        // What is above the reserve, less what earlier grants will still take from it.
        let above = host.available_kib - p.host_reserve_kib;
        let mut budget = above.saturating_sub(host.outstanding_kib);
        let credit = if host.outstanding_kib > 0 {
            format!(", less {} granted earlier and not yet in use (on credit)", mib(host.outstanding_kib.min(above)))
        } else {
            String::new()
        };
        // Share the budget: no starving guest gets more than an equal share while others wait.
        let share = budget / u64::try_from(starving.len()).unwrap_or(1).max(1);
        for (i, wanted, _) in &starving {
            let g = &guests[*i];
            let current = g.current_kib;
            let headroom = g.max_kib.saturating_sub(current);
            let grant = (*wanted).min(p.grant_step_kib).min(headroom).min(share.max(p.min_change_kib)).min(budget);
            let v = out.verdicts.iter_mut().find(|v| v.name == g.name);
            if grant < p.min_change_kib {
                if let Some(v) = v {
                    let (refused, lim) = if headroom < p.min_change_kib {
                        (NotGranted::AtMaximum, format!("at its maximum {}", mib(g.max_kib)))
                    } else {
                        (
                            NotGranted::Budget,
                            format!("host budget above the reserve is spent ({} left{credit})", mib(budget)),
                        )
                    };
                    v.why = format!("{}; not granted: {lim}", v.why);
                    v.not_granted = Some(refused);
                    if refused == NotGranted::Budget {
                        v.unmet_kib = *wanted;
                    }
                }
                continue;
            }
            budget -= grant;
            let why = v.map(|v| {
                v.state = State::Grant;
                v.why.clone()
            });
            out.actions.push(Action::Balloon {
                domain: g.name.clone(),
                from_kib: g.current_kib,
                to_kib: current + grant,
                reason: format!(
                    "{}: grant {} (max {}, host MemAvailable {} stays above reserve {}{credit})",
                    why.unwrap_or_default(),
                    mib(grant),
                    mib(g.max_kib),
                    mib(host.available_kib),
                    mib(p.host_reserve_kib)
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests;
