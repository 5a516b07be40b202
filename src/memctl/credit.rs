//! Grants on credit: memory granted to guests that the host has not paid for yet.
//!
//! A deflated balloon costs the host nothing until the guest touches the pages, so host
//! `MemAvailable` does not drop when a grant is made: two starving guests granted in
//! consecutive intervals could together be given more than the budget, and the host would pay
//! later. Each grant (KiB above the size the plan started from) is therefore kept on credit and
//! subtracted from the next budgets until one of:
//! - **the host paid for it**: between two memory intervals, a credit is paid by as much as
//!   both the host and the guest agree was used: host `MemAvailable` dropped (shared out over
//!   the credits, oldest first) and the guest's reported use (`current − usable`) grew. Neither
//!   alone ends a credit: a liar reporting no free memory has its use "grow" with every grant,
//!   and on a real host other processes (a build, a guest the agent leaves alone) take memory
//!   all the time. Both errors would hand out memory the host has promised. Memory freed in
//!   the same interval (a reclaim) hides touches from the host's figure and keeps credits
//!   longer, which is the safe side.
//! - **it was taken back**: a credit is never more than the guest's size (or its target, while
//!   the balloon moves) above the size the grant started from;
//! - **the guest is gone** (or restarted);
//! - **it expired**: after the timeout, host `MemAvailable` is trusted again. The timeout only
//!   bounds how long touches hidden by frees can hold the budget down, so it is long (a day):
//!   a grant nobody has touched is still memory the host has promised. In the simulator
//!   (`--scenario mixed --host-cpus 16 --guests 24 --host-mem 40GiB --seed 3`, 2 h) a 1-hour
//!   timeout broke the reserve 32 times after the first hour, as often as not tracking credit
//!   at all; a day, never.
//!
//! The guest's own report alone never ends a credit: taking its word after 20 s broke the
//! reserve 154 times in an hour of the same run, against 17 without any tracking (liars).

use std::collections::HashMap;

/// One grant not paid for yet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Credit {
    guest: String,
    id: u32,
    /// Balloon size the grant started from.
    base_kib: u64,
    /// Granted KiB not yet settled.
    kib: u64,
    at_ns: u64,
}

/// What the ledger needs to know of one guest this interval.
#[derive(Debug, Clone, Copy)]
pub(super) struct GuestNow<'a> {
    pub name: &'a str,
    pub id: u32,
    /// Balloon size, or its target when larger (still moving); `None` without a report.
    pub size_kib: Option<u64>,
    /// Use (current − usable) now and at the previous interval, when reported.
    pub used_kib: Option<u64>,
    pub used_prev_kib: Option<u64>,
}

/// The grants on credit, oldest first.
#[derive(Debug, Default)]
pub(super) struct Ledger {
    credits: Vec<Credit>,
    /// Host `MemAvailable` at the previous interval.
    last_available_kib: Option<u64>,
}

impl Ledger {
    /// Records a grant from `base_kib` to `target_kib`.
    pub fn grant(&mut self, guest: &str, id: u32, base_kib: u64, target_kib: u64, now: u64) {
        if target_kib > base_kib {
            let c = Credit { guest: guest.into(), id, base_kib, kib: target_kib - base_kib, at_ns: now };
            self.credits.push(c);
        }
    }

    /// A grant to `guest` is not paid for yet.
    pub fn on_credit(&self, guest: &str) -> bool {
        self.credits.iter().any(|c| c.guest == guest)
    }

    /// Granted KiB not paid for yet.
    pub fn outstanding_kib(&self) -> u64 {
        self.credits.iter().map(|c| c.kib).sum()
    }

    /// Settles the credits against this interval (module documentation).
    pub fn settle(&mut self, now: u64, available_kib: u64, guests: &[GuestNow], timeout_ns: u64) {
        let find = |c: &Credit| guests.iter().find(|g| g.name == c.guest && g.id == c.id);
        // Expired, gone, or taken back.
        self.credits.retain_mut(|c| {
            if now.saturating_sub(c.at_ns) >= timeout_ns {
                return false;
            }
            let Some(g) = find(c) else { return false };
            if let Some(size) = g.size_kib {
                c.kib = c.kib.min(size.saturating_sub(c.base_kib));
            }
            c.kib > 0
        });
        // Paid: what left MemAvailable and the guest says it used, both.
        let mut paid = self.last_available_kib.map_or(0, |prev| prev.saturating_sub(available_kib));
        let mut grew: HashMap<&str, u64> =
            guests.iter().filter_map(|g| Some((g.name, g.used_kib?.saturating_sub(g.used_prev_kib?)))).collect();
        for c in &mut self.credits {
            if let Some(x) = grew.get_mut(c.guest.as_str()) {
                let p = paid.min(c.kib).min(*x);
                c.kib -= p;
                paid -= p;
                *x -= p;
            }
        }
        self.credits.retain(|c| c.kib > 0);
        self.last_available_kib = Some(available_kib);
    }
}
