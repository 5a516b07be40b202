//! History the memory planner needs but a snapshot does not hold: when each guest was first
//! seen, its previous swap counters, the last balloon target the agent set and whether the
//! guest reached it, its peak use over the reclaim window, and the grants still on credit.
//! Turns a snapshot into the planner's plain input.
//!
//! Grants the host has not paid for yet (a deflated balloon costs nothing until the guest
//! touches the pages) are kept on credit and reported as [`HostMem::outstanding_kib`]; see
//! [`credit`] for when a credit ends.

use std::collections::HashMap;

use log::{info, warn};

use crate::model::Snapshot;
use crate::policy::mem::{GuestMem, Hold, HostMem};
use crate::window::WindowMax;

mod credit;

/// Memory tunables that need history (the rest are in [`crate::policy::mem::MemPolicy`]).
#[derive(Debug, Clone)]
pub struct MemTiming {
    /// Guests younger than this are not ballooned.
    pub min_age_ns: u64,
    /// Time between two changes of one guest.
    pub cooldown_ns: u64,
    /// A guest that has not reached its target after this long is backed off.
    pub target_timeout_ns: u64,
    /// How long a backed-off guest is left alone.
    pub backoff_ns: u64,
    /// Reclaim decisions look at the guest's peak use over this window.
    pub reclaim_window_ns: u64,
    /// A grant the host has not paid for yet counts against the budget until the host pays,
    /// it is taken back, or this long has passed ([`credit`]); 0 keeps no credit at all
    /// (grants on credit: the old behaviour).
    pub credit_timeout_ns: u64,
}

/// How long a guest whose balloon was moved without the agent (an operator's `virsh setmem`,
/// the guest's deflate-on-oom) is not reclaimed from, ns.
pub const MOVED_HOLD_NS: u64 = 600_000_000_000;

#[derive(Debug, Clone, Default)]
struct GuestState {
    id: u32,
    first_seen_ns: u64,
    prev_swap_in: Option<u64>,
    prev_major_fault: Option<u64>,
    /// (target KiB, set at ns, reached)
    target: Option<(u64, u64, bool)>,
    last_change_ns: Option<u64>,
    backoff_until_ns: u64,
    /// Its balloon was moved without the agent: not reclaimed from until then (ns).
    moved_until_ns: u64,
    /// KiB in use (current − usable) of recent reports: the most over the reclaim window, in
    /// fixed memory whatever the window and interval.
    used: WindowMax<u64>,
    /// Balloon size at the last report: the size a plan of this interval starts from.
    last_current_kib: Option<u64>,
    /// (current, usable) of the last fresh, self-consistent report.
    last_usable: Option<(u64, u64)>,
    /// The balloon is above the guest's known maximum: its definition should be read again.
    rediscover: bool,
    /// When re-reading was last asked for, while the guest stays above its maximum.
    rediscover_asked_ns: Option<u64>,
}

/// Per-guest memory history.
#[derive(Debug, Default)]
pub struct MemTracker {
    guests: HashMap<String, GuestState>,
    credits: credit::Ledger,
    /// `credit_timeout_ns > 0` at the last input.
    keep_credit: bool,
}

fn close(a: u64, b: u64) -> bool {
    a.abs_diff(b) <= (b / 50).max(4 * 1024)
}

