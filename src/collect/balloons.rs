//! Which guests' balloon statistics are read from the host each memory interval.
//!
//! Reading them is what the memory balancer costs libvirtd: libvirt asks each guest's QEMU
//! over its monitor, about 0.2 ms of libvirtd's time per guest (docs/design.md). A guest's
//! memory use can only change while its vCPUs run (the guest touches, frees or swaps pages,
//! its balloon driver moves), so a guest that barely ran since its last reading is *quiet*:
//! that reading still holds and is carried forward, for at most `--mem-quiet-interval`. A
//! guest is read again at once when it ran, when its vCPU counters are unknown, when its
//! balloon is moving toward a target the agent set, or when it is new or restarted.

use std::collections::HashMap;

use log::debug;

use crate::host::{BalloonStats, DomainRef, Host, HostError};

use super::RawDomain;

/// A guest is quiet while its vCPUs together ran less than this share of one cpu since its
/// last reading: 1%, about what an idle Linux guest's timer ticks cost; touching memory at
/// that rate moves at most some tens of MiB per second, and the reading is renewed at least
/// every `--mem-quiet-interval` all the same.
pub const QUIET_SHARE: f64 = 0.01;

/// What the balloon statistics of one quantum read.
#[derive(Debug, Clone, Copy)]
pub struct BalloonRead<'a> {
    /// A quiet guest's reading is carried forward this long at most, ns; 0 reads every guest
    /// every time.
    pub quiet_ns: u64,
    /// Guests to read whatever they did (their balloon is moving toward a target).
    pub must_read: &'a [String],
}

/// How many guests were read and how many carried forward, in one quantum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonCounts {
    pub read: u64,
    pub carried: u64,
}

#[derive(Debug, Clone)]
struct Reading {
    id: u32,
    stats: BalloonStats,
    at_ns: u64,
    at_epoch_s: u64,
    /// Sum of the guest's vCPU run times at the reading, ns.
    run_ns: u64,
}

/// The last reading of each guest.
#[derive(Debug, Default)]
pub struct BalloonPoll {
    last: HashMap<String, Reading>,
}

/// Sum of a domain's vCPU run times, when every one is known.
fn run_ns(d: &RawDomain) -> Option<u64> {
    d.vcpus.iter().try_fold(0u64, |sum, v| v.as_ref().map(|t| sum.saturating_add(t.run_ns)))
}

#[allow(clippy::cast_precision_loss)]
fn ran(now_run: u64, then_run: u64, elapsed_ns: u64) -> bool {
    now_run < then_run || (now_run - then_run) as f64 >= QUIET_SHARE * elapsed_ns as f64
}

impl BalloonPoll {
    /// Forgets every reading (after a reconnect).
    pub fn reset(&mut self) {
        self.last.clear();
    }

    /// Reads the guests that are due (all of them in one bulk call when more than half are)
    /// and returns a reading for every guest that has one: fresh, or carried forward with
    /// its age in [`BalloonStats::read_age_s`].
    pub fn read(
        &mut self,
        host: &mut dyn Host,
        domains: &[RawDomain],
        how: BalloonRead<'_>,
    ) -> Result<(Vec<(String, BalloonStats)>, BalloonCounts), HostError> {
        let now = host.now_ns();
        self.last.retain(|n, r| domains.iter().any(|d| &d.desc.dom.name == n && d.desc.dom.id == r.id));
        let due: Vec<DomainRef> =
            domains.iter().filter(|d| self.due(d, now, &how)).map(|d| d.desc.dom.clone()).collect();
        let fresh = if due.is_empty() {
            Vec::new()
        } else if due.len() * 2 > domains.len() {
            host.balloon_stats()?
        } else {
            host.balloon_stats_of(&due)?
        };
        let (at_ns, at_epoch_s) = (now, host.epoch_s());
        let mut counts = BalloonCounts::default();
        let mut out = Vec::with_capacity(domains.len());
        for d in domains {
            let name = &d.desc.dom.name;
            if let Some((_, b)) = fresh.iter().find(|(n, _)| n == name) {
                counts.read += 1;
                out.push((name.clone(), b.clone()));
                let run_ns = run_ns(d).unwrap_or(0);
                let r = Reading { id: d.desc.dom.id, stats: b.clone(), at_ns, at_epoch_s, run_ns };
                self.last.insert(name.clone(), r);
            } else if due.iter().all(|r| &r.name != name)
                && let Some(r) = self.last.get(name)
            {
                counts.carried += 1;
                let mut b = r.stats.clone();
                b.read_age_s = at_epoch_s.saturating_sub(r.at_epoch_s);
                out.push((name.clone(), b));
            } else {
                // Due but not answered (its monitor busy, it stopped): no reading this time,
                // and not the old one either.
                self.last.remove(name);
            }
        }
        if log::log_enabled!(log::Level::Debug) {
            let read: Vec<&str> = out.iter().filter(|(_, b)| b.read_age_s == 0).map(|(n, _)| n.as_str()).collect();
            debug!("balloon statistics: read [{}], {} quiet guest(s) carried forward", read.join(" "), counts.carried);
        }
        Ok((out, counts))
    }

    fn due(&self, d: &RawDomain, now: u64, how: &BalloonRead<'_>) -> bool {
        let name = &d.desc.dom.name;
        let Some(r) = self.last.get(name) else { return true };
        if how.quiet_ns == 0 || how.must_read.contains(name) || now.saturating_sub(r.at_ns) >= how.quiet_ns {
            return true;
        }
        match run_ns(d) {
            Some(run) => ran(run, r.run_ns, now.saturating_sub(r.at_ns)),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests;
