//! The one boundary between the agent and the machine it runs on.
//!
//! Everything the agent reads (domains, vCPU thread times, pins, balloon statistics, host cpus
//! and memory) and everything it does (pin a vCPU or one of QEMU's other threads, resize a
//! balloon) goes through [`Host`].
//! Two implementations exist: [`libvirt::LibvirtHost`] (libvirt + procfs, the real thing) and
//! [`crate::sim::SimHost`] (an in-memory host driven by virtual time, for tests, benches and the
//! simulator).

pub mod control;
pub mod domain_xml;
pub mod events;
pub mod iothread;
pub mod libvirt;
pub mod opener;
pub mod procfs;
pub mod record;
pub mod schedstat;
pub mod stats;
pub mod stats_worker;

pub use record::{AgentPin, ThreadPin};

use serde::Serialize;

/// What the loop does about a failure: every [`HostError`] falls in exactly one class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The hypervisor connection is down (confirmed): drop all samples, reconnect with back-off.
    ConnectionLost,
    /// The domain went away: skip it, nothing to report.
    DomainGone,
    /// This action on this domain will keep failing (unsupported, refused, invalid): stop
    /// trying it, log once.
    Permanent,
    /// May work next time (busy, timed out, a monitor that did not answer): retry next quantum.
    Transient,
    /// The kernel or a cgroup cpuset refused the cpus asked for (`EINVAL` from an affinity
    /// call: a cpuset that leaves the cpu out, say `AllowedCPUs=` of `machine.slice`). A vCPU
    /// pin to one cpu leaves that cpu out of balancing for a while, without blocking the vCPU;
    /// anything else is handled as [`ErrorClass::Permanent`].
    CpuRefused,
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorClass::ConnectionLost => "connection lost",
            ErrorClass::DomainGone => "domain gone",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Transient => "transient",
            ErrorClass::CpuRefused => "cpu refused",
        })
    }
}

/// Errors from a host backend. [`HostError::class`] says what the loop does about each.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The hypervisor connection is down (libvirtd stopped, socket gone, keepalive timed out).
    #[error("hypervisor connection lost ({context})")]
    Disconnected {
        context: String,
        #[source]
        source: Option<virt::error::Error>,
    },
    /// The domain went away between discovery and this call: skip it, not fatal.
    #[error("domain {0} is gone")]
    DomainGone(String),
    /// A libvirt call failed; `class` is [`ErrorClass::Permanent`] or [`ErrorClass::Transient`].
    /// The source keeps libvirt's error code and domain.
    #[error("{op} on {object} failed ({class})")]
    Libvirt {
        op: &'static str,
        object: String,
        class: ErrorClass,
        #[source]
        source: virt::error::Error,
    },
    /// An action refused by a host that is not libvirt (the simulator, a test double).
    #[error("{op} on {object} failed ({class}): {detail}")]
    Refused { op: &'static str, object: String, class: ErrorClass, detail: String },
    /// A call that did not answer in time, or could not be made while earlier ones still wait
    /// (balloon statistics of a QEMU that does not answer its monitor): the loop goes on
    /// without its answer.
    #[error("{op}")]
    Unanswered {
        op: &'static str,
        #[source]
        source: stats_worker::StatsError,
    },
    /// Not tried: the domain's QEMU monitor is stuck or failed, and the call would wait for
    /// its job (`control`).
    #[error("{op} on {object} not tried")]
    MonitorBusy {
        op: &'static str,
        object: String,
        #[source]
        source: control::MonitorBusy,
    },
    /// Reading procfs or sysfs failed.
    #[error("cannot read {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A value read from the host could not be parsed.
    #[error("cannot parse {what}: {detail}")]
    Parse { what: String, detail: String },
}

impl HostError {
    /// The class that decides what the loop does about this error.
    pub fn class(&self) -> ErrorClass {
        match self {
            HostError::Disconnected { .. } => ErrorClass::ConnectionLost,
            HostError::DomainGone(_) => ErrorClass::DomainGone,
            HostError::Libvirt { class, .. } | HostError::Refused { class, .. } => *class,
            // A thread or file that vanished is handled as "gone" by the readers; any other
            // read failure may pass.
            HostError::Io { .. } | HostError::Unanswered { .. } | HostError::MonitorBusy { .. } => {
                ErrorClass::Transient
            }
            // Data that does not parse will not parse next time either.
            HostError::Parse { .. } => ErrorClass::Permanent,
        }
    }

    /// True when the error means the connection must be re-established.
    pub fn is_disconnect(&self) -> bool {
        self.class() == ErrorClass::ConnectionLost
    }

