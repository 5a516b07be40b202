//! The real host: libvirt for domains and actions, procfs for the per-quantum counters.

use std::path::PathBuf;
use std::time::Instant;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::error::{ErrorNumber, ErrorNumberEnum};
use virt::sys;

use super::control;
use super::domain_xml::parse_domain_xml;
use super::events;
use super::opener::{OPEN_DEADLINE, OpenError, Opener};
use super::procfs as pfs;
use super::schedstat::{self, SchedstatFiles};
use super::stats;
use super::stats_worker::{Ask, STATS_DEADLINE, StatsError, StatsWorker};
use super::{AgentPin, CpuSet, QemuThread, ThreadPin, record};
use super::{BalloonStats, DomainDesc, DomainRef, ErrorClass, Host, HostError, HostSample, Topology, VcpuTimes};

/// XML namespace of the opt-out element in a domain's `<metadata>`:
/// `<vmb:balancer xmlns:vmb="https://vm-balancer.org/xmlns/1" manage="no"/>` leaves the whole
/// domain alone; `cpu="no"` or `memory="no"` leaves only that resource alone.
pub const METADATA_NS: &str = "https://vm-balancer.org/xmlns/1";

/// XML namespace of the agent's pin record in a domain's live `<metadata>` (see
/// [`super::record`]). Its own namespace, not the opt-out's: libvirt keeps one element per
/// namespace, and an operator setting the opt-out with `virsh metadata --set` must not erase
/// the record of what to give back.
pub const PINS_NS: &str = "https://vm-balancer.org/xmlns/1/pins";

/// Keepalive: a probe every `KEEPALIVE_INTERVAL_S` seconds; after `KEEPALIVE_COUNT` probes
/// without an answer libvirt closes the connection, and a call blocked on a frozen libvirtd
/// returns an error instead of waiting forever (about 20 s).
pub const KEEPALIVE_INTERVAL_S: i32 = 5;
pub const KEEPALIVE_COUNT: u32 = 3;

