//! Collection: everything the agent reads from a [`Host`] in one quantum, as raw counters.
//!
//! Discovery (`describe`: threads, limits, opt-outs) runs for domains not seen before (a new
//! name, or a new runtime id after a restart), at once for a domain the host reports changed
//! (libvirt's domain events: an opt-out set with `virsh metadata --live`, a pin, a device), and
//! again on a slow cadence for every known one, so that an operator's live change takes effect
//! without a restart even where no event tells of it. A host that cannot report changes gets
//! the faster cadence. Discovery has a time budget per quantum: a burst of new
//! guests is discovered over several quanta, and the guests already known are still sampled
//! on time. Every quantum reads the cheap listing, the vCPU threads' counters and the host's
//! cpu and memory; the bulk balloon call runs only when the caller asks (its own cadence).

use std::collections::HashMap;

use log::{debug, info, warn};

use crate::host::{BalloonStats, DomainDesc, Host, HostError, HostSample, VcpuTimes};

mod balloons;
pub use balloons::{BalloonCounts, BalloonRead, QUIET_SHARE};

/// One domain's raw counters of one quantum.
#[derive(Debug, Clone)]
pub struct RawDomain {
    pub desc: DomainDesc,
    /// Indexed by vCPU; `None` where the thread was not found or vanished.
    pub vcpus: Vec<Option<VcpuTimes>>,
}

/// Everything read in one quantum.
#[derive(Debug, Clone)]
pub struct RawSample {
    pub t_ns: u64,
    pub epoch_s: u64,
    pub domains: Vec<RawDomain>,
    pub host: HostSample,
    /// Present on quanta where balloon statistics were asked for: read, or a quiet guest's
    /// last reading carried forward (`carried_for_s`).
    pub balloons: Option<Vec<(String, BalloonStats)>>,
    /// How many of those were read and how many carried forward.
    pub balloon_counts: BalloonCounts,
}

/// How often known domains are described again, and how much discovery a quantum may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// A known domain's definition is re-read when it is older than this, ns, on a host that
    /// cannot report changes ([`Host::changed_domains`] is `None`).
    pub refresh_ns: u64,
    /// The same on a host that reports changes: only a safety net for a change no event
    /// tells of (a pin written only to the persistent definition, say).
    pub watched_refresh_ns: u64,
    /// Most known domains re-read per quantum (oldest first).
    pub refresh_per_quantum: usize,
    /// Discovery (new and refreshed domains) stops for this quantum once it has taken this
    /// long, ns; the rest waits for the next quantum.
    pub budget_ns: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            refresh_ns: 10_000_000_000,
            watched_refresh_ns: 600_000_000_000,
            refresh_per_quantum: 8,
            budget_ns: 250_000_000,
        }
    }
}

/// A domain whose discovery failed for a passing reason (a timeout, a busy libvirtd) is tried
/// again this long after (host clock, ns).
pub const DISCOVERY_RETRY_NS: u64 = 30_000_000_000;
/// A QEMU process younger than this (seconds) may still be creating its vCPU threads: a
/// domain with fewer threads found than its definition has is described again meanwhile.
const STARTING_S: u64 = 120;

/// Keeps discovered domains between quanta.
#[derive(Debug, Default)]
pub struct Collector {
    cfg: DiscoveryConfig,
    known: HashMap<String, DomainDesc>,
    /// When (host clock, ns) each known domain was last described.
    described_at: HashMap<String, u64>,
    /// Domains whose discovery failed: (runtime id, when to try again, host clock ns). A
    /// permanent failure (`None`) is not retried until the runtime id changes; a transient one
    /// (a timeout, a busy libvirtd) after [`DISCOVERY_RETRY_NS`].
    failed: HashMap<String, (u32, Option<u64>)>,
    balloons: balloons::BalloonPoll,
    /// The balloon statistics read failed last time (warned once, until they come back).
    balloons_failing: bool,
}

