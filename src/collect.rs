//! Collection: everything the agent reads from a [`Host`] in one quantum, as raw counters.
//!
//! Discovery (`describe`: threads, limits, opt-outs) runs only for domains not seen before (a
//! new name, or a new runtime id after a restart); every quantum reads the cheap listing, the
//! vCPU threads' counters and the host's cpu and memory; the bulk balloon call runs only when
//! the caller asks (its own, slower cadence).

use std::collections::HashMap;

use log::{debug, warn};

use crate::host::{BalloonStats, DomainDesc, Host, HostError, HostSample, VcpuTimes};

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
    /// Present on quanta where the bulk balloon call ran.
    pub balloons: Option<Vec<(String, BalloonStats)>>,
}

/// Keeps discovered domains between quanta.
#[derive(Debug, Default)]
pub struct Collector {
    known: HashMap<String, DomainDesc>,
    /// Domains whose discovery failed: not retried until their runtime id changes.
    failed: HashMap<String, u32>,
}

impl Collector {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget every domain (after a reconnect: ids and threads may all have changed).
    pub fn reset(&mut self) {
        self.known.clear();
        self.failed.clear();
    }

    /// Reads one quantum. A vanished domain is dropped, not an error; a lost connection is.
    pub fn sample(&mut self, host: &mut dyn Host, with_balloons: bool) -> Result<RawSample, HostError> {
        let listed = host.list_domains()?;
        self.known.retain(|name, d| listed.iter().any(|l| &l.name == name && l.id == d.dom.id));
        self.failed.retain(|name, id| listed.iter().any(|l| &l.name == name && l.id == *id));
        for dom in &listed {
            if self.known.contains_key(&dom.name) || self.failed.contains_key(&dom.name) {
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
                    self.known.insert(dom.name.clone(), desc);
                }
                Err(HostError::DomainGone(_)) => debug!("{} went away during discovery", dom.name),
                Err(e) if e.is_disconnect() => return Err(e),
                Err(e) => {
                    warn!("cannot discover domain {}: {e}; leaving it alone", dom.name);
                    self.failed.insert(dom.name.clone(), dom.id);
                }
            }
        }
        let mut domains = Vec::with_capacity(self.known.len());
        let mut stale: Vec<String> = Vec::new();
        for desc in self.known.values() {
            match host.vcpu_times(desc) {
                Ok(vcpus) => {
                    // A thread that vanished while its domain still runs means the vCPU set
                    // changed (hot-unplug, restart): discover the domain again next quantum.
                    if desc.vcpu_tids.iter().zip(&vcpus).any(|(tid, t)| tid.is_some() && t.is_none()) {
                        stale.push(desc.dom.name.clone());
                    }
                    domains.push(RawDomain { desc: desc.clone(), vcpus });
                }
                Err(HostError::DomainGone(_)) => stale.push(desc.dom.name.clone()),
                Err(e) if e.is_disconnect() => return Err(e),
                Err(e) => {
                    warn!("cannot read vCPU counters of {}: {e}", desc.dom.name);
                    stale.push(desc.dom.name.clone());
                }
            }
        }
        for name in stale {
            self.known.remove(&name);
        }
        domains.sort_by(|a, b| a.desc.dom.name.cmp(&b.desc.dom.name));
        let host_sample = host.host_sample()?;
        let balloons = if with_balloons { Some(host.balloon_stats()?) } else { None };
        Ok(RawSample { t_ns: host.now_ns(), epoch_s: host.epoch_s(), domains, host: host_sample, balloons })
    }
}
