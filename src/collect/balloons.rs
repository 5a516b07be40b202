//! Which guests' balloon statistics are read from the host each memory interval.
//!
//! Reading them is what the memory balancer costs libvirtd: libvirt asks each guest's QEMU
//! over its monitor, about 0.2 ms of libvirtd's time per guest (docs/design.md). A guest's
//! memory use changes only while its vCPUs run (the guest touches, frees or swaps pages, its
//! balloon driver moves), so a guest that barely ran since its last reading is *quiet*: that
//! reading is carried forward, for at most `--mem-quiet-interval`, if the memory planner left
//! the guest steady (not reclaiming, granting, moving its balloon or about to). A carried
//! reading is for looking only: the daemon does nothing to a guest on one, it reads it first.
//! A guest is read at the next interval when it ran, when its vCPU counters are unknown, when
//! it is new or restarted, when libvirt said its memory may have moved (its balloon, a device,
//! a reboot, a resume; then until a reading the guest made after that), when its last reading
//! was incomplete, and when the planner did not leave it steady.

use std::collections::{HashMap, HashSet};

use log::debug;

use crate::host::{BalloonStats, DomainRef, Host, HostError};

use super::RawDomain;

/// A guest is quiet while its vCPUs together ran less than this share of one cpu since its
/// last reading and in the last interval: 1%, about what an idle Linux guest's timer ticks
/// cost. Touching memory costs the guest CPU time, so a quiet guest's use has changed little.
pub const QUIET_SHARE: f64 = 0.01;

/// What the balloon statistics of one quantum read.
#[derive(Debug, Clone, Copy)]
pub struct BalloonRead<'a> {
    /// A quiet guest's reading is carried forward this long at most, ns; 0 reads every guest
    /// every time.
    pub quiet_ns: u64,
    /// The memory interval, ns: a reading due before the next interval is read at this one.
    pub interval_ns: u64,
    /// The only guests whose reading may be carried forward (the memory planner left them
    /// steady); every other guest is read whatever it did.
    pub may_carry: &'a HashSet<String>,
}

/// How many guests were read and how many carried forward, in one quantum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonCounts {
    pub read: u64,
    pub carried: u64,
    /// 1 when the interval's statistics call failed or went unanswered (no guest read).
    pub unread: u64,
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

/// The last reading of each guest, and what each guest's vCPUs had run at the last interval.
#[derive(Debug, Default)]
pub struct BalloonPoll {
    last: HashMap<String, Reading>,
    /// (host clock, Σ vCPU run ns) of each guest at the last interval.
    seen: HashMap<String, (u64, u64)>,
    /// Guests libvirt said may have changed, and when (epoch s): read until a reading the guest
    /// made after that (a reading fetched at once may still be the guest's figures from before).
    changed: HashMap<String, u64>,
}

/// Sum of a domain's vCPU run times, when every one is known.
fn run_ns(d: &RawDomain) -> Option<u64> {
    d.vcpus.iter().try_fold(0u64, |sum, v| v.as_ref().map(|t| sum.saturating_add(t.run_ns)))
}

/// Ran at least [`QUIET_SHARE`] of a cpu between two points (or its counters went back).
#[allow(clippy::cast_precision_loss)]
fn ran(now: (u64, u64), then: (u64, u64)) -> bool {
    let (t1, r1) = now;
    let (t0, r0) = then;
    r1 < r0 || (r1 - r0) as f64 >= QUIET_SHARE * t1.saturating_sub(t0) as f64
}

/// A reading worth carrying: the guest's own figures and when it made them.
fn complete(b: &BalloonStats) -> bool {
    b.last_update_s.is_some() && (b.usable_kib.is_some() || b.available_kib.is_some())
}

impl BalloonPoll {
    /// Forgets every reading (after a reconnect).
    pub fn reset(&mut self) {
        self.last.clear();
        self.seen.clear();
        self.changed.clear();
    }

    /// Domains libvirt said may have changed at `epoch_s`: read them at the next interval, and
    /// at each one after until a reading the guest made after `epoch_s`.
    pub fn changed(&mut self, names: &[String], epoch_s: u64) {
        for n in names {
            self.changed.insert(n.clone(), epoch_s);
        }
    }

    /// Forgets what libvirt said of domains no longer listed (also while nothing is read): the
    /// one place those names are dropped.
    pub fn keep_only(&mut self, listed: &[DomainRef]) {
        if !self.changed.is_empty() {
            self.changed.retain(|n, _| listed.iter().any(|l| &l.name == n));
        }
    }