/// Starts libvirt's default event loop on a thread of its own, once per process. The client
/// keepalive needs it: probes and their timeouts are events.
fn start_event_loop() -> bool {
    static STARTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *STARTED.get_or_init(|| {
        if let Err(e) = virt::event::event_register_default_impl() {
            log::warn!("cannot start libvirt's event loop ({e}): no keepalive, a frozen libvirtd may stall the agent");
            return false;
        }
        let spawned = std::thread::Builder::new().name("libvirt-events".into()).spawn(|| {
            loop {
                if let Err(e) = virt::event::event_run_default_impl() {
                    log::debug!("libvirt event loop: {e}");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        });
        spawned.is_ok()
    })
}

/// libvirt + procfs host.
pub struct LibvirtHost {
    uri: String,
    root: PathBuf,
    conn: Option<Connect>,
    start: Instant,
    /// The vCPU threads' `schedstat` files, open between quanta.
    schedstat: SchedstatFiles,
    /// Domains libvirt's events reported changed since the last quantum.
    changed: events::Changed,
    /// The event callbacks registered on `conn`; `None` when it has none (no event loop, or
    /// the registration failed): definitions are then re-read on the short cadence.
    watching: Option<Vec<std::os::raw::c_int>>,
    /// The last listing of running domains and when it was made: while libvirt reports no
    /// lifecycle event, the list stands (re-listed every `RELIST_EVERY` all the same).
    listed: Option<(Instant, Vec<DomainRef>)>,
    /// Balloon statistics are read by a thread of their own, with a deadline
    /// (`stats_worker`): a QEMU that does not answer must not stop the loop.
    stats: StatsWorker,
    /// Connections are opened by a thread of their own, with a deadline (`opener`).
    opener: Opener,
}

/// Most vCPUs a domain is read with (KVM's own limit is 4096 on x86; a thread name claiming
/// more is not believed).
const MAX_VCPUS: usize = 4096;
/// With domain events, the running domains are listed again at least this often (a safety
/// net for an event lost); without them, every quantum.
const RELIST_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl LibvirtHost {
    /// A host for `uri`; nothing is opened until [`Host::ensure_connected`].
    pub fn new(uri: &str) -> Self {
        // libvirt prints every error to stderr by default; errors reach us as values instead.
        virt::error::clear_error_callback();
        let root = PathBuf::from("/");
        let schedstat = SchedstatFiles::new(&root, schedstat::open_file_budget());
        LibvirtHost {
            uri: uri.to_string(),
            root,
            conn: None,
            start: Instant::now(),
            schedstat,
            changed: events::Changed::default(),
            watching: None,
            listed: None,
            stats: StatsWorker::libvirt(uri),
            opener: Opener::default(),
        }
    }

    /// Drops the connection, with its event callbacks first (each holds a reference to the
    /// connection, which would keep it open).
    fn disconnect(&mut self) {
        if let (Some(c), Some(ids)) = (&self.conn, self.watching.take()) {
            events::unwatch(c, &ids);
        }
        self.conn = None;
        self.listed = None;
        self.stats.reset();
    }

    fn conn(&self) -> Result<&Connect, HostError> {
        self.conn.as_ref().ok_or_else(|| HostError::disconnected("not connected"))
    }

    /// Turns a libvirt error into a [`HostError`] of the right class. A connection-level code
    /// counts as a lost connection only when the connection confirms it (`is_alive` false):
    /// libvirt also reports a failed `sched_setaffinity` of one guest as a system error.
    fn fail(&mut self, op: &'static str, object: &str, e: virt::error::Error) -> HostError {
        let alive = self.conn.as_ref().is_some_and(|c| c.is_alive().unwrap_or(false));
        match classify(e.code(), e.message(), alive) {
            ErrorClass::ConnectionLost => {
                self.disconnect();
                HostError::Disconnected { context: op.to_string(), source: Some(e) }
            }
            ErrorClass::DomainGone => {
                // The listing no longer says what runs.
                self.listed = None;
                HostError::DomainGone(object.to_string())
            }
            // `EINVAL` says a cpu was refused only of an affinity call; of any other, it is
            // an invalid request.
            ErrorClass::CpuRefused if !op.starts_with("pin ") => {
                HostError::Libvirt { op, object: object.to_string(), class: ErrorClass::Permanent, source: e }
            }
            class => HostError::Libvirt { op, object: object.to_string(), class, source: e },
        }
    }

    /// Balloon statistics from the worker thread, within [`STATS_DEADLINE`].
    fn read_stats(&mut self, ask: Ask, op: &'static str) -> Result<Vec<(String, BalloonStats)>, HostError> {
        self.conn()?;
        match self.stats.read(ask, STATS_DEADLINE) {
            Ok(recs) => Ok(stats::balloons_of(&recs)),
            // The worker's own connection failing says nothing of this one's, unless this one
            // is down too.
            Err(StatsError::Libvirt(_, e)) if !self.conn.as_ref().is_some_and(|c| c.is_alive().unwrap_or(false)) => {
                Err(self.fail(op, "host", e))
            }
            Err(e) => Err(HostError::Unanswered { op, source: e }),
        }
    }

    /// [`Self::lookup`] for a call that needs the domain's job: not made while its QEMU
    /// monitor is stuck (the call would wait 30 s for the job).
    fn lookup_ready(&mut self, dom: &DomainRef, op: &'static str) -> Result<Domain, HostError> {
        let d = self.lookup(dom)?;
        control::monitor_free(&d).map_err(|source| HostError::MonitorBusy { op, object: dom.name.clone(), source })?;
        Ok(d)
    }

    fn lookup(&mut self, dom: &DomainRef) -> Result<Domain, HostError> {
        let r = find_run(self.conn()?, dom);
        r.map_err(|e| self.fail("lookup", &dom.name, e))?.ok_or_else(|| HostError::DomainGone(dom.name.clone()))
    }
}

/// `dom` on `conn`, when it is still the same run of the domain (`None`: the name now names
/// another run, or none).
pub(super) fn find_run(conn: &Connect, dom: &DomainRef) -> Result<Option<Domain>, virt::error::Error> {
    let d = conn.lookup_domain_by_name(&dom.name)?;
    Ok((d.id() == Some(dom.id)).then_some(d))
}

impl Host for LibvirtHost {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn epoch_s(&self) -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    fn ensure_connected(&mut self) -> Result<(), HostError> {
        if let Some(c) = &self.conn {
            if c.is_alive().unwrap_or(false) {
                return Ok(());
            }
            self.disconnect();
        }
        let events = start_event_loop();
        match self.opener.open(&self.uri, OPEN_DEADLINE) {
            Ok(c) => {
                if events {
                    super::opener::keep_alive(&c, &self.uri);
                }
                // What changed before this connection is unknown anyway: everything is
                // discovered afresh after a reconnect (and `disconnect` dropped the listing).
                self.changed.clear();
                self.watching = if events {
                    events::watch(&c, &self.changed)
                        .inspect_err(|e| {
                            log::info!(
                                "no domain events from {}: {e}; re-reading definitions every few quanta",
                                self.uri
                            )
                        })
                        .ok()
                } else {
                    None
                };
                self.conn = Some(c);
                Ok(())
            }
            Err(OpenError::Failed(e)) => {
                Err(HostError::Disconnected { context: format!("cannot open {}", self.uri), source: Some(e) })
            }
            Err(e) => Err(HostError::Disconnected { context: format!("opening {}: {e}", self.uri), source: None }),
        }
    }

    fn list_domains(&mut self) -> Result<Vec<DomainRef>, HostError> {
        // A quantum's reads start with the listing: the threads the last quantum did not read
        // have their files closed.
        self.schedstat.start_pass();
        // Taken before listing: an event during the listing makes the next quantum list again.
        let lifecycle = self.changed.take_lifecycle();
        if let Some((at, doms)) = &self.listed
            && self.watching.is_some()
            && !lifecycle
            && at.elapsed() < RELIST_EVERY
        {
            return Ok(doms.clone());
        }
        let r = self.conn()?.list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE);
        let doms = r.map_err(|e| self.fail("list domains", "host", e))?;
        let mut out = Vec::with_capacity(doms.len());
        for d in doms {
            // name and uuid are read from the local object: no round trip.
            let (Ok(name), Ok(uuid), Some(id)) = (d.name(), d.uuid_string(), d.id()) else { continue };
            out.push(DomainRef { name, uuid, id });
        }
        self.listed = Some((Instant::now(), out.clone()));
        Ok(out)
    }

    fn describe(&mut self, dom: &DomainRef) -> Result<DomainDesc, HostError> {
        let d = self.lookup(dom)?;
        let live = d.xml_desc(0).map_err(|e| self.fail("dumpxml", &dom.name, e))?;
        let persistent = d.is_persistent().map_err(|e| self.fail("is-persistent", &dom.name, e))?;
        // A transient domain has no inactive definition (libvirt would return the live one,
        // with the agent's own live pins in it).
        let inactive = if persistent {
            Some(d.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE).map_err(|e| self.fail("dumpxml --inactive", &dom.name, e))?)
        } else {
            None
        };
        let facts = parse_domain_xml(&live, inactive.as_deref())
            .map_err(|detail| HostError::Parse { what: format!("XML of {}", dom.name), detail })?;
        let pid = pfs::qemu_pid(&self.root, &dom.name);
        // A domain that vanished between the listing and here has no task directory.
        let found = pid.map(|p| pfs::vcpu_threads(&self.root, p).unwrap_or_default()).unwrap_or_default();
        let vcpu_tids = vcpu_slots(facts.vcpus, &found);
        let default_affinity = facts.default_affinity(|| pid.and_then(|p| pfs::affinity(&self.root, p, p)));
        Ok(DomainDesc {
            dom: dom.clone(),
            vcpu_tids,
            vcpu_count: facts.vcpus,
            pid,
            max_kib: facts.max_kib,
            has_balloon: facts.has_balloon,
            stats_period_s: facts.stats_period_s,
            opt_out: facts.opt_out,
            started_epoch_s: pid.and_then(|p| pfs::process_start_epoch_s(&self.root, p)),
            default_affinity,
            threads: facts.threads,
        })
    }

    fn changed_domains(&mut self) -> Option<Vec<String>> {
        self.watching.as_ref()?;
        Some(self.changed.take_names())
    }

    fn memory_changed_domains(&mut self) -> Vec<String> {
        self.changed.take_memory()
    }

    fn vcpu_times(&mut self, desc: &DomainDesc) -> Result<Vec<Option<VcpuTimes>>, HostError> {
        let Some(pid) = desc.pid else { return Ok(vec![None; desc.vcpu_tids.len()]) };
        let mut out = Vec::with_capacity(desc.vcpu_tids.len());
        for tid in &desc.vcpu_tids {
            let t = match tid {
                Some(tid) => read_vcpu(&self.root, &mut self.schedstat, pid, *tid)?,
                None => None,
            };
            out.push(t);
        }
        Ok(out)
    }

    fn balloon_stats(&mut self) -> Result<Vec<(String, BalloonStats)>, HostError> {
        self.read_stats(Ask::All, "bulk balloon stats")
    }

    fn balloon_stats_of(&mut self, doms: &[DomainRef]) -> Result<Vec<(String, BalloonStats)>, HostError> {
        if doms.is_empty() {
            return Ok(Vec::new());
        }
        self.read_stats(Ask::Of(doms.to_vec()), "balloon stats")
    }

    fn host_sample(&mut self) -> Result<HostSample, HostError> {
        pfs::host_sample(&self.root)
    }

    fn topology(&mut self) -> Result<Topology, HostError> {
        pfs::topology(&self.root)
    }

    fn present_cpus(&mut self) -> Result<Vec<u32>, HostError> {
        pfs::present_cpus(&self.root)
    }

    fn pin_vcpu(&mut self, dom: &DomainRef, vcpu: u32, cpu: u32) -> Result<(), HostError> {
        let d = self.lookup_ready(dom, "pin vcpu")?;
        let mut map = vec![0u8; cpu as usize / 8 + 1];
        map[cpu as usize / 8] |= 1 << (cpu % 8);
        d.pin_vcpu_flags(vcpu, &map, sys::VIR_DOMAIN_AFFECT_LIVE).map_err(|e| self.fail("pin vcpu", &dom.name, e))
    }

    fn set_balloon(&mut self, dom: &DomainRef, target_kib: u64) -> Result<(), HostError> {
        let d = self.lookup_ready(dom, "set memory")?;
        d.set_memory_flags(target_kib, sys::VIR_DOMAIN_MEM_LIVE).map_err(|e| self.fail("set memory", &dom.name, e))
    }

    fn set_stats_period(&mut self, dom: &DomainRef, period_s: u32) -> Result<(), HostError> {
        let d = self.lookup_ready(dom, "set stats period")?;
        let p = i32::try_from(period_s).unwrap_or(i32::MAX);
        d.set_memory_stats_period(p, sys::VIR_DOMAIN_MEM_LIVE).map_err(|e| self.fail("set stats period", &dom.name, e))
    }

    fn pin_vcpu_set(&mut self, dom: &DomainRef, vcpu: u32, cpus: &CpuSet) -> Result<(), HostError> {
        let d = self.lookup_ready(dom, "pin vcpu")?;
        d.pin_vcpu_flags(vcpu, &cpumap(cpus), sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|e| self.fail("pin vcpu", &dom.name, e))
    }

    fn pin_thread(&mut self, dom: &DomainRef, thread: QemuThread, cpus: &CpuSet) -> Result<(), HostError> {
        let d = self.lookup_ready(dom, "pin thread")?;
        let (map, live) = (cpumap(cpus), sys::VIR_DOMAIN_AFFECT_LIVE);
        match thread {
            QemuThread::Emulator => d.pin_emulator(&map, live).map_err(|e| self.fail("pin emulator", &dom.name, e)),
            QemuThread::IoThread(id) => {
                super::iothread::pin_iothread(&d, id, &map, live).map_err(|e| self.fail("pin iothread", &dom.name, e))
            }
        }
    }

    fn agent_threads(&mut self, dom: &DomainRef) -> Result<Vec<ThreadPin>, HostError> {
        let d = self.lookup(dom)?;
        match self.pins_element(&d, dom)? {
            Some(x) => record::parse_threads(&x).map_err(|detail| HostError::Parse { what: metadata_of(dom), detail }),
            None => Ok(Vec::new()),
        }
    }

    fn set_agent_threads(&mut self, dom: &DomainRef, threads: &[ThreadPin]) -> Result<(), HostError> {
        let d = self.lookup_ready(dom, "record threads")?;
        let now = self.pins_element(&d, dom)?;
        let next = record::with_threads(now.as_deref(), threads)
            .map_err(|detail| HostError::Parse { what: metadata_of(dom), detail })?;
        self.write_pins_element(&d, dom, now.is_some(), next.as_deref())
    }

    fn agent_pins(&mut self, dom: &DomainRef) -> Result<Vec<AgentPin>, HostError> {
        let d = self.lookup(dom)?;
        match self.pins_element(&d, dom)? {
            Some(x) => record::parse_pins(&x).map_err(|detail| HostError::Parse { what: metadata_of(dom), detail }),
            None => Ok(Vec::new()),
        }
    }

    fn set_agent_pins(&mut self, dom: &DomainRef, pins: &[AgentPin]) -> Result<(), HostError> {
        let d = self.lookup_ready(dom, "record pins")?;
        let now = self.pins_element(&d, dom)?;
        let next = record::with_pins(now.as_deref(), pins)
            .map_err(|detail| HostError::Parse { what: metadata_of(dom), detail })?;
        self.write_pins_element(&d, dom, now.is_some(), next.as_deref())
    }
}

