//! What the loop remembers about actions that failed, so that a failure is acted on by its
//! class instead of being re-planned and warned about every quantum.
//!
//! - permanent (unsupported, refused, invalid for this domain): the action is blocked for as
//!   long as this run of the domain lasts (its runtime id), logged once;
//! - transient (busy, timed out): retried next quantum; after [`STRIKES`] failures in a row it
//!   is blocked for [`BACKOFF_NS`], logged once, then tried again;
//! - a cpu refused (a vCPU pin to one cpu failed with `EINVAL`: a cgroup cpuset leaves it
//!   out): while another guest's vCPU may run there, the cpu is usable and the refusal is
//!   this guest's own (its cpuset): that vCPU is blocked as for a permanent failure. Else
//!   (a cpuset of all guests, say `machine.slice`'s `AllowedCPUs=`) the cpu is left out of
//!   balancing for [`REFUSED_CPU_NS`], logged once, and no vCPU is blocked: blocking every
//!   vCPU sent there switched balancing off guest by guest;
//! - a domain that went away, or a lost connection, is not this module's business.
//!
//! Blocked pins are fed to the CPU planner as unmovable vCPUs (their load stays where it is);
//! blocked balloon changes are dropped from the memory plan with the reason in the verdict;
//! blocked emulator and I/O thread pins are dropped from the plan (the thread stays where it is).

use std::collections::{HashMap, HashSet};

use log::{info, warn};

use crate::host::{ErrorClass, HostError, QemuThread, chain};
use crate::policy::Action;

/// Transient failures in a row that block an action for a while.
pub const STRIKES: u32 = 3;
/// How long an action that kept failing is left alone, ns.
pub const BACKOFF_NS: u64 = 300_000_000_000;
/// How long a cpu that guests refuse is left out of balancing, ns.
pub const REFUSED_CPU_NS: u64 = 600_000_000_000;

/// Which action: one vCPU's pin, a guest's balloon, or the pin of one of its QEMU threads.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Kind {
    Pin(u32),
    Balloon,
    Thread(QemuThread),
}

