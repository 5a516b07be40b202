//! The loop over a `Host` that fails on purpose: error classes, churn, stale definitions,
//! discovery that takes time. The lab cannot produce these faults on demand; a wrapper around
//! the simulated host can.

use std::collections::HashMap;

use super::*;
use crate::cli::Common;
use crate::host::{BalloonStats, DomainDesc, DomainRef, ErrorClass, HostSample, OptOut, Topology, VcpuTimes};
use crate::sim::{GuestSpec, SimConfig, SimHost};

const GIB: u64 = 1 << 20;
const Q: u64 = 500_000_000;

/// The simulated host, with faults injected on request.
struct Faulty {
    sim: SimHost,
    /// Every pin fails with this class.
    pin_fails: Option<ErrorClass>,
    pin_calls: usize,
    /// Pin attempts per (domain, vCPU).
    pin_tries: HashMap<(String, u32), usize>,
    /// Virtual time each pin takes, ns (a slow libvirtd).
    pin_cost_ns: u64,
    /// Virtual time each `describe` takes, ns.
    describe_cost_ns: u64,
    describes: usize,
    /// Extra time added to the clock by slow calls.
    lag_ns: u64,
    /// Opt-outs an operator set live, by domain name.
    opt_outs: HashMap<String, OptOut>,
    /// Domains listed but gone by the time they are described.
    vanish_on_describe: Vec<String>,
}

impl Faulty {
    fn new(cpus: u32, guests: &[(&str, u32)]) -> Self {
        let specs: Vec<GuestSpec> =
            guests.iter().map(|(n, v)| GuestSpec { name: (*n).into(), vcpus: *v, max_kib: GIB, liar: false }).collect();
        let sim = SimHost::new(SimConfig::new(cpus, 64 * GIB, GIB), &specs).unwrap();
        Faulty {
            sim,
            pin_fails: None,
            pin_calls: 0,
            pin_tries: HashMap::new(),
            pin_cost_ns: 0,
            describe_cost_ns: 0,
            describes: 0,
            lag_ns: 0,
            opt_outs: HashMap::new(),
            vanish_on_describe: vec![],
        }
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
        self.sim.list_domains()
    }
    fn describe(&mut self, dom: &DomainRef) -> Result<DomainDesc, HostError> {
        self.describes += 1;
        self.lag_ns += self.describe_cost_ns;
        if self.vanish_on_describe.contains(&dom.name) {
            return Err(HostError::DomainGone(dom.name.clone()));
        }
        let mut d = self.sim.describe(dom)?;
        if let Some(o) = self.opt_outs.get(&dom.name) {
            d.opt_out = o.clone();
        }
        Ok(d)
    }
    fn vcpu_times(&mut self, desc: &DomainDesc) -> Result<Vec<Option<VcpuTimes>>, HostError> {
        self.sim.vcpu_times(desc)
    }
    fn balloon_stats(&mut self) -> Result<Vec<(String, BalloonStats)>, HostError> {
        self.sim.balloon_stats()
    }
    fn host_sample(&mut self) -> Result<HostSample, HostError> {
        self.sim.host_sample()
    }
    fn topology(&mut self) -> Result<Topology, HostError> {
        self.sim.topology()
    }
    fn pin_vcpu(&mut self, dom: &DomainRef, vcpu: u32, cpu: u32) -> Result<(), HostError> {
        self.pin_calls += 1;
        self.lag_ns += self.pin_cost_ns;
        *self.pin_tries.entry((dom.name.clone(), vcpu)).or_default() += 1;
        match self.pin_fails {
            Some(class) => {
                Err(HostError::Refused { op: "pin vcpu", object: dom.name.clone(), class, detail: "injected".into() })
            }
            None => self.sim.pin_vcpu(dom, vcpu, cpu),
        }
    }
    fn set_balloon(&mut self, dom: &DomainRef, target_kib: u64) -> Result<(), HostError> {
        self.sim.set_balloon(dom, target_kib)
    }
    fn set_stats_period(&mut self, dom: &DomainRef, period_s: u32) -> Result<(), HostError> {
        self.sim.set_stats_period(dom, period_s)
    }
    fn pin_vcpu_set(&mut self, dom: &DomainRef, vcpu: u32, cpus: &crate::host::CpuSet) -> Result<(), HostError> {
        self.sim.pin_vcpu_set(dom, vcpu, cpus)
    }
    fn agent_pins(&mut self, dom: &DomainRef) -> Result<Vec<crate::host::AgentPin>, HostError> {
        self.sim.agent_pins(dom)
    }
    fn set_agent_pins(&mut self, dom: &DomainRef, pins: &[crate::host::AgentPin]) -> Result<(), HostError> {
        self.sim.set_agent_pins(dom, pins)
    }
}