impl LibvirtHost {
    /// Sets the record's live `<metadata>` element to `next`, or removes it (`None`) when there
    /// is one (`exists`).
    fn write_pins_element(
        &mut self,
        d: &Domain,
        dom: &DomainRef,
        exists: bool,
        next: Option<&str>,
    ) -> Result<(), HostError> {
        let kind = sys::VIR_DOMAIN_METADATA_ELEMENT as i32;
        let r = match next {
            Some(xml) => d.set_metadata(kind, Some(xml), Some("vmbpins"), Some(PINS_NS), sys::VIR_DOMAIN_AFFECT_LIVE),
            None if exists => d.set_metadata(kind, None, None, Some(PINS_NS), sys::VIR_DOMAIN_AFFECT_LIVE),
            None => return Ok(()),
        };
        r.map_err(|e| self.fail("set metadata", &dom.name, e))
    }

    /// The live `<metadata>` element of the pin record, as libvirt returns it (without
    /// prefix); `None` when the domain has none.
    fn pins_element(&mut self, d: &Domain, dom: &DomainRef) -> Result<Option<String>, HostError> {
        let kind = sys::VIR_DOMAIN_METADATA_ELEMENT as i32;
        match d.metadata(kind, Some(PINS_NS), sys::VIR_DOMAIN_AFFECT_LIVE) {
            Ok(x) => Ok(Some(x)),
            Err(e) if e.code().is_known_and(|c| matches!(c, ErrorNumber::NoDomainMetadata)) => Ok(None),
            Err(e) => Err(self.fail("get metadata", &dom.name, e)),
        }
    }
}