    /// libvirt's error code (`virErrorNumber`), when libvirt reported the error.
    pub fn libvirt_code(&self) -> Option<i64> {
        match self {
            HostError::Libvirt { source, .. } | HostError::Disconnected { source: Some(source), .. } => {
                Some(i64::from(source.code().to_raw()))
            }
            _ => None,
        }
    }

    /// A lost connection without a libvirt error behind it.
    pub fn disconnected(context: impl Into<String>) -> Self {
        HostError::Disconnected { context: context.into(), source: None }
    }
}

/// The error and its sources on one line (`a: b: c`), for log lines.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A running domain as seen by the cheap listing call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainRef {
    pub name: String,
    pub uuid: String,
    /// libvirt's runtime id: changes when the domain is restarted.
    pub id: u32,
}

/// Why the balancer must leave a domain (or a part of it) alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct OptOut {
    /// The domain opts out of CPU balancing, with the reason.
    pub cpu: Option<String>,
    /// The domain opts out of memory balancing, with the reason.
    pub memory: Option<String>,
}

/// What discovery learns about a domain; refreshed only when the domain set changes.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainDesc {
    pub dom: DomainRef,
    /// Host thread id of each vCPU, indexed by vCPU number. `None` when not found.
    pub vcpu_tids: Vec<Option<u32>>,
    /// The online vCPUs its definition gives: fewer threads found means its QEMU was still
    /// starting (they are looked for again).
    pub vcpu_count: u32,
    /// Host process id of the domain's QEMU, when known.
    pub pid: Option<u32>,
    /// Configured maximum memory (`<memory>`), KiB.
    pub max_kib: u64,
    /// Whether the domain has a virtio balloon device.
    pub has_balloon: bool,
    /// Balloon statistics period configured in the live XML, seconds (0 = off).
    pub stats_period_s: u32,
    /// Opt-outs from the domain's definition (metadata, persistent pins).
    pub opt_out: OptOut,
    /// When the domain's QEMU process started, epoch seconds, when known.
    pub started_epoch_s: Option<u64>,
    /// Affinity of the QEMU process's main thread: what a vCPU thread nobody pinned has.
    /// Once the agent has pinned the emulator (the main thread), the emulator's recorded prior.
    pub default_affinity: Option<CpuSet>,
    /// QEMU's emulator thread and the domain's I/O threads, with their live pins.
    pub threads: Vec<ThreadDesc>,
}

impl DomainDesc {
    /// A description that knows nothing but the domain: no vCPU threads, no process, no
    /// memory or balloon, no opt-out, no QEMU threads. What tests start from.
    pub fn bare(dom: DomainRef) -> Self {
        DomainDesc {
            dom,
            vcpu_tids: vec![],
            vcpu_count: 0,
            pid: None,
            max_kib: 0,
            has_balloon: false,
            stats_period_s: 0,
            opt_out: OptOut::default(),
            started_epoch_s: None,
            default_affinity: None,
            threads: vec![],
        }
    }
}

/// One of QEMU's threads that are not vCPUs: the emulator (main) thread, or an I/O thread
/// (`<iothreads>`) by its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QemuThread {
    Emulator,
    #[serde(rename = "iothread")]
    IoThread(u32),
}

impl std::fmt::Display for QemuThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QemuThread::Emulator => f.write_str("emulator"),
            QemuThread::IoThread(id) => write!(f, "I/O thread {id}"),
        }
    }
}

/// A QEMU thread of a domain, as discovery found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ThreadDesc {
    pub thread: QemuThread,
    /// Its pin in the live definition (`<cputune><emulatorpin>`, `<iothreadpin>`); `None` when
    /// it has none: it runs on every host cpu.
    pub pinned_to: Option<CpuSet>,
    /// The agent's pin record holds the thread's prior affinity: the agent pinned it.
    pub recorded: bool,
}

/// Cumulative scheduler counters of one vCPU thread.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VcpuTimes {
    /// Time on a cpu, ns.
    pub run_ns: u64,
    /// Time runnable but waiting for a cpu, ns.
    pub wait_ns: u64,
    /// Host cpus this thread may run on (its affinity), sorted.
    pub affinity_mask: CpuSet,
    /// Host cpu the thread last ran on, when read.
    pub last_cpu: Option<u32>,
}

/// A small sorted set of host cpu ids.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash, Serialize)]
#[serde(transparent)]
pub struct CpuSet(pub Vec<u32>);

impl CpuSet {
    pub fn single(cpu: u32) -> Self {
        CpuSet(vec![cpu])
    }
    /// The only cpu of the set, if it has exactly one.
    pub fn as_single(&self) -> Option<u32> {
        match self.0.as_slice() {
            [c] => Some(*c),
            _ => None,
        }
    }
}