impl Collector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_config(cfg: DiscoveryConfig) -> Self {
        Collector { cfg, ..Self::default() }
    }

    /// New cadence and budget (settings reloaded); what is known stays.
    pub fn set_config(&mut self, cfg: DiscoveryConfig) {
        self.cfg = cfg;
    }

    /// Asks for these domains' definitions to be read again at the next quantum (e.g. a balloon
    /// above the maximum the agent knows of: the maximum may have changed).
    pub fn rediscover(&mut self, names: &[String]) {
        for n in names {
            if let Some(t) = self.described_at.get_mut(n) {
                *t = 0;
            }
        }
    }

    /// Forget every domain (after a reconnect: ids and threads may all have changed).
    pub fn reset(&mut self) {
        self.known.clear();
        self.described_at.clear();
        self.failed.clear();
        self.balloons.reset();
    }

    /// Reads one quantum. A vanished domain is dropped, not an error; a lost connection is.
    pub fn sample(
        &mut self,
        host: &mut dyn Host,
        with_balloons: Option<BalloonRead<'_>>,
    ) -> Result<RawSample, HostError> {
        let listed = host.list_domains()?;
        let changed = host.changed_domains();
        if let Some(names) = &changed {
            if !names.is_empty() {
                debug!("changed, to describe again: {}", names.join(", "));
            }
            self.rediscover(names);
        }
        let memory = host.memory_changed_domains();
        if !memory.is_empty() {
            debug!("balloon or devices changed, statistics to read again: {}", memory.join(", "));
            self.balloons.changed(&memory, host.epoch_s());
        }
        self.balloons.keep_only(&listed);
        let refresh_ns = if changed.is_some() { self.cfg.watched_refresh_ns } else { self.cfg.refresh_ns };
        self.known.retain(|name, d| listed.iter().any(|l| &l.name == name && l.id == d.dom.id));
        self.described_at.retain(|name, _| self.known.contains_key(name));
        self.failed.retain(|name, (id, _)| listed.iter().any(|l| &l.name == name && l.id == *id));
        let start = host.now_ns();
        let waits = |f: Option<&(u32, Option<u64>)>| f.is_some_and(|(_, at)| at.is_none_or(|at| start < at));
        let over_budget = |host: &dyn Host| host.now_ns().saturating_sub(start) >= self.cfg.budget_ns;
        let mut deferred = 0usize;
        for dom in &listed {
            if self.known.contains_key(&dom.name) || waits(self.failed.get(&dom.name)) {
                continue;
            }
            if over_budget(host) {
                deferred += 1;
                continue;
            }
            match host.describe(dom) {
                Ok(desc) => {
                    debug!(
                        "discovered {} (id {}, {} vCPUs, pid {:?})",
                        dom.name,
                        dom.id,
                        desc.vcpu_tids.len(),
                        desc.pid
                    );
                    if self.failed.remove(&dom.name).is_some() {
                        info!("discovered domain {} after an earlier failure", dom.name);
                    }
                    self.described_at.insert(dom.name.clone(), host.now_ns());
                    self.known.insert(dom.name.clone(), desc);
                }
                Err(HostError::DomainGone(_)) => debug!("{} went away during discovery", dom.name),
                Err(e) if e.is_disconnect() => return Err(e),
                Err(e) => {
                    let transient = e.class() == crate::host::ErrorClass::Transient;
                    let retry = transient.then(|| host.now_ns().saturating_add(DISCOVERY_RETRY_NS));
                    let why = crate::host::chain(&e);
                    match self.failed.insert(dom.name.clone(), (dom.id, retry)) {
                        Some(_) => debug!("cannot discover domain {} (again): {why}", dom.name),
                        None if transient => warn!(
                            "cannot discover domain {}: {why}; leaving it alone, trying again every {} s",
                            dom.name,
                            DISCOVERY_RETRY_NS / 1_000_000_000
                        ),
                        None => warn!("cannot discover domain {}: {why}; leaving it alone while it runs", dom.name),
                    }
                }
            }
        }
        if deferred > 0 {
            debug!("discovery budget spent: {deferred} new domain(s) wait for the next quantum");
        }
        self.refresh(host, start, refresh_ns)?;
        let mut domains = Vec::with_capacity(self.known.len());
        let mut stale: Vec<String> = Vec::new();
        let mut incomplete: Vec<String> = Vec::new();
        let epoch_s = host.epoch_s();
        for desc in self.known.values() {
            match host.vcpu_times(desc) {
                Ok(vcpus) => {
                    // A thread that vanished while its domain still runs means the vCPU set
                    // changed (hot-unplug, restart): discover the domain again next quantum.
                    if desc.vcpu_tids.iter().zip(&vcpus).any(|(tid, t)| tid.is_some() && t.is_none()) {
                        stale.push(desc.dom.name.clone());
                    }
                    // Fewer vCPU threads found than its definition has online (listed while
                    // its QEMU started): described again, in place, every refresh interval
                    // (five quanta), events or not, until they are found.
                    let at = self.described_at.get(&desc.dom.name).copied().unwrap_or(0);
                    let found = desc.vcpu_tids.iter().flatten().count();
                    // Only while its QEMU is young: one whose threads have other names never
                    // shows them, and is not described again every few quanta for its run.
                    let young = desc.started_epoch_s.is_none_or(|s| epoch_s.saturating_sub(s) < STARTING_S);
                    if found < desc.vcpu_count as usize
                        && young
                        && at != 0
                        && start.saturating_sub(at) >= self.cfg.refresh_ns
                    {
                        debug!(
                            "{}: {found} of {} vCPU threads found; describing it again",
                            desc.dom.name, desc.vcpu_count
                        );
                        incomplete.push(desc.dom.name.clone());
                    }
                    domains.push(RawDomain { desc: desc.clone(), vcpus });
                }
                Err(HostError::DomainGone(_)) => stale.push(desc.dom.name.clone()),
                Err(e) if e.is_disconnect() => return Err(e),
                Err(e) => {
                    warn!("cannot read vCPU counters of {}: {}", desc.dom.name, crate::host::chain(&e));
                    stale.push(desc.dom.name.clone());
                }
            }
        }
        for name in stale {
            self.known.remove(&name);
            self.described_at.remove(&name);
        }
        self.rediscover(&incomplete);
        domains.sort_by(|a, b| a.desc.dom.name.cmp(&b.desc.dom.name));
        let host_sample = host.host_sample()?;
        // A failed read (a QEMU that does not answer, libvirtd busy) costs the memory balancer
        // this interval, not the quantum: CPU balancing goes on.
        let (balloons, balloon_counts) = match with_balloons.map(|how| self.balloons.read(host, &domains, how)) {
            Some(Ok((b, counts))) => {
                if std::mem::take(&mut self.balloons_failing) {
                    info!("balloon statistics read again");
                }
                (Some(b), counts)
            }
            Some(Err(e)) if e.is_disconnect() => return Err(e),
            Some(Err(e)) => {
                let e = crate::host::chain(&e);
                if std::mem::replace(&mut self.balloons_failing, true) {
                    debug!("balloon statistics not read this interval: {e}");
                } else {
                    warn!(
                        "balloon statistics not read this interval (memory balancing waits; said once until they come back): {e}"
                    );
                }
                (None, BalloonCounts { unread: 1, ..BalloonCounts::default() })
            }
            None => (None, BalloonCounts::default()),
        };
        Ok(RawSample {
            t_ns: host.now_ns(),
            epoch_s: host.epoch_s(),
            domains,
            host: host_sample,
            balloons,
            balloon_counts,
        })
    }

    /// Re-reads the definitions of the known domains described longest ago, within the budget.
    /// A change an operator made (opt-out, pins in the persistent definition, maximum memory)
    /// is logged and takes effect from this quantum on.
    fn refresh(&mut self, host: &mut dyn Host, start: u64, refresh_ns: u64) -> Result<(), HostError> {
        let now = host.now_ns();
        let mut due: Vec<(u64, String)> = self
            .described_at
            .iter()
            .filter(|(_, t)| now.saturating_sub(**t) >= refresh_ns || **t == 0)
            .map(|(n, t)| (*t, n.clone()))
            .collect();
        due.sort();
        for (_, name) in due.into_iter().take(self.cfg.refresh_per_quantum) {
            if host.now_ns().saturating_sub(start) >= self.cfg.budget_ns {
                break;
            }
            let Some(old) = self.known.get(&name) else { continue };
            let dom = old.dom.clone();
            match host.describe(&dom) {
                Ok(desc) => {
                    if desc.opt_out != old.opt_out {
                        info!(
                            "{name}: opt-outs changed: cpu {:?} -> {:?}, memory {:?} -> {:?}",
                            old.opt_out.cpu, desc.opt_out.cpu, old.opt_out.memory, desc.opt_out.memory
                        );
                    }
                    if desc.max_kib != old.max_kib {
                        info!("{name}: maximum memory changed: {} -> {} KiB", old.max_kib, desc.max_kib);
                    }
                    self.described_at.insert(name.clone(), host.now_ns());
                    self.known.insert(name, desc);
                }
                Err(HostError::DomainGone(_)) => {
                    self.known.remove(&name);
                    self.described_at.remove(&name);
                }
                Err(e) if e.is_disconnect() => return Err(e),
                Err(e) => {
                    // Keep what is known; try again at the next refresh.
                    debug!("cannot re-read {name}: {}", crate::host::chain(&e));
                    self.described_at.insert(name, host.now_ns());
                }
            }
        }
        Ok(())
    }
}