/// libvirt's cpu bitmap of a set: bit `c % 8` of byte `c / 8` is cpu `c`.
fn cpumap(cpus: &CpuSet) -> Vec<u8> {
    let mut map = vec![0u8; cpus.0.iter().max().map_or(0, |&c| c as usize / 8) + 1];
    for &c in &cpus.0 {
        map[c as usize / 8] |= 1 << (c % 8);
    }
    map
}

fn metadata_of(dom: &DomainRef) -> String {
    format!("<metadata> of {}", dom.name)
}

fn read_vcpu(
    root: &std::path::Path,
    files: &mut SchedstatFiles,
    pid: u32,
    tid: u32,
) -> Result<Option<VcpuTimes>, HostError> {
    let Some((run_ns, wait_ns)) = files.read(pid, tid)? else { return Ok(None) };
    let Some(affinity_mask) = pfs::affinity(root, pid, tid) else { return Ok(None) };
    // Where a floating thread runs is needed to attribute its load; a pinned one runs on its pin.
    let last_cpu = match affinity_mask.as_single() {
        Some(c) => Some(c),
        None => pfs::last_cpu(root, pid, tid),
    };
    Ok(Some(VcpuTimes { run_ns, wait_ns, affinity_mask, last_cpu }))
}

/// Each vCPU's thread, by vCPU number, from the `(vCPU, thread)` pairs found: slots for the
/// `count` online vCPUs and up to the highest found (with a vCPU disabled, `virsh setvcpu
/// --disable`, the online ones are not 0 to the count). A slot without a thread is `None`.
fn vcpu_slots(count: u32, found: &[(u32, u32)]) -> Vec<Option<u32>> {
    let highest = found.iter().map(|&(n, _)| n as usize + 1).filter(|&n| n <= MAX_VCPUS).max();
    let mut slots = vec![None; highest.unwrap_or(0).max(count as usize)];
    for &(n, tid) in found {
        if let Some(slot) = slots.get_mut(n as usize) {
            *slot = Some(tid);
        }
    }
    slots
}

