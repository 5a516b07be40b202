//! A simulated host that fails on purpose, for the tests of the loop and of what is built on
//! its reports: the lab cannot produce these faults on demand (a pin that keeps failing, a
//! slow libvirtd, a live opt-out, a guest that vanishes between two quanta).

use std::collections::HashMap;

use crate::host::{
    AgentPin, BalloonStats, CpuSet, DomainDesc, DomainRef, ErrorClass, Host, HostError, HostSample, OptOut, QemuThread,
    ThreadPin, Topology, VcpuTimes,
};
use crate::sim::{GuestSpec, SimConfig, SimHost};

const GIB: u64 = 1 << 20;

/// The simulated host, with faults injected on request.
pub struct Faulty {
    pub sim: SimHost,
    /// Every pin fails with this class.
    pub pin_fails: Option<ErrorClass>,
    /// Pins to one of these cpus fail as a cgroup cpuset that leaves them out makes them: of
    /// every domain, or of `refused_for` only.
    pub refused_cpus: Vec<u32>,
    pub refused_for: Option<String>,
    /// A vCPU set naming an offline cpu is refused, as cgroup v1's cpuset does.
    pub offline_sets_refused: bool,
    /// Domains described without their vCPU threads (listed while their QEMU starts).
    pub threads_hidden: Vec<String>,
    pub pin_calls: usize,
    /// Pin attempts per (domain, vCPU).
    pub pin_tries: HashMap<(String, u32), usize>,
    /// Virtual time each pin takes, ns (a slow libvirtd).
    pub pin_cost_ns: u64,
    /// Every emulator or I/O thread pin fails with this class.
    pub thread_pin_fails: Option<ErrorClass>,
    /// Thread pin attempts per (domain, thread).
    pub thread_pin_tries: HashMap<(String, QemuThread), usize>,
    /// Virtual time each `describe` takes, ns.
    pub describe_cost_ns: u64,
    pub describes: usize,
    /// Extra time added to the clock by slow calls.
    pub lag_ns: u64,
    /// Opt-outs an operator set live, by domain name.
    pub opt_outs: HashMap<String, OptOut>,
    /// Domains listed but gone by the time they are described.
    pub vanish_on_describe: Vec<String>,
    /// Domains shut down: no longer listed, no statistics.
    pub gone: Vec<String>,
    /// Domain events: `Some` (the names reported changed, drained by each quantum) makes this
    /// a host that reports changes; `None` one that cannot.
    pub events: Option<Vec<String>>,
    /// Memory events (a balloon moved): the names, drained by each quantum.
    pub memory_events: Vec<String>,
    /// Balloon statistics do not answer in time (a guest's QEMU frozen).
    pub balloon_stats_late: bool,
    /// Describing these domains fails with this class, each time.
    pub describe_fails: HashMap<String, ErrorClass>,
    /// The host's `MemAvailable` as sampled, instead of the model's (memory taken by
    /// something other than the guests).
    pub mem_available_kib: Option<u64>,
    /// Guests whose balloon statistics come without the guest's own figures (what libvirt
    /// returns while a monitor is busy or without a statistics period).
    pub no_guest_figures: Vec<String>,
}

impl Faulty {
    /// Counts a vCPU pin (one cpu or a set) and fails it as `pin_fails` says.
    fn pin_fault(&mut self, dom: &DomainRef, vcpu: u32) -> Result<(), HostError> {
        self.pin_calls += 1;
        self.lag_ns += self.pin_cost_ns;
        *self.pin_tries.entry((dom.name.clone(), vcpu)).or_default() += 1;
        match self.pin_fails {
            Some(class) => {
                Err(HostError::Refused { op: "pin vcpu", object: dom.name.clone(), class, detail: "injected".into() })
            }
            None => Ok(()),
        }
    }

    /// A host of `cpus` cpus and 64 GiB with these guests (name, vCPUs), 1 GiB each.
    pub fn new(cpus: u32, guests: &[(&str, u32)]) -> Self {
        let specs: Vec<GuestSpec> =
            guests.iter().map(|(n, v)| GuestSpec { name: (*n).into(), vcpus: *v, max_kib: GIB, liar: false }).collect();
        let sim = SimHost::new(SimConfig::new(cpus, 64 * GIB, GIB), &specs).unwrap();
        Faulty {
            sim,
            pin_fails: None,
            pin_calls: 0,
            pin_tries: HashMap::new(),
            pin_cost_ns: 0,
            thread_pin_fails: None,
            thread_pin_tries: HashMap::new(),
            describe_cost_ns: 0,
            describes: 0,
            lag_ns: 0,
            opt_outs: HashMap::new(),
            vanish_on_describe: vec![],
            gone: vec![],
            events: None,
            memory_events: vec![],
            balloon_stats_late: false,
            describe_fails: HashMap::new(),
            mem_available_kib: None,
            no_guest_figures: vec![],
            refused_cpus: vec![],
            refused_for: None,
            offline_sets_refused: false,
            threads_hidden: vec![],
        }
    }
}

impl Faulty {
    /// Two busy vCPUs of one guest, `web`, piled on cpu 0 of a 2-cpu host.
    pub fn piled() -> Self {
        let mut h = Faulty::new(2, &[("web", 2)]);
        let d = h.sim.list_domains().unwrap()[0].clone();
        h.sim.pin_vcpu(&d, 0, 0).unwrap();
        h.sim.pin_vcpu(&d, 1, 0).unwrap();
        h.sim.set_demand(0, 0, 1.0);
        h.sim.set_demand(0, 1, 1.0);
        h
    }
}

