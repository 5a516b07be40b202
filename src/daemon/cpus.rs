//! The host cpus the balancer may use, as they change under a running agent: cpu hotplug
//! (the topology read again, an offline cpu's vCPUs placed again), cpus guests refuse (a
//! cgroup cpuset), and the cpus allowed earlier in the run but not now. Kept apart from
//! `daemon.rs` for size.

use std::collections::HashSet;

use log::{debug, warn};

use super::Agent;
use super::config::model_config;
use crate::host::Host;
use crate::model::Snapshot;
use crate::policy::Action;

impl<H: Host> Agent<H> {
    /// Cpu hotplug: the online cpus come with every host sample; when they differ from the
    /// topology the model knows, the topology is read again and the allowed cpus follow (an
    /// offline cpu's vCPUs are placed again as retired, a cpu back online joins the pool),
    /// keeping every vCPU's history.
    pub(super) fn follow_hotplug(&mut self, online: &[u32]) {
        let Some(t) = self.tracker.as_ref() else { return };
        if t.topology().cpus.iter().map(|c| c.cpu).eq(online.iter().copied()) {
            return;
        }
        let known: Vec<u32> = t.topology().cpus.iter().map(|c| c.cpu).collect();
        match self.host.topology() {
            Ok(topo) => {
                let now: Vec<u32> = topo.cpus.iter().map(|c| c.cpu).collect();
                let gone: Vec<u32> = known.iter().copied().filter(|c| !now.contains(c)).collect();
                let new: Vec<u32> = now.iter().copied().filter(|c| !known.contains(c)).collect();
                let list = |v: &[u32]| if v.is_empty() { "none".to_string() } else { crate::cpulist::format(v) };
                warn!("online cpus changed: offline {}, online again {}", list(&gone), list(&new));
                let mc = model_config(&self.cfg, &topo, &self.refused);
                if let Some(t) = self.tracker.as_mut() {
                    t.set_topology(topo, mc);
                }
            }
            // Mid-hotplug the lists can disagree for a moment: the next quantum tries again.
            Err(e) => debug!("online cpus changed, topology not readable yet: {e}"),
        }
    }

    /// Cpus a pin was refused onto leave the allowed cpus until their time is up (their
    /// vCPUs are placed again, as on a retired cpu), and come back after it.
    pub(super) fn follow_refused(&mut self) {
        let refused = self.failures.refused_cpus();
        if refused != self.refused {
            self.refused = refused;
            if let Some(t) = self.tracker.as_mut() {
                t.reconfigure(model_config(&self.cfg, t.topology(), &self.refused));
            }
        }
    }

    /// Cpus allowed earlier in the run but not now: vCPUs pinned there are placed again.
    pub(super) fn retired(&self, snap: &Snapshot) -> HashSet<u32> {
        // A cpu guests refuse is not retired: a vCPU already there got there, and stays.
        self.ever_allowed.iter().copied().filter(|c| !snap.host.cpus.contains(c) && !self.refused.contains(c)).collect()
    }
}

/// Another guest's vCPU may run on the one cpu `a` pins to (its affinity, which the kernel
/// keeps inside its cpuset, holds it): a refusal of that cpu is then the guest's own (its
/// cgroup cpuset), not the host's.
pub(super) fn others_may_run_there(snap: &Snapshot, a: &Action) -> bool {
    let Action::Pin { domain, to, .. } = a else { return false };
    let Some(cpu) = to.as_single() else { return false };
    snap.domains.iter().filter(|d| &d.dom.name != domain).any(|d| d.vcpus.iter().any(|v| v.pinned_to.0.contains(&cpu)))
}

#[cfg(test)]
mod tests;