impl Kind {
    pub fn of(a: &Action) -> Kind {
        match a {
            Action::Pin { vcpu, .. } => Kind::Pin(*vcpu),
            Action::Balloon { .. } => Kind::Balloon,
            Action::PinThread { thread, .. } => Kind::Thread(*thread),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// Runtime id of the domain when it failed: a restarted domain starts clean.
    id: u32,
    strikes: u32,
    /// Blocked until this time (ns); `u64::MAX`: for as long as this run of the domain lasts.
    until_ns: u64,
    why: String,
}

/// Failed actions, per domain name and action; and the cpus left out, until when (ns).
#[derive(Debug, Default)]
pub struct Failures {
    map: HashMap<(String, Kind), Entry>,
    refused: HashMap<u32, u64>,
    /// (domain, cpu): refused by that guest while another ran there: its own cpuset.
    own_refusals: HashSet<(String, u32)>,
}

impl Failures {
    pub fn new() -> Self {
        Self::default()
    }

    /// An action succeeded: forget its failures.
    pub fn succeeded(&mut self, domain: &str, kind: Kind) {
        if let Some(e) = self.map.remove(&(domain.to_string(), kind.clone()))
            && e.strikes > 0
        {
            info!("{kind:?} of {domain} works again after {} failure(s)", e.strikes);
        }
    }

    /// An action failed with `err` at `now_ns` on the domain's run `id`. Logs only when the
    /// failure changes what the loop does (first failure, blocked); never once per quantum.
    /// `shared_target`: another guest's vCPU may run on the cpu the action pinned to.
    pub fn failed(
        &mut self,
        domain: &str,
        id: u32,
        action: &Action,
        err: &HostError,
        now_ns: u64,
        shared_target: bool,
    ) {
        if err.class() == ErrorClass::CpuRefused
            && let Action::Pin { to, .. } = action
            && let Some(cpu) = to.as_single()
        {
            // The guest's own cpuset: once seen, its next refusals of that cpu are judged so
            // too (the guest that showed the cpu usable may have moved away since).
            let own = (domain.to_string(), cpu);
            if shared_target || self.own_refusals.contains(&own) {
                self.own_refusals.insert(own);
                return self.failed_as(domain, id, action, err, now_ns);
            }
            let until = now_ns.saturating_add(REFUSED_CPU_NS);
            if self.refused.insert(cpu, until).is_none() {
                warn!(
                    "failed: {action}: {}; cpu {cpu} refused (a cgroup cpuset of the guests?): leaving it out of balancing for {}s",
                    chain(err),
                    REFUSED_CPU_NS / 1_000_000_000
                );
            }
            return;
        }
        self.failed_as(domain, id, action, err, now_ns);
    }

    /// The failure of an action as its class says, for that action alone.
    fn failed_as(&mut self, domain: &str, id: u32, action: &Action, err: &HostError, now_ns: u64) {
        let kind = Kind::of(action);
        let key = (domain.to_string(), kind);
        let e = self.map.entry(key).or_insert(Entry { id, strikes: 0, until_ns: 0, why: String::new() });
        if e.id != id {
            *e = Entry { id, strikes: 0, until_ns: 0, why: String::new() };
        }
        e.strikes += 1;
        e.why = chain(err);
        match err.class() {
            ErrorClass::CpuRefused => {
                e.until_ns = u64::MAX;
                warn!(
                    "failed: {action}: {}; cpus refused for this guest (a cgroup cpuset?): not trying this again while the domain runs",
                    e.why
                );
            }
            ErrorClass::Permanent => {
                e.until_ns = u64::MAX;
                warn!("failed: {action}: {}; not trying this again while the domain runs", e.why);
            }
            ErrorClass::Transient if e.strikes >= STRIKES => {
                e.until_ns = now_ns.saturating_add(BACKOFF_NS);
                warn!(
                    "failed {} times in a row: {action}: {}; leaving it alone for {}s",
                    e.strikes,
                    e.why,
                    BACKOFF_NS / 1_000_000_000
                );
            }
            ErrorClass::Transient if e.strikes == 1 => warn!("failed: {action}: {}; will retry", e.why),
            _ => {}
        }
    }

    /// The cpus left out of balancing now (sorted).
    pub fn refused_cpus(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.refused.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Drops what is no longer true: domains gone or restarted, back-offs over, refused cpus
    /// whose time is up (tried again).
    pub fn expire(&mut self, running: &[(String, u32)], now_ns: u64) {
        self.own_refusals.retain(|(d, _)| running.iter().any(|(n, _)| n == d));
        self.refused.retain(|cpu, until| {
            let over = now_ns >= *until;
            if over {
                info!("trying cpu {cpu} again after it was refused");
            }
            !over
        });
        self.map.retain(|(name, _), e| {
            let alive = running.iter().any(|(n, id)| n == name && *id == e.id);
            let over = e.until_ns != 0 && e.until_ns != u64::MAX && now_ns >= e.until_ns;
            if over {
                info!("trying {name} again after the back-off");
            }
            alive && !over
        });
    }

    /// Why this action is blocked now, if it is.
    pub fn blocked(&self, domain: &str, kind: &Kind, now_ns: u64) -> Option<&str> {
        let e = self.map.get(&(domain.to_string(), kind.clone()))?;
        (now_ns < e.until_ns).then_some(e.why.as_str())
    }

    /// The vCPUs whose pin is blocked now, per domain: the CPU planner leaves them where they are.
    pub fn blocked_pins(&self, now_ns: u64) -> HashMap<String, HashSet<u32>> {
        let mut out: HashMap<String, HashSet<u32>> = HashMap::new();
        for ((name, kind), e) in &self.map {
            if let Kind::Pin(v) = kind
                && now_ns < e.until_ns
            {
                out.entry(name.clone()).or_default().insert(*v);
            }
        }
        out
    }

    /// Every blocked action with its reason, for `diagnose` and status lines.
    pub fn list(&self, now_ns: u64) -> Vec<(String, Kind, String)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .filter(|(_, e)| now_ns < e.until_ns)
            .map(|((n, k), e)| (n.clone(), k.clone(), e.why.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0).then(format!("{:?}", a.1).cmp(&format!("{:?}", b.1))));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::CpuSet;

    fn pin(vcpu: u32) -> Action {
        Action::Pin {
            domain: "web".into(),
            vcpu,
            from: CpuSet::single(0),
            to: CpuSet::single(1),
            kind: crate::policy::PinKind::Move,
            reason: "test".into(),
        }
    }
    fn err(class: ErrorClass) -> HostError {
        HostError::Refused { op: "pin", object: "web".into(), class, detail: "no".into() }
    }

    #[test]
    fn permanent_failure_blocks_for_the_life_of_the_domain_run() {
        let mut f = Failures::new();
        f.failed("web", 7, &pin(0), &err(ErrorClass::Permanent), 10, false);
        assert!(f.blocked("web", &Kind::Pin(0), u64::MAX - 1).is_some());
        assert!(f.blocked("web", &Kind::Pin(1), 11).is_none(), "only that vCPU");
        assert!(f.blocked_pins(11)["web"].contains(&0));
        f.expire(&[("web".into(), 7)], 1_000_000_000_000);
        assert!(f.blocked("web", &Kind::Pin(0), 1_000_000_000_000).is_some());
        // Restarted (new runtime id): starts clean.
        f.expire(&[("web".into(), 8)], 1_000_000_000_000);
        assert!(f.blocked("web", &Kind::Pin(0), 1_000_000_000_000).is_none());
    }

    #[test]
    fn transient_failures_block_after_strikes_then_retry() {
        let mut f = Failures::new();
        for i in 0..STRIKES - 1 {
            f.failed("web", 1, &pin(0), &err(ErrorClass::Transient), u64::from(i), false);
            assert!(f.blocked("web", &Kind::Pin(0), u64::from(i)).is_none(), "retried next quantum");
        }
        f.failed("web", 1, &pin(0), &err(ErrorClass::Transient), 100, false);
        assert!(f.blocked("web", &Kind::Pin(0), 101).is_some());
        let running = [("web".to_string(), 1)];
        f.expire(&running, 100 + BACKOFF_NS - 1);
        assert!(f.blocked("web", &Kind::Pin(0), 100 + BACKOFF_NS - 1).is_some());
        f.expire(&running, 100 + BACKOFF_NS);
        assert!(f.blocked("web", &Kind::Pin(0), 100 + BACKOFF_NS).is_none(), "tried again after the back-off");
    }

    #[test]
    fn success_clears_the_strikes() {
        let mut f = Failures::new();
        f.failed("web", 1, &pin(0), &err(ErrorClass::Transient), 0, false);
        f.failed("web", 1, &pin(0), &err(ErrorClass::Transient), 1, false);
        f.succeeded("web", Kind::Pin(0));
        f.failed("web", 1, &pin(0), &err(ErrorClass::Transient), 2, false);
        assert!(f.blocked("web", &Kind::Pin(0), 3).is_none(), "strikes start over after a success");
        assert!(f.list(3).is_empty());
    }
}