fn agent(host: Faulty) -> Agent<Faulty> {
    let mut c = Common::defaults().unwrap();
    c.quantum = Duration::from_nanos(Q);
    c.smoothing = Duration::from_millis(500);
    c.no_memory = true;
    Agent::new(host, AgentConfig::from_flags(&c, false))
}

/// Two busy vCPUs of one guest piled on cpu 0 of a 2-cpu host.
fn piled() -> Faulty {
    let mut h = Faulty::new(2, &[("web", 2)]);
    let d = h.sim.list_domains().unwrap()[0].clone();
    h.sim.pin_vcpu(&d, 0, 0).unwrap();
    h.sim.pin_vcpu(&d, 1, 0).unwrap();
    h.sim.set_demand(0, 0, 1.0);
    h.sim.set_demand(0, 1, 1.0);
    h
}

fn run(a: &mut Agent<Faulty>, quanta: usize) -> Vec<StepReport> {
    (0..quanta)
        .map(|_| {
            a.host.sim.advance(Q);
            a.step()
        })
        .collect()
}

#[test]
fn a_pin_that_fails_permanently_is_tried_once_and_the_connection_stays() {
    let mut h = piled();
    h.pin_fails = Some(ErrorClass::Permanent);
    let mut a = agent(h);
    let reports = run(&mut a, 40);
    assert!(a.connected(), "a failed pin is not a lost connection");
    assert!(a.host.pin_tries.values().all(|&n| n == 1), "each pin tried once, then left alone: {:?}", a.host.pin_tries);
    let last = reports.last().unwrap();
    assert!(last.snapshot.is_some(), "sampling goes on");
    assert_eq!(last.blocked.len(), a.host.pin_tries.len(), "{:?}", last.blocked);
    assert!(last.plan.is_empty(), "not re-planned: {:?}", last.plan);
    // 40 quanta, and no more than one try per vCPU: not once per quantum.
    assert!(a.host.pin_calls <= 2);
}

#[test]
fn a_pin_that_fails_transiently_is_retried_then_backed_off() {
    let mut h = piled();
    h.pin_fails = Some(ErrorClass::Transient);
    let mut a = agent(h);
    run(&mut a, 60);
    assert!(a.connected());
    let strikes = crate::failures::STRIKES as usize;
    assert!(
        a.host.pin_tries.values().all(|&n| n == strikes),
        "retried {strikes} times, then backed off: {:?}",
        a.host.pin_tries
    );
    // Once the fault is gone and the back-off over, the pile-up is spread.
    a.host.pin_fails = None;
    run(&mut a, usize::try_from(crate::failures::BACKOFF_NS / Q).unwrap() + 10);
    let pins: Vec<_> = (0..2).map(|v| a.host.sim.affinity(0, v)).collect();
    assert_ne!(pins[0], pins[1], "spread after the back-off: {pins:?}");
}

#[test]
fn a_lost_connection_drops_history_and_plans_nothing_until_fresh_samples() {
    let mut h = piled();
    h.pin_fails = Some(ErrorClass::ConnectionLost);
    let mut a = agent(h);
    let reports = run(&mut a, 30);
    let lost = reports.iter().position(|r| !r.plan.is_empty()).expect("a plan was tried");
    assert!(reports[lost + 1].snapshot.is_none(), "the quantum after the loss has no fresh sample");
    assert!(reports[lost + 1..lost + 2].iter().all(|r| r.plan.is_empty()), "nothing planned until two fresh samples");
    a.host.pin_fails = None;
    run(&mut a, 30);
    assert!(a.connected());
    let pins: Vec<_> = (0..2).map(|v| a.host.sim.affinity(0, v)).collect();
    assert_ne!(pins[0], pins[1], "balances again after reconnecting: {pins:?}");
}

#[test]
fn a_live_opt_out_takes_effect_within_a_few_quanta() {
    let mut a = agent(piled());
    run(&mut a, 2);
    // The operator opts the guest out (`virsh metadata ... --live`) before it was balanced.
    let why = "opted out by <metadata> (manage=\"no\")".to_string();
    a.host.opt_outs.insert("web".into(), OptOut { cpu: Some(why.clone()), memory: Some(why) });
    a.host.pin_fails = Some(ErrorClass::Permanent); // any pin from here on would be counted
    let calls_before = a.host.pin_calls;
    let reports = run(&mut a, 12);
    let refreshed_at = reports
        .iter()
        .position(|r| r.snapshot.as_ref().is_some_and(|s| s.domains[0].cpu_excluded.is_some()))
        .expect("opt-out seen");
    assert!(refreshed_at <= 6, "seen after {refreshed_at} quanta");
    let pins_after = a.host.pin_calls - calls_before;
    assert!(pins_after <= refreshed_at, "no pin once the opt-out is known ({pins_after} pins)");
    assert!(reports[refreshed_at..].iter().all(|r| r.plan.is_empty()));
}