impl MemTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a balloon target the agent just set; a grow is kept on credit.
    pub fn set_target(&mut self, name: &str, target_kib: u64, now_ns: u64) {
        if let Some(g) = self.guests.get_mut(name) {
            g.target = Some((target_kib, now_ns, false));
            g.last_change_ns = Some(now_ns);
            if let (Some(base), true) = (g.last_current_kib, self.keep_credit) {
                self.credits.grant(name, g.id, base, target_kib, now_ns);
            }
        }
    }

    /// Granted KiB the host has not paid for yet (as of the last [`MemTracker::input`]).
    pub fn outstanding_kib(&self) -> u64 {
        self.credits.outstanding_kib()
    }

    /// A grant to this guest is still on credit (the host has not paid for it yet).
    pub fn on_credit(&self, name: &str) -> bool {
        self.credits.on_credit(name)
    }

    /// Names of guests whose definition should be read again (rediscovered), as of the last
    /// [`MemTracker::input`]: their balloon reported a size above the maximum the agent knows,
    /// e.g. a maximum read before a memory hot-plug. The planner holds such a guest meanwhile.
    /// A guest is named once, then again every [`MemTiming::backoff_ns`] while it stays so.
    pub fn needs_rediscovery(&self) -> Vec<String> {
        let mut v: Vec<String> = self.guests.iter().filter(|(_, g)| g.rediscover).map(|(n, _)| n.clone()).collect();
        v.sort();
        v
    }

    /// Entries of a guest's peak-use history.
    #[cfg(test)]
    fn history_entries(&self, name: &str) -> Option<usize> {
        self.guests.get(name).map(|g| g.used.buckets_used())
    }

    /// Settles the grants on credit against this interval's snapshot.
    fn settle_credits(&mut self, snap: &Snapshot, t: &MemTiming) {
        self.keep_credit = t.credit_timeout_ns > 0;
        let now = snap.t_ns;
        let guests: Vec<credit::GuestNow> = snap
            .domains
            .iter()
            .map(|d| {
                let st = self.guests.get(&d.dom.name).filter(|g| g.id == d.dom.id);
                let target = st.and_then(|g| g.target).map_or(0, |(k, _, _)| k);
                credit::GuestNow {
                    name: &d.dom.name,
                    id: d.dom.id,
                    size_kib: d.balloon.as_ref().map(|(b, _)| b.current_kib.max(target)),
                    used_kib: fresh_usable(d, now).map(|(c, u)| c - u),
                    used_prev_kib: st.and_then(|g| g.last_usable).map(|(c, u)| c - u),
                }
            })
            .collect();
        self.credits.settle(now, snap.host.mem_available_kib, &guests, t.credit_timeout_ns);
    }

    /// The planner's input from a snapshot whose balloon stats are fresh.
    pub fn input(&mut self, snap: &Snapshot, t: &MemTiming) -> (Vec<GuestMem>, HostMem) {
        let now = snap.t_ns;
        self.guests.retain(|n, g| snap.domains.iter().any(|d| &d.dom.name == n && d.dom.id == g.id));
        self.settle_credits(snap, t);
        let mut out = Vec::with_capacity(snap.domains.len());
        for d in &snap.domains {
            let st = self.guests.entry(d.dom.name.clone()).or_insert_with(|| GuestState {
                id: d.dom.id,
                first_seen_ns: now,
                ..GuestState::default()
            });
            let (b, stats_t) = match &d.balloon {
                Some((b, t)) => (Some(b), *t),
                None => (None, 0),
            };
            let mut hold = None;
            let mut moved = false;
            let (mut swap_d, mut fault_d) = (0, 0);
            if let Some(b) = b {
                // Swap counters: growth since the previous report (a guest reboot resets them).
                // A carried reading repeats the counters: no growth. Read again after one, a
                // guest's growth is counted whole, as if in this interval: it was quiet until
                // it ran, and the counts come from when it ran (erring toward granting).
                swap_d = match (st.prev_swap_in, b.swap_in_kib) {
                    (Some(p), Some(c)) => c.saturating_sub(p),
                    _ => 0,
                };
                fault_d = match (st.prev_major_fault, b.major_fault) {
                    (Some(p), Some(c)) => c.saturating_sub(p),
                    _ => 0,
                };
                st.prev_swap_in = b.swap_in_kib;
                st.prev_major_fault = b.major_fault;
                // Did the balloon reach the last target, run out of time, or deflate by itself?
                if let Some((target, set_at, reached)) = st.target {
                    if close(b.current_kib, target) {
                        st.target = Some((target, set_at, true));
                    } else if reached {
                        // Moved since it reached the agent's target: by an operator (`virsh
                        // setmem`, either way) or by the guest (deflate-on-oom: it grows).
                        // Not undone: not reclaimed from for a while (a starving guest may
                        // still be granted memory).
                        info!(
                            "{}: balloon at {} KiB, not the {} KiB the agent set: moved without the agent (virsh setmem, or the guest's deflate-on-oom); not reclaimed from for {}s",
                            d.dom.name,
                            b.current_kib,
                            target,
                            MOVED_HOLD_NS / 1_000_000_000
                        );
                        moved = true;
                        st.target = None;
                        st.last_change_ns = Some(now);
                        st.moved_until_ns = now.saturating_add(MOVED_HOLD_NS);
                    } else if !reached && now.saturating_sub(set_at) > t.target_timeout_ns {
                        warn!(
                            "{} did not reach its balloon target {} KiB (at {} KiB) in time; backing off",
                            d.dom.name, target, b.current_kib
                        );
                        st.target = None;
                        st.backoff_until_ns = now + t.backoff_ns;
                    }
                }
            }
            if let Some(why) = &d.mem_excluded {
                hold = Some(Hold::Excluded(why.clone()));
            } else if !d.desc.has_balloon {
                hold = Some(Hold::NoReport("no virtio balloon device".into()));
            } else if b.is_none() || stats_t != now {
                hold = Some(Hold::NoReport("no balloon statistics this interval".into()));
            } else if let Some(why) = stale(b, snap.epoch_s, d.desc.stats_period_s) {
                hold = Some(Hold::NoReport(why));
            } else if age_ns(d.desc.started_epoch_s, snap.epoch_s, now.saturating_sub(st.first_seen_ns)) < t.min_age_ns
            {
                hold = Some(Hold::Young);
            } else if now < st.backoff_until_ns {
                hold = Some(Hold::BackedOff);
            } else if st.target.is_some_and(|(_, _, reached)| !reached) {
                hold = Some(Hold::NoReport("balloon still moving toward its last target".into()));
            }
            let cooling =
                st.last_change_ns.is_some_and(|c| now.saturating_sub(c) < t.cooldown_ns) || now < st.moved_until_ns;
            let (current, maximum, usable) = b.map_or((0, 0, None), |b| (b.current_kib, b.maximum_kib, b.usable_kib));
            if let (Some(u), true) = (usable, stats_t == now && hold.is_none()) {
                st.used.record(now, t.reclaim_window_ns, current.saturating_sub(u));
            }
            let peak_used = st.used.max(now, t.reclaim_window_ns);
            let max_kib = max_kib(d.desc.max_kib, maximum);
            if b.is_some() && stats_t == now {
                st.last_current_kib = Some(current);
                st.last_usable = fresh_usable(d, now).or(st.last_usable);
            }
            // Above its maximum: the planner holds it; ask for the definition once per back-off.
            let above = b.is_some() && current > max_kib;
            st.rediscover = above && st.rediscover_asked_ns.is_none_or(|a| now.saturating_sub(a) >= t.backoff_ns);
            if st.rediscover {
                warn!(
                    "{}: balloon {} KiB is above its known maximum {} KiB; its definition should be read again",
                    d.dom.name, current, max_kib
                );
                st.rediscover_asked_ns = Some(now);
            } else if !above {
                st.rediscover_asked_ns = None;
            }
            out.push(GuestMem {
                name: d.dom.name.clone(),
                current_kib: current,
                max_kib,
                usable_kib: usable,
                usable_low_kib: peak_used.map(|p| current.saturating_sub(p)),
                swap_in_delta_kib: swap_d,
                major_fault_delta: fault_d,
                moved_by_others: moved,
                cooling,
                hold,
            });
        }
        let host = HostMem {
            available_kib: snap.host.mem_available_kib,
            psi_some_avg10: snap.host.mem_pressure_some_avg10,
            outstanding_kib: self.outstanding_kib(),
        };
        (out, host)
    }
}