impl Host for Faulty {
    fn now_ns(&self) -> u64 {
        self.sim.now_ns() + self.lag_ns
    }
    fn epoch_s(&self) -> u64 {
        self.sim.epoch_s()
    }
    fn ensure_connected(&mut self) -> Result<(), HostError> {
        self.sim.ensure_connected()
    }
    fn list_domains(&mut self) -> Result<Vec<DomainRef>, HostError> {
        Ok(self.sim.list_domains()?.into_iter().filter(|d| !self.gone.contains(&d.name)).collect())
    }
    fn changed_domains(&mut self) -> Option<Vec<String>> {
        self.events.as_mut().map(std::mem::take)
    }
    fn memory_changed_domains(&mut self) -> Vec<String> {
        std::mem::take(&mut self.memory_events)
    }
    fn describe(&mut self, dom: &DomainRef) -> Result<DomainDesc, HostError> {
        self.describes += 1;
        self.lag_ns += self.describe_cost_ns;
        if self.vanish_on_describe.contains(&dom.name) {
            return Err(HostError::DomainGone(dom.name.clone()));
        }
        if let Some(&class) = self.describe_fails.get(&dom.name) {
            return Err(HostError::Refused {
                op: "describe",
                object: dom.name.clone(),
                class,
                detail: "injected".into(),
            });
        }
        let mut d = self.sim.describe(dom)?;
        if self.threads_hidden.contains(&dom.name) {
            d.vcpu_tids.iter_mut().for_each(|t| *t = None);
        }
        if let Some(o) = self.opt_outs.get(&dom.name) {
            d.opt_out = o.clone();
        }
        Ok(d)
    }
    fn vcpu_times(&mut self, desc: &DomainDesc) -> Result<Vec<Option<VcpuTimes>>, HostError> {
        self.sim.vcpu_times(desc)
    }
    fn balloon_stats(&mut self) -> Result<Vec<(String, BalloonStats)>, HostError> {
        if self.balloon_stats_late {
            let late = crate::host::stats_worker::StatsError::Late(crate::host::stats_worker::STATS_DEADLINE);
            return Err(HostError::Unanswered { op: "bulk balloon stats", source: late });
        }
        let mut all = self.sim.balloon_stats()?;
        all.retain(|(n, _)| !self.gone.contains(n));
        for (_, b) in all.iter_mut().filter(|(n, _)| self.no_guest_figures.contains(n)) {
            (b.usable_kib, b.available_kib, b.unused_kib, b.last_update_s) = (None, None, None, None);
        }
        Ok(all)
    }
    fn host_sample(&mut self) -> Result<HostSample, HostError> {
        let mut s = self.sim.host_sample()?;
        s.mem_available_kib = self.mem_available_kib.unwrap_or(s.mem_available_kib);
        Ok(s)
    }
    fn topology(&mut self) -> Result<Topology, HostError> {
        self.sim.topology()
    }
    fn present_cpus(&mut self) -> Result<Vec<u32>, HostError> {
        self.sim.present_cpus()
    }
    fn pin_vcpu(&mut self, dom: &DomainRef, vcpu: u32, cpu: u32) -> Result<(), HostError> {
        self.pin_fault(dom, vcpu)?;
        if self.refused_cpus.contains(&cpu) && self.refused_for.as_ref().is_none_or(|d| d == &dom.name) {
            return Err(cpu_refused(dom, "cannot set CPU affinity: Invalid argument (injected)"));
        }
        self.sim.pin_vcpu(dom, vcpu, cpu)
    }
    fn set_balloon(&mut self, dom: &DomainRef, target_kib: u64) -> Result<(), HostError> {
        self.sim.set_balloon(dom, target_kib)
    }
    fn set_stats_period(&mut self, dom: &DomainRef, period_s: u32) -> Result<(), HostError> {
        self.sim.set_stats_period(dom, period_s)
    }
    fn pin_vcpu_set(&mut self, dom: &DomainRef, vcpu: u32, cpus: &CpuSet) -> Result<(), HostError> {
        self.pin_fault(dom, vcpu)?;
        if self.offline_sets_refused && cpus.0.iter().any(|&c| !self.sim.is_online(c)) {
            return Err(cpu_refused(dom, "cpuset.cpus: Invalid argument (injected)"));
        }
        self.sim.pin_vcpu_set(dom, vcpu, cpus)
    }
    fn agent_pins(&mut self, dom: &DomainRef) -> Result<Vec<AgentPin>, HostError> {
        self.sim.agent_pins(dom)
    }
    fn set_agent_pins(&mut self, dom: &DomainRef, pins: &[AgentPin]) -> Result<(), HostError> {
        self.sim.set_agent_pins(dom, pins)
    }
    fn pin_thread(&mut self, dom: &DomainRef, thread: QemuThread, cpus: &CpuSet) -> Result<(), HostError> {
        *self.thread_pin_tries.entry((dom.name.clone(), thread)).or_default() += 1;
        match self.thread_pin_fails {
            Some(class) => {
                Err(HostError::Refused { op: "pin thread", object: dom.name.clone(), class, detail: "injected".into() })
            }
            None => self.sim.pin_thread(dom, thread, cpus),
        }
    }
    fn agent_threads(&mut self, dom: &DomainRef) -> Result<Vec<ThreadPin>, HostError> {
        self.sim.agent_threads(dom)
    }
    fn set_agent_threads(&mut self, dom: &DomainRef, threads: &[ThreadPin]) -> Result<(), HostError> {
        self.sim.set_agent_threads(dom, threads)
    }
}

/// A vCPU pin refused as a cgroup cpuset refuses it (`EINVAL`).
fn cpu_refused(dom: &DomainRef, detail: &str) -> HostError {
    HostError::Refused {
        op: "pin vcpu",
        object: dom.name.clone(),
        class: ErrorClass::CpuRefused,
        detail: detail.into(),
    }
}