#[test]
fn discovery_of_many_new_guests_does_not_hold_up_the_quantum() {
    let names: Vec<String> = (0..40).map(|i| format!("g{i}")).collect();
    let guests: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    let mut h = Faulty::new(4, &guests);
    h.describe_cost_ns = 50_000_000; // 50 ms each: a libvirtd busy starting guests
    let mut a = agent(h);
    let mut per_quantum = Vec::new();
    for _ in 0..20 {
        let before = a.host.describes;
        a.host.sim.advance(Q);
        a.step();
        per_quantum.push(a.host.describes - before);
    }
    // A quarter of a 500 ms quantum: at most 3 describes (the third crosses the budget).
    assert!(per_quantum.iter().all(|&n| n <= 3), "{per_quantum:?}");
    let known = a.host.describes;
    assert!(known >= 40, "every guest discovered over several quanta: {per_quantum:?}");
}

#[test]
fn a_guest_that_vanishes_during_discovery_is_skipped_quietly() {
    let mut h = Faulty::new(2, &[("a", 1), ("b", 1)]);
    h.vanish_on_describe = vec!["a".into()];
    let mut a = agent(h);
    let reports = run(&mut a, 4);
    assert!(a.connected());
    let names: Vec<&str> =
        reports.last().unwrap().snapshot.as_ref().unwrap().domains.iter().map(|d| d.dom.name.as_str()).collect();
    assert_eq!(names, ["b"]);
}

#[test]
fn a_plan_held_up_by_a_slow_hypervisor_is_not_applied_on_stale_data() {
    // Ten floating guests to place at once; every pin takes 400 ms.
    let names: Vec<String> = (0..10).map(|i| format!("g{i}")).collect();
    let guests: Vec<(&str, u32)> = names.iter().map(|n| (n.as_str(), 1)).collect();
    let mut h = Faulty::new(4, &guests);
    h.pin_cost_ns = 400_000_000;
    let mut a = agent(h);
    let reports = run(&mut a, 3);
    let r = reports.iter().find(|r| r.plan.len() >= 5).expect("a placement plan");
    // A plan may be at most two quanta (1 s) old: the pins after that are dropped.
    assert!(r.applied >= 2 && r.applied <= 3, "applied {} of {}", r.applied, r.plan.len());
}

#[test]
fn a_repeated_warning_is_logged_once_per_period_with_a_count() {
    let mut r = Repeated::new(Duration::from_secs(60));
    let t0 = Instant::now();
    assert!(r.warn(t0, "x"));
    for s in 1..59 {
        assert!(!r.warn(t0 + Duration::from_secs(s), "x"));
    }
    assert_eq!(r.suppressed, 58);
    assert!(r.warn(t0 + Duration::from_secs(61), "x"));
    assert_eq!(r.suppressed, 0);
}

#[test]
fn the_planners_defaults_are_the_flags_defaults() {
    // Unit tests and benches plan with `CpuPolicy::default()` and `MemPolicy::default()`: they
    // must be what the daemon runs with when no flag is given.
    let cfg = AgentConfig::from_flags(&Common::defaults().unwrap(), false);
    assert_eq!(cfg.cpu, Some(crate::policy::cpu::CpuPolicy::default()));
    assert_eq!(cfg.mem.map(|m| m.policy), Some(crate::policy::mem::MemPolicy::default()));
}

#[test]
fn new_settings_apply_at_the_next_quantum_without_losing_history() {
    let mut a = agent(piled());
    run(&mut a, 3);
    let mut c = Common::defaults().unwrap();
    c.quantum = Duration::from_nanos(Q);
    c.smoothing = Duration::from_millis(500);
    c.no_memory = true;
    c.high = 0.5;
    c.cpus = Some(crate::cli::CpuList(vec![1]));
    assert_eq!(a.reconfigure(AgentConfig::from_flags(&c, false)), 2, "high and cpus changed");
    assert_eq!(a.reconfigure(AgentConfig::from_flags(&c, false)), 0, "nothing changed the second time");
    let r = run(&mut a, 1).pop().unwrap();
    let snap = r.snapshot.expect("history kept: a snapshot at once, not after two fresh samples");
    assert_eq!(snap.host.cpus, vec![1], "the new --cpus is in force");
    assert_eq!(a.config().cpu.as_ref().unwrap().high, 0.5);
}