/// (current, usable) from a fresh, self-consistent report (usable at most current).
fn fresh_usable(d: &crate::model::DomainView, now: u64) -> Option<(u64, u64)> {
    let (b, t) = d.balloon.as_ref()?;
    let u = b.usable_kib.filter(|&u| *t == now && u <= b.current_kib)?;
    Some((b.current_kib, u))
}

/// The most a guest may be given: the configured `<memory>` and libvirt's `balloon.maximum`
/// (both from libvirt, trusted), the tighter of the two; 0 means not reported.
pub fn max_kib(configured_kib: u64, balloon_maximum_kib: u64) -> u64 {
    if balloon_maximum_kib > 0 { balloon_maximum_kib.min(configured_kib) } else { configured_kib }
}

/// A guest's age: from its QEMU process start when known, else since the agent first saw it.
fn age_ns(started_epoch_s: Option<u64>, epoch_s: u64, seen_ns: u64) -> u64 {
    match started_epoch_s {
        Some(s) => epoch_s.saturating_sub(s).saturating_mul(1_000_000_000),
        None => seen_ns,
    }
}

/// Why a guest's stats are not to be trusted now, if they are not.
fn stale(b: Option<&crate::host::BalloonStats>, epoch_s: u64, period_s: u32) -> Option<String> {
    let b = b?;
    if b.usable_kib.is_none() && b.available_kib.is_none() {
        return Some("guest reports no memory statistics (balloon driver or stats period missing)".into());
    }
    let Some(last) = b.last_update_s else {
        return Some("guest statistics carry no last-update time".into());
    };
    let limit = u64::from(period_s.max(1)).saturating_mul(3).max(10);
    // A quiet guest's reading carried forward is judged as of when it was read.
    let age = epoch_s.saturating_sub(b.carried_for_s.unwrap_or(0)).saturating_sub(last);
    if age > limit {
        return Some(format!("guest statistics are stale (last update {age}s ago)"));
    }
    None
}

#[cfg(test)]
mod tests;