/// Sorts a libvirt error into what the loop does about it. `alive`: the connection still
/// answers (`virConnectIsAlive`).
pub fn classify(code: ErrorNumberEnum, msg: &str, alive: bool) -> ErrorClass {
    use ErrorNumber as N;
    let is = |f: fn(ErrorNumber) -> bool| code.is_known_and(f);
    if is(|c| matches!(c, N::NoDomain)) {
        return ErrorClass::DomainGone;
    }
    if !alive || is(|c| matches!(c, N::NoConnect | N::InvalidConn)) {
        return ErrorClass::ConnectionLost;
    }
    if is(|c| matches!(c, N::OperationInvalid)) && msg.contains("not running") {
        // "domain is not running": it stopped between the listing and this call.
        return ErrorClass::DomainGone;
    }
    if is(|c| matches!(c, N::SystemError)) {
        // The kernel's answer to one thread of one guest, on a healthy connection:
        // ESRCH while the guest shuts down, EINVAL when a cpuset forbids the cpu.
        if msg.contains("No such process") {
            return ErrorClass::DomainGone;
        }
        if msg.contains("Invalid argument") {
            return ErrorClass::CpuRefused;
        }
        if msg.contains("Operation not permitted") {
            return ErrorClass::Permanent;
        }
        return ErrorClass::Transient;
    }
    if is(|c| {
        matches!(
            c,
            N::NoSupport
                | N::InvalidArg
                | N::ArgumentUnsupported
                | N::ConfigUnsupported
                | N::OperationUnsupported
                | N::OperationDenied
                | N::AccessDenied
                | N::AuthFailed
                | N::XmlError
                | N::XmlDetail
                | N::InvalidDomain
                | N::NoDevice
                | N::DeviceMissing
                | N::OperationInvalid
        )
    }) {
        return ErrorClass::Permanent;
    }
    // Timeouts, busy monitors, RPC hiccups on a live connection, anything unknown: try again.
    ErrorClass::Transient
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_slots_reach_the_highest_vcpu_found() {
        assert_eq!(vcpu_slots(2, &[(0, 10), (1, 11)]), [Some(10), Some(11)]);
        // vCPU 1 disabled: 0, 2 and 3 online (count 3).
        assert_eq!(vcpu_slots(3, &[(0, 10), (2, 12), (3, 13)]), [Some(10), None, Some(12), Some(13)]);
        // Listed while its QEMU starts: no thread yet.
        assert_eq!(vcpu_slots(2, &[]), [None, None]);
        // A name claiming a vCPU past any limit is not believed.
        assert_eq!(vcpu_slots(1, &[(0, 10), (u32::MAX, 11)]), [Some(10)]);
    }

    #[test]
    fn libvirt_errors_are_sorted_by_what_the_loop_does() {
        use ErrorNumber as N;
        let c = |n: N, msg: &str, alive: bool| classify(ErrorNumberEnum::from(n), msg, alive);
        // A failed sched_setaffinity on a healthy connection is not a lost connection.
        let einval = "cannot set CPU affinity on process 42: Invalid argument";
        assert_eq!(c(N::SystemError, einval, true), ErrorClass::CpuRefused);
        let esrch = "cannot set CPU affinity on process 42: No such process";
        assert_eq!(c(N::SystemError, esrch, true), ErrorClass::DomainGone);
        assert_eq!(
            c(N::SystemError, "Unable to read from monitor: Connection reset by peer", true),
            ErrorClass::Transient
        );
        // The same code on a connection that no longer answers is a lost connection.
        assert_eq!(c(N::SystemError, einval, false), ErrorClass::ConnectionLost);
        assert_eq!(c(N::Rpc, "cannot recv data", false), ErrorClass::ConnectionLost);
        assert_eq!(c(N::Rpc, "timed out", true), ErrorClass::Transient);
        assert_eq!(c(N::InvalidConn, "", true), ErrorClass::ConnectionLost);
        assert_eq!(c(N::NoDomain, "Domain not found", true), ErrorClass::DomainGone);
        assert_eq!(c(N::NoDomain, "Domain not found", false), ErrorClass::DomainGone);
        assert_eq!(
            c(N::OperationInvalid, "Requested operation is not valid: domain is not running", true),
            ErrorClass::DomainGone
        );
        assert_eq!(c(N::OperationUnsupported, "", true), ErrorClass::Permanent);
        assert_eq!(c(N::ArgumentUnsupported, "", true), ErrorClass::Permanent);
        assert_eq!(c(N::OperationTimeout, "", true), ErrorClass::Transient);
        assert_eq!(c(N::AgentUnresponsive, "", true), ErrorClass::Transient);
        assert_eq!(c(N::ResourceBusy, "", true), ErrorClass::Transient);
    }

    #[test]
    fn vcpu_files_stay_open_while_their_domain_is_listed() {
        // libvirt's in-process test driver for the listing; a thread of this process as vCPU.
        let mut h = LibvirtHost::new("test:///default");
        h.ensure_connected().unwrap();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let link = std::fs::read_link("/proc/thread-self").unwrap();
            tid_tx.send(link.file_name().unwrap().to_str().unwrap().parse::<u32>().unwrap()).unwrap();
            let _ = stop_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        let desc = DomainDesc {
            vcpu_tids: vec![Some(tid), None],
            pid: Some(std::process::id()),
            ..DomainDesc::bare(DomainRef { name: "web".into(), uuid: String::new(), id: 1 })
        };
        for _ in 0..3 {
            h.list_domains().unwrap();
            let t = h.vcpu_times(&desc).unwrap();
            assert!(t[0].as_ref().is_some_and(|t| !t.affinity_mask.0.is_empty()) && t[1].is_none());
            assert_eq!(h.schedstat.open_files(), 1, "one file, kept from quantum to quantum");
        }
        // The domain stopped: its vCPU is no longer read, and a quantum later its file is closed.
        h.list_domains().unwrap();
        assert_eq!(h.schedstat.open_files(), 1);
        h.list_domains().unwrap();
        assert_eq!(h.schedstat.open_files(), 0);
        stop.send(()).unwrap();
        thread.join().unwrap();
    }
}