impl std::fmt::Display for CpuSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::cpulist::format(&self.0))
    }
}

/// Balloon statistics of one guest, as reported by libvirt's balloon group. Every field but
/// `current_kib` and `maximum_kib` comes from inside the guest and is untrusted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BalloonStats {
    pub current_kib: u64,
    pub maximum_kib: u64,
    pub unused_kib: Option<u64>,
    pub available_kib: Option<u64>,
    pub usable_kib: Option<u64>,
    pub swap_in_kib: Option<u64>,
    pub major_fault: Option<u64>,
    /// Epoch seconds of the guest's last stats update.
    pub last_update_s: Option<u64>,
    /// `None` when read from the host this interval; for a quiet guest's last reading carried
    /// forward (`collect::balloons`), how long ago it was read, seconds. Nothing is done to a
    /// guest on a carried reading: it is read again first.
    #[serde(skip)]
    pub carried_for_s: Option<u64>,
}

/// Cumulative busy time of each host cpu (from `/proc/stat`), ns, indexed by position in
/// `HostSample::cpu_ids`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSample {
    pub cpu_ids: Vec<u32>,
    pub cpu_busy_ns: Vec<u64>,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    /// `some avg10` of `/proc/pressure/memory`, percent, where the kernel has PSI.
    pub mem_pressure_some_avg10: Option<f64>,
}

/// One host cpu's place in the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CpuTopo {
    pub cpu: u32,
    pub node: u32,
    pub package: u32,
    pub core: u32,
    /// Last-level-cache domain: the lowest cpu id sharing this cpu's last-level cache (the
    /// package's first cpu where sysfs does not say).
    pub llc: u32,
}

impl CpuTopo {
    /// What identifies its physical core: cpus with the same key are SMT siblings.
    pub fn core_key(&self) -> (u32, u32, u32) {
        (self.node, self.package, self.core)
    }
}

/// The home node of a guest whose vCPUs are pinned to `pinned_nodes` (the node of each pinned
/// vCPU's cpu), where its memory most likely is: the most common one, the lowest on a tie;
/// `None` when none is pinned. The planner places by it, the simulator charges remote time by
/// it.
pub fn home_node(pinned_nodes: &[u32]) -> Option<u32> {
    let mut best: Option<(usize, u32)> = None;
    for &n in pinned_nodes {
        let k = pinned_nodes.iter().filter(|&&x| x == n).count();
        if best.is_none_or(|(bk, bn)| k > bk || (k == bk && n < bn)) {
            best = Some((k, n));
        }
    }
    best.map(|(_, n)| n)
}

/// The host's online cpus and their topology, sorted by cpu id.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Topology {
    pub cpus: Vec<CpuTopo>,
}

impl Topology {
    /// A flat topology: one node, one package, one LLC, one core per cpu.
    pub fn flat(n: u32) -> Self {
        Topology { cpus: (0..n).map(|cpu| CpuTopo { cpu, node: 0, package: 0, core: cpu, llc: 0 }).collect() }
    }
    pub fn get(&self, cpu: u32) -> Option<&CpuTopo> {
        self.cpus.binary_search_by_key(&cpu, |c| c.cpu).ok().map(|i| &self.cpus[i])
    }
    /// Ids of the cpus sharing a physical core with `cpu` (itself included).
    pub fn siblings(&self, cpu: u32) -> Vec<u32> {
        match self.get(cpu) {
            Some(t) => self.cpus.iter().filter(|o| o.core_key() == t.core_key()).map(|o| o.cpu).collect(),
            None => vec![],
        }
    }
}