    /// Reads the guests that are due (all of them in one bulk call when more than half are)
    /// and returns a reading for every guest that has one: fresh, or carried forward
    /// ([`BalloonStats::carried_for_s`]).
    pub fn read(
        &mut self,
        host: &mut dyn Host,
        domains: &[RawDomain],
        how: BalloonRead<'_>,
    ) -> Result<(Vec<(String, BalloonStats)>, BalloonCounts), HostError> {
        let now = host.now_ns();
        let running: HashMap<&str, u32> = domains.iter().map(|d| (d.desc.dom.name.as_str(), d.desc.dom.id)).collect();
        self.last.retain(|n, r| running.get(n.as_str()) == Some(&r.id));
        self.seen.retain(|n, _| running.contains_key(n.as_str()));
        let runs: Vec<Option<u64>> = domains.iter().map(run_ns).collect();
        let due: Vec<DomainRef> = domains
            .iter()
            .zip(&runs)
            .filter(|&(d, &run)| self.due(d, run, now, &how))
            .map(|(d, _)| d.desc.dom.clone())
            .collect();
        let fresh: HashMap<String, BalloonStats> = if due.is_empty() {
            HashMap::new()
        } else if due.len() * 2 > domains.len() {
            host.balloon_stats()?.into_iter().collect()
        } else {
            host.balloon_stats_of(&due)?.into_iter().collect()
        };
        let due: HashSet<&str> = due.iter().map(|d| d.name.as_str()).collect();
        let at_epoch_s = host.epoch_s();
        let mut counts = BalloonCounts::default();
        let mut out = Vec::with_capacity(domains.len());
        let (mut read_names, mut no_figures) = (Vec::new(), Vec::new());
        for (d, &run) in domains.iter().zip(&runs) {
            let name = &d.desc.dom.name;
            if let Some(b) = fresh.get(name) {
                counts.read += 1;
                read_names.push(name.as_str());
                if !complete(b) {
                    no_figures.push(name.as_str());
                }
                out.push((name.clone(), b.clone()));
                // The guest's own figures of after the event (a reading without them is not
                // carried anyway).
                if self.changed.get(name).is_some_and(|&since| b.last_update_s.is_none_or(|u| u > since)) {
                    self.changed.remove(name);
                }
                match run {
                    // An incomplete reading (no guest figures yet, its monitor was busy) is
                    // not carried: the guest stays due (the planner holds such a guest, so it
                    // is not left steady either; this does not depend on that).
                    Some(run_ns) if complete(b) => {
                        let r = Reading { id: d.desc.dom.id, stats: b.clone(), at_ns: now, at_epoch_s, run_ns };
                        self.last.insert(name.clone(), r);
                    }
                    _ => {
                        self.last.remove(name);
                    }
                }
            } else if !due.contains(name.as_str())
                && let Some(r) = self.last.get(name)
            {
                counts.carried += 1;
                let mut b = r.stats.clone();
                b.carried_for_s = Some(at_epoch_s.saturating_sub(r.at_epoch_s));
                out.push((name.clone(), b));
            } else {
                // Due but not answered (it stopped, it has no balloon): no reading this time,
                // and not the old one either.
                self.last.remove(name);
            }
            match run {
                Some(r) => self.seen.insert(name.clone(), (now, r)),
                None => self.seen.remove(name),
            };
        }
        debug!(
            "balloon statistics: read [{}], {} quiet guest(s) carried forward{}",
            read_names.join(" "),
            counts.carried,
            if no_figures.is_empty() {
                String::new()
            } else {
                format!("; without the guest's own figures: [{}]", no_figures.join(" "))
            }
        );
        Ok((out, counts))
    }

    /// `run`: the sum of `d`'s vCPU run times now, when every one is known.
    fn due(&self, d: &RawDomain, run: Option<u64>, now: u64, how: &BalloonRead<'_>) -> bool {
        let name = d.desc.dom.name.as_str();
        let Some(r) = self.last.get(name) else { return true };
        // Read at this interval what would be past the quiet interval at the next one.
        let age = now.saturating_sub(r.at_ns).saturating_add(how.interval_ns / 2);
        if how.quiet_ns == 0 || !how.may_carry.contains(name) || self.changed.contains_key(name) || age >= how.quiet_ns
        {
            return true;
        }
        let Some(run) = run else { return true };
        // Quiet since the reading, and in the last interval (a burst since is not averaged away).
        ran((now, run), (r.at_ns, r.run_ns)) || self.seen.get(name).is_none_or(|&last| ran((now, run), last))
    }
}

#[cfg(test)]
mod tests;