/// The narrow interface to a hypervisor host. Read side first, then the two actions.
///
/// Implementations must treat a domain that vanished as [`HostError::DomainGone`] and a lost
/// hypervisor connection as [`HostError::Disconnected`]; they never panic on what the host returns.
pub trait Host {
    /// Monotonic time of this host, ns. The simulator returns virtual time.
    fn now_ns(&self) -> u64;
    /// Wall-clock time, epoch seconds (to judge the freshness of guest stats).
    fn epoch_s(&self) -> u64;
    /// (Re)establish the hypervisor connection if it is down. Cheap when connected.
    fn ensure_connected(&mut self) -> Result<(), HostError>;
    /// Cheap: the running domains.
    fn list_domains(&mut self) -> Result<Vec<DomainRef>, HostError>;
    /// Expensive: threads, limits and opt-outs of one domain. Called when the domain set
    /// changes, when the host reports the domain changed, and on a slow cadence.
    fn describe(&mut self, dom: &DomainRef) -> Result<DomainDesc, HostError>;
    /// The domains whose definition changed since the last call (names; libvirt's domain
    /// events), or `None` when this host cannot tell: then definitions are re-read on a short
    /// cadence instead.
    fn changed_domains(&mut self) -> Option<Vec<String>> {
        None
    }
    /// The domains whose memory figures libvirt said may have changed since the last call (a
    /// balloon moved, a device came or went): their balloon statistics are read at the next
    /// memory interval rather than carried forward. Empty when this host cannot tell.
    fn memory_changed_domains(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Cheap (procfs): scheduler counters and affinity of each vCPU thread of a domain,
    /// indexed like `desc.vcpu_tids` (`None` for a vCPU whose thread is unknown or gone).
    fn vcpu_times(&mut self, desc: &DomainDesc) -> Result<Vec<Option<VcpuTimes>>, HostError>;
    /// One bulk call: balloon statistics of every running domain, keyed by name.
    fn balloon_stats(&mut self) -> Result<Vec<(String, BalloonStats)>, HostError>;
    /// The same for the running domains given only (libvirt asks each guest's QEMU over its
    /// monitor: the cost is per domain). A domain that is gone is left out, not an error.
    fn balloon_stats_of(&mut self, doms: &[DomainRef]) -> Result<Vec<(String, BalloonStats)>, HostError> {
        let mut all = self.balloon_stats()?;
        all.retain(|(n, _)| doms.iter().any(|d| &d.name == n));
        Ok(all)
    }
    /// Host cpu busy times and memory.
    fn host_sample(&mut self) -> Result<HostSample, HostError>;
    /// Host cpu topology (read at start, after reconnects, and when the online cpus change).
    fn topology(&mut self) -> Result<Topology, HostError>;
    /// The cpus the machine has, online or not; by default its online ones.
    fn present_cpus(&mut self) -> Result<Vec<u32>, HostError> {
        Ok(self.topology()?.cpus.iter().map(|c| c.cpu).collect())
    }
    /// Pin one vCPU of a running domain to one host cpu (live only).
    fn pin_vcpu(&mut self, dom: &DomainRef, vcpu: u32, cpu: u32) -> Result<(), HostError>;
    /// Set a running domain's balloon target (live only), KiB.
    fn set_balloon(&mut self, dom: &DomainRef, target_kib: u64) -> Result<(), HostError>;
    /// Turn on a running domain's balloon statistics period (live only), seconds.
    fn set_stats_period(&mut self, dom: &DomainRef, period_s: u32) -> Result<(), HostError>;
    /// Set one vCPU's affinity to a set of host cpus (live only): how the agent gives back the
    /// floating affinity a vCPU had before it pinned it.
    fn pin_vcpu_set(&mut self, dom: &DomainRef, vcpu: u32, cpus: &CpuSet) -> Result<(), HostError>;
    /// The agent's record of the vCPUs it pinned on a running domain, each with the affinity it
    /// had before (live `<metadata>`, see [`record`]); empty when there is none.
    fn agent_pins(&mut self, dom: &DomainRef) -> Result<Vec<AgentPin>, HostError>;
    /// Replace that record (live only; never the persistent definition). An empty list removes
    /// it. The opt-outs and the thread entries beside it are kept.
    fn set_agent_pins(&mut self, dom: &DomainRef, pins: &[AgentPin]) -> Result<(), HostError>;
    /// Pin QEMU's emulator thread or one I/O thread of a running domain to a set of host cpus
    /// (live only).
    fn pin_thread(&mut self, dom: &DomainRef, thread: QemuThread, cpus: &CpuSet) -> Result<(), HostError>;
    /// The agent's record of the QEMU threads (emulator, I/O threads) it pinned, each with the
    /// affinity it had before; in the same live `<metadata>` element as the vCPU record.
    fn agent_threads(&mut self, dom: &DomainRef) -> Result<Vec<ThreadPin>, HostError>;
    /// Replace the thread entries of that record (live only), keeping its vCPU entries and the
    /// opt-outs. An empty list with no vCPU entries removes the element.
    fn set_agent_threads(&mut self, dom: &DomainRef, threads: &[ThreadPin]) -> Result<(), HostError>;
}

#[cfg(test)]
mod tests {
    #[test]
    fn home_is_the_node_of_most_pinned_vcpus() {
        assert_eq!(super::home_node(&[]), None);
        assert_eq!(super::home_node(&[1, 0, 1]), Some(1));
        assert_eq!(super::home_node(&[1, 0]), Some(0));
    }
}
