//! The loop over a `Host` that fails on purpose: error classes, churn, stale definitions,
//! discovery that takes time. The lab cannot produce these faults on demand; a wrapper around
//! the simulated host can.

use super::*;
use crate::cli::Common;
use crate::host::{ErrorClass, OptOut};
use crate::sim::faulty::Faulty;
const Q: u64 = 500_000_000;

/// The flags of these tests: a short quantum and smoothing, no memory balancer.
fn flags() -> Common {
    let mut c = Common::defaults().unwrap();
    c.quantum = Duration::from_nanos(Q);
    c.smoothing = Duration::from_millis(500);
    c.no_memory = true;
    c
}

pub(super) fn agent(host: Faulty) -> Agent<Faulty> {
    Agent::new(host, AgentConfig::from_flags(&flags(), false))
}

/// Two one-vCPU guests at 0.6 cores on a simulated host of `cpus` cpus, the agent at `g`.
fn two_guests_at(cpus: u32, g: crate::policy::cpu::Granularity) -> Agent<Faulty> {
    let mut h = Faulty::new(cpus, &[("a", 1), ("b", 1)]);
    h.sim.set_demand(0, 0, 0.6);
    h.sim.set_demand(1, 0, 0.6);
    Agent::new(h, at(g))
}

/// The configuration of [`flags`] at a pin granularity.
fn at(g: crate::policy::cpu::Granularity) -> AgentConfig {
    AgentConfig::from_flags(&Common { pin_granularity: g, ..flags() }, false)
}

pub(super) fn piled() -> Faulty {
    Faulty::piled()
}

pub(super) fn run(a: &mut Agent<Faulty>, quanta: usize) -> Vec<StepReport> {
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
fn with_domain_events_a_change_is_read_at_once_and_nothing_else_is_read_again() {
    let mut h = piled();
    h.events = Some(vec![]);
    let mut a = agent(h);
    run(&mut a, 2);
    // Without events, definitions are read again every five quanta; with them, only the
    // domain an event names, and the rest on the safety cadence (300 quanta, 150 s here).
    let before = a.host.describes;
    run(&mut a, 20);
    assert_eq!(a.host.describes, before, "no event, no describe");
    let why = "opted out by <metadata> (manage=\"no\")".to_string();
    a.host.opt_outs.insert("web".into(), OptOut { cpu: Some(why.clone()), memory: Some(why) });
    a.host.events = Some(vec!["web".into()]);
    let r = run(&mut a, 1);
    assert_eq!(a.host.describes, before + 1);
    assert!(r[0].snapshot.as_ref().unwrap().domains[0].cpu_excluded.is_some(), "the opt-out is seen at once");
    // The safety net: 150 s (300 quanta) after the last read, read again without an event.
    run(&mut a, 298);
    assert_eq!(a.host.describes, before + 1);
    run(&mut a, 3);
    assert_eq!(a.host.describes, before + 2, "read again on the safety cadence");
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
    assert!(r.applied() >= 2 && r.applied() <= 3, "applied {} of {}", r.applied(), r.plan.len());
    // The report says why, for the loop to warn (rate-limited); the quanta with all applied say nothing.
    let dropped = r.plan.len() - r.applied();
    let why = r.stale.as_deref().expect("the dropped actions are reported");
    assert!(why.ends_with(&format!("dropping its last {dropped} action(s)")), "{why}");
    assert!(reports.iter().filter(|r| r.applied() == r.plan.len()).all(|r| r.stale.is_none()));
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
    let mut c = flags();
    c.high = 0.5;
    c.cpus = Some(crate::cli::CpuList(vec![1]));
    // --high is both the CPU planner's and the capacity advice's threshold.
    assert_eq!(a.reconfigure(AgentConfig::from_flags(&c, false)), 3, "cpu (high), advice (high) and cpus changed");
    assert_eq!(a.reconfigure(AgentConfig::from_flags(&c, false)), 0, "nothing changed the second time");
    // Read at the stop: a reload before a maintenance restart must keep the pins then.
    c.keep_pins_on_exit = true;
    assert_eq!(a.reconfigure(AgentConfig::from_flags(&c, false)), 1, "keep_pins_on_exit changed");
    assert!(a.config().keep_pins_on_exit);
    let r = run(&mut a, 1).pop().unwrap();
    let snap = r.snapshot.expect("history kept: a snapshot at once, not after two fresh samples");
    assert_eq!(snap.host.cpus, vec![1], "the new --cpus is in force");
    assert_eq!(a.config().cpu.as_ref().unwrap().high, 0.5);
}

#[test]
fn a_cpu_that_goes_offline_is_emptied_and_one_that_comes_online_joins_the_pool() {
    // 4 cpus, cpu 3 offline when the agent starts; 4 one-vCPU guests at 0.6 each.
    let names = ["a", "b", "c", "d"];
    let guests: Vec<(&str, u32)> = names.iter().map(|n| (*n, 1)).collect();
    let mut h = Faulty::new(4, &guests);
    h.sim.set_cpu_online(3, false);
    for g in 0..4 {
        h.sim.set_demand(g, 0, 0.6);
    }
    let mut a = agent(h);
    let reports = run(&mut a, 12);
    assert_eq!(reports.last().unwrap().snapshot.as_ref().unwrap().host.cpus, [0, 1, 2]);
    let on = |a: &Agent<Faulty>, cpu: u32| (0..4).filter(|&g| a.host.sim.affinity(g, 0).unwrap().0 == [cpu]).count();
    assert_eq!(on(&a, 3), 0);

    // Online: it joins the pool, and the cpu at 1.2 gives it a vCPU.
    a.host.sim.set_cpu_online(3, true);
    let reports = run(&mut a, 12);
    assert_eq!(reports.last().unwrap().snapshot.as_ref().unwrap().host.cpus, [0, 1, 2, 3]);
    assert!((0..4).all(|c| on(&a, c) == 1), "one guest per cpu: {:?}", (0..4).map(|c| on(&a, c)).collect::<Vec<_>>());
    a.host.sim.take_actions();

    // Offline again: no vCPU stays there. The one it ran falls back to every online cpu (the
    // kernel's cpuset fallback) and is left floating: pinned, 2.4 cores on 3 cpus would
    // overload one of them.
    a.host.sim.set_cpu_online(3, false);
    let reports = run(&mut a, 12);
    for g in 0..4 {
        let aff = a.host.sim.affinity(g, 0).unwrap();
        assert!(!aff.0.contains(&3), "guest {g} still on cpu 3: {aff}");
    }
    assert_eq!(reports.last().unwrap().snapshot.as_ref().unwrap().host.cpus, [0, 1, 2]);
    assert_eq!(a.host.sim.take_actions().repins, 0, "nothing moved for it");
    assert!(a.host.sim.last_interval().delay < 1e-9, "{:?}", a.host.sim.last_interval());
}

/// Three busy one-vCPU guests on a 2-cpu host: more demand than `--high` allows there.
fn overloaded() -> Faulty {
    let mut h = Faulty::new(2, &[("a", 1), ("b", 1), ("c", 1)]);
    for g in 0..3 {
        h.sim.set_demand(g, 0, 1.0);
    }
    h
}

fn advised(r: &StepReport) -> Vec<String> {
    r.capacity.iter().flat_map(|c| &c.advice).map(|a| a.domain().to_string()).collect()
}

#[test]
fn an_overloaded_host_names_a_guest_after_the_window_and_clears_when_the_load_goes() {
    let window = Duration::from_secs(5);
    let mut c = Common::defaults().unwrap();
    c.quantum = Duration::from_nanos(Q);
    c.smoothing = Duration::from_millis(500);
    c.no_memory = true;
    c.overload_window = window;
    c.exclude = vec!["a".into()];
    let mut a = Agent::new(overloaded(), AgentConfig::from_flags(&c, false));
    let reports = run(&mut a, 30);
    let first_over = reports
        .iter()
        .position(|r| r.capacity.as_ref().is_some_and(|c| c.overload.any()))
        .expect("the host is seen overloaded");
    let first_advice = reports.iter().position(|r| !advised(r).is_empty()).expect("advice once the window is over");
    let waited = Duration::from_nanos(Q * u64::try_from(first_advice - first_over).unwrap());
    assert!(waited >= window, "advice only after the window: {waited:?}");
    for r in &reports[first_advice..] {
        let names = advised(r);
        assert_eq!(names.len(), 1, "one guest named while overloaded: {names:?}");
        assert_ne!(names[0], "a", "an excluded guest is never named");
        assert_eq!(r.capacity.as_ref().unwrap().spare.cpu_cores, 0.0, "no cpu to spare");
    }
    // The load goes: the advice clears and the host has cpu to spare again.
    for g in 0..3 {
        a.host.sim.set_demand(g, 0, 0.05);
    }
    let calm = run(&mut a, 20);
    let last = calm.last().unwrap().capacity.clone().unwrap();
    assert!(last.advice.is_empty() && !last.overload.any(), "{last:?}");
    assert!(last.spare.cpu_cores > 0.0, "{last:?}");
}

#[test]
fn starving_guests_the_host_cannot_serve_name_a_guest_that_is_not_excluded() {
    // 8 GiB host, two guests of 8 GiB maximum started at what fits (3 GiB each), both using
    // all of it: starving, and the host has nothing above its reserve to give.
    let specs: Vec<crate::sim::GuestSpec> = ["big", "hungry", "idle"]
        .iter()
        .map(|n| crate::sim::GuestSpec { name: (*n).into(), vcpus: 1, max_kib: 8 << 20, liar: false })
        .collect();
    let mut sim = crate::sim::SimHost::new(crate::sim::SimConfig::new(2, 8 << 20, 1 << 20), &specs).unwrap();
    let sizes = sim.guest_sizes_kib();
    sim.set_mem_need(0, sizes[0]);
    sim.set_mem_need(1, sizes[1]);
    let mut c = Common::defaults().unwrap();
    c.quantum = Duration::from_nanos(Q);
    c.mem_interval = Duration::from_nanos(Q);
    c.min_age = Duration::ZERO;
    c.no_cpu = true;
    c.overload_window = Duration::ZERO;
    c.exclude = vec!["big".into()];
    let mut a = Agent::new(sim, AgentConfig::from_flags(&c, true));
    let reports: Vec<StepReport> = (0..10)
        .map(|_| {
            a.host.advance(Q);
            a.step()
        })
        .collect();
    let last = reports.last().unwrap().capacity.clone().unwrap();
    assert!(last.overload.mem_kib > 0, "a starving guest the host refused: {last:?}");
    assert_eq!(last.overload.cpu_cores, 0.0, "{last:?}");
    assert_eq!(last.spare.mem_kib, 0, "{last:?}");
    let names = advised(reports.last().unwrap());
    assert_eq!(names.len(), 1, "{last:?}");
    assert_ne!(names[0], "big", "excluded");
}

/// The union of guest `g`'s vCPU affinities on the simulated host.
fn vcpu_union(h: &Faulty, g: usize, vcpus: usize) -> crate::host::CpuSet {
    let mut cpus: Vec<u32> = (0..vcpus).filter_map(|v| h.sim.affinity(g, v)).flat_map(|s| s.0.clone()).collect();
    cpus.sort_unstable();
    cpus.dedup();
    crate::host::CpuSet(cpus)
}

/// Two busy vCPUs of `web` piled on cpu 0 of a 4-cpu host: spreading them leaves them on two
/// cpus of four, a set the emulator can follow.
fn piled_on_four() -> Faulty {
    let mut h = Faulty::new(4, &[("web", 2)]);
    let d = h.sim.list_domains().unwrap()[0].clone();
    h.sim.pin_vcpu(&d, 0, 0).unwrap();
    h.sim.pin_vcpu(&d, 1, 0).unwrap();
    h.sim.set_demand(0, 0, 1.0);
    h.sim.set_demand(0, 1, 1.0);
    h
}

#[test]
fn the_emulator_follows_the_vcpus_and_is_given_back_on_stop() {
    use crate::host::{CpuSet, QemuThread};
    let mut a = agent(piled_on_four());
    let mut pinned_at = None;
    for q in 0..40 {
        run(&mut a, 1);
        if let Some(e) = a.host.sim.emulator_pin(0) {
            pinned_at.get_or_insert(q);
            assert_eq!(e, &vcpu_union(&a.host, 0, 2), "quantum {q}: the emulator is where the vCPUs are");
        }
    }
    assert!(pinned_at.is_some_and(|q| q <= 3), "pinned with the first plan: {pinned_at:?}");
    let spread = vcpu_union(&a.host, 0, 2);
    assert_eq!(spread.0.len(), 2, "the vCPUs were spread: {spread:?}");
    let tries = a.host.thread_pin_tries[&("web".to_string(), QemuThread::Emulator)];
    assert!(tries <= 2, "pinned when the vCPUs moved, not every quantum: {tries} calls in 40 quanta");
    crate::release::on_stop(&mut a);
    assert_eq!(a.host.sim.emulator_pin(0), Some(&CpuSet(vec![0, 1, 2, 3])), "floats over every cpu again");
}

#[test]
fn a_housekeeping_set_takes_the_emulator_and_off_leaves_it() {
    use crate::policy::emulator::EmulatorCpus;
    let mut c = Common::defaults().unwrap();
    c.quantum = Duration::from_nanos(Q);
    c.smoothing = Duration::from_millis(500);
    c.no_memory = true;
    c.emulator_cpus = EmulatorCpus::Set(crate::host::CpuSet(vec![3]));
    let mut a = Agent::new(piled_on_four(), AgentConfig::from_flags(&c, false));
    run(&mut a, 10);
    assert_eq!(a.host.sim.emulator_pin(0), Some(&crate::host::CpuSet(vec![3])));
    c.emulator_cpus = EmulatorCpus::Off;
    let mut a = Agent::new(piled_on_four(), AgentConfig::from_flags(&c, false));
    run(&mut a, 10);
    assert_eq!(vcpu_union(&a.host, 0, 2).0.len(), 2, "the vCPUs are balanced all the same");
    assert_eq!(a.host.sim.emulator_pin(0), None, "left alone");
    assert!(a.host.thread_pin_tries.is_empty());
}

#[test]
fn an_emulator_pin_that_fails_permanently_is_tried_once_and_vcpus_are_still_balanced() {
    use crate::host::QemuThread;
    let mut h = piled_on_four();
    h.thread_pin_fails = Some(ErrorClass::Permanent);
    let mut a = agent(h);
    let reports = run(&mut a, 40);
    assert!(a.connected(), "a failed thread pin is not a lost connection");
    assert_eq!(a.host.thread_pin_tries.get(&("web".to_string(), QemuThread::Emulator)), Some(&1), "tried once");
    assert_eq!(vcpu_union(&a.host, 0, 2).0.len(), 2, "the vCPUs were spread all the same");
    let last = reports.last().unwrap();
    assert!(
        last.blocked.iter().any(|(d, k, _)| d == "web" && *k == Kind::Thread(QemuThread::Emulator)),
        "{:?}",
        last.blocked
    );
    assert!(reports[5..].iter().all(|r| r.plan.iter().all(|p| !matches!(p, Action::PinThread { .. }))));
    // Nothing was pinned, so nothing is recorded to give back.
    let d = a.host.sim.list_domains().unwrap()[0].clone();
    assert!(a.host.sim.agent_threads(&d).unwrap().is_empty());
}

#[test]
fn a_new_pin_granularity_gives_the_pins_back_and_places_the_vcpus_again() {
    use crate::policy::cpu::Granularity;
    // 4 simulated cpus: 2 sockets of one core of 2 threads; cpus 0 and 2 one core and LLC.
    let mut a = agent(piled_on_four());
    run(&mut a, 10);
    let singles = |a: &Agent<Faulty>| (0..2).all(|v| a.host.sim.affinity(0, v).is_some_and(|s| s.0.len() == 1));
    assert!(singles(&a), "spread on single cpus first");
    let with = at;
    assert_eq!(a.reconfigure(with(Granularity::Llc)), 1);
    run(&mut a, 3);
    let mut sets: Vec<Vec<u32>> = (0..2).map(|v| a.host.sim.affinity(0, v).unwrap().0.clone()).collect();
    sets.sort();
    assert_eq!(sets, vec![vec![0, 2], vec![1, 3]], "one vCPU on each LLC");
    // Back to cpu while libvirt is unreachable: the give-back waits, and is done once it is back.
    a.host.pin_fails = Some(ErrorClass::ConnectionLost);
    assert_eq!(a.reconfigure(with(Granularity::Cpu)), 1);
    run(&mut a, 3);
    assert!(!singles(&a), "nothing could be given back yet");
    a.host.pin_fails = None;
    run(&mut a, 10);
    assert!(singles(&a), "back on single cpus: {:?}", (0..2).map(|v| a.host.sim.affinity(0, v)).collect::<Vec<_>>());
    // Switching the CPU balancer off and on again at the same granularity gives nothing back;
    // on at another one (or after a dry run at another one), the pins are given back then.
    let calls = a.host.pin_calls;
    let mut off = with(Granularity::Cpu);
    off.cpu = None;
    a.reconfigure(off.clone());
    a.reconfigure(with(Granularity::Cpu));
    assert_eq!(a.host.pin_calls, calls, "same granularity: nothing given back");
    a.reconfigure(off);
    let mut dry = with(Granularity::Llc);
    dry.dry_run = true;
    a.reconfigure(dry);
    run(&mut a, 3);
    assert_eq!(a.host.pin_calls, calls, "a dry run gives nothing back");
    a.reconfigure(with(Granularity::Llc));
    assert!(a.host.pin_calls > calls, "given back once the agent acts at llc");
    run(&mut a, 3);
    assert!(!singles(&a), "placed again on LLCs");
}

#[test]
fn at_core_granularity_a_core_that_loses_a_thread_has_its_vcpus_placed_again() {
    // 4 cpus: cores {0, 2} and {1, 3}; two one-vCPU guests at 0.6, one per core.
    let mut a = two_guests_at(4, crate::policy::cpu::Granularity::Core);
    run(&mut a, 6);
    let sets = |a: &Agent<Faulty>| {
        let mut s: Vec<Vec<u32>> = (0..2).map(|g| a.host.sim.affinity(g, 0).unwrap().0.clone()).collect();
        s.sort();
        s
    };
    assert_eq!(sets(&a), vec![vec![0, 2], vec![1, 3]]);
    // cpu 2 goes: core {0, 2} is now {0}; the vCPU pinned to {0, 2} is placed again.
    a.host.sim.set_cpu_online(2, false);
    run(&mut a, 6);
    let now = sets(&a);
    assert!(now.iter().all(|s| !s.contains(&2)), "{now:?}");
    assert!(now.iter().all(|s| *s == [0] || *s == [1, 3]), "on groups of the new topology: {now:?}");
    // Back online: a vCPU on {0} (now a part of core {0, 2}) is placed again, onto a whole core.
    a.host.sim.set_cpu_online(2, true);
    run(&mut a, 6);
    assert_eq!(sets(&a), vec![vec![0, 2], vec![1, 3]], "whole cores again");
}

#[test]
fn at_llc_granularity_a_cache_domain_that_regains_a_cpu_takes_its_vcpus_back_whole() {
    // 8 cpus: LLCs {0, 1, 4, 5} and {2, 3, 6, 7}; one guest of one vCPU at 0.6.
    let mut h = Faulty::new(8, &[("a", 1)]);
    h.sim.set_demand(0, 0, 0.6);
    let mut a = Agent::new(h, at(crate::policy::cpu::Granularity::Llc));
    run(&mut a, 6);
    let on = |a: &Agent<Faulty>| a.host.sim.affinity(0, 0).unwrap().0.clone();
    let (llc0, llc1) = (vec![0, 1, 4, 5], vec![2, 3, 6, 7]);
    let first = on(&a);
    assert!(first == llc0 || first == llc1, "{first:?}");
    // Its LLC loses its last cpu: the vCPU is placed again (on what is left, or the other LLC).
    let gone = *first.last().unwrap();
    a.host.sim.set_cpu_online(gone, false);
    run(&mut a, 6);
    let rest: Vec<u32> = first.iter().copied().filter(|&c| c != gone).collect();
    let other = if first == llc0 { llc1.clone() } else { llc0.clone() };
    let shrunk = on(&a);
    assert!(shrunk == rest || shrunk == other, "{shrunk:?}");
    // Pinned to what was left (as the agent would have), then the cpu comes back: that set is
    // inside the whole LLC, not a group: placed again, on a whole LLC.
    let d = a.host.sim.list_domains().unwrap()[0].clone();
    a.host.sim.pin_vcpu_set(&d, 0, &crate::host::CpuSet(rest)).unwrap();
    a.host.sim.set_cpu_online(gone, true);
    run(&mut a, 6);
    let back = on(&a);
    assert!(back == llc0 || back == llc1, "{back:?}");
}

#[test]
fn at_llc_granularity_narrowing_cpus_to_one_llc_places_the_other_llcs_vcpus_again() {
    // 8 cpus: LLCs {0, 1, 4, 5} and {2, 3, 6, 7}; two one-vCPU guests at 0.6, one on each.
    let mut a = two_guests_at(8, crate::policy::cpu::Granularity::Llc);
    run(&mut a, 6);
    let sets = |a: &Agent<Faulty>| (0..2).map(|g| a.host.sim.affinity(g, 0).unwrap().0.clone()).collect::<Vec<_>>();
    let mut first = sets(&a);
    first.sort();
    assert_eq!(first, vec![vec![0, 1, 4, 5], vec![2, 3, 6, 7]]);
    // A reload narrows --cpus to the first LLC: the vCPU on the second is placed again.
    let mut narrow = at(crate::policy::cpu::Granularity::Llc);
    narrow.cpus = Some(vec![0, 1, 4, 5]);
    a.reconfigure(narrow);
    run(&mut a, 6);
    assert_eq!(sets(&a), vec![vec![0, 1, 4, 5], vec![0, 1, 4, 5]], "none left on cpus outside --cpus");
}

/// Steps `a` for `quanta` quanta: (balloon changes applied, each checked to be planned on a
/// reading of its interval; readings carried forward; verdicts that waited for a fresh one).
fn balloon_steps(a: &mut Agent<Faulty>, quanta: usize) -> (usize, u64, usize) {
    let (mut changes, mut carried, mut waited) = (0, 0, 0);
    for _ in 0..quanta {
        a.host.sim.advance(Q);
        let r = a.step();
        carried += r.balloon_reads.carried;
        waited += r.mem_verdicts.iter().filter(|v| v.why.contains("waits for fresh statistics")).count();
        let Some(snap) = &r.snapshot else { continue };
        for (act, _) in r.plan.iter().zip(&r.was_applied).filter(|(_, ok)| **ok) {
            let Action::Balloon { domain, .. } = act else { continue };
            let d = snap.domains.iter().find(|d| &d.dom.name == domain).unwrap();
            let carried_for = d.balloon.as_ref().map(|(b, _)| b.carried_for_s);
            assert_eq!(carried_for, Some(None), "a balloon change planned on a carried reading: {act:?}");
            changes += 1;
        }
    }
    (changes, carried, waited)
}

fn quiet_flags() -> Common {
    let mut c = Common::defaults().unwrap();
    c.quantum = Duration::from_nanos(Q);
    c.mem_interval = Duration::from_secs(1);
    c.mem_quiet_interval = Duration::from_secs(30);
    c.mem_cooldown = Duration::from_secs(3);
    c.min_age = Duration::ZERO;
    c.no_cpu = true;
    c
}

#[test]
fn a_quiet_guest_is_reclaimed_on_fresh_statistics_then_carried_forward() {
    // One idle guest (its vCPU never runs) with most of its 1 GiB unused: reclaimed step by
    // step on fresh readings (its balloon moving, it is not steady), then left at the floor,
    // quiet: carried forward.
    let mut h = Faulty::new(2, &[("idle", 1)]);
    h.sim.set_mem_need(0, 64 << 10);
    let mut a = Agent::new(h, AgentConfig::from_flags(&quiet_flags(), false));
    let (changes, carried, waited) = balloon_steps(&mut a, 120);
    assert_eq!(changes, 3, "reclaimed in 3 steps of 256 MiB");
    assert_eq!(waited, 0, "never carried while reclaimed from or cooling down");
    assert_eq!(a.host.sim.guest_sizes_kib()[0], 256 << 10, "down to the floor");
    assert!(carried >= 30, "carried {carried} times at the floor");
}

#[test]
fn a_steady_quiet_guest_the_planner_would_change_is_read_first() {
    // A steady guest (a quarter of its 1 GiB usable), quiet: carried forward. Then the host
    // runs short of its reserve (its own figures say so at once): the guest is to give
    // memory back, but only after a fresh reading.
    let mut h = Faulty::new(2, &[("steady", 1)]);
    h.sim.set_mem_need(0, 768 << 10);
    let mut a = Agent::new(h, AgentConfig::from_flags(&quiet_flags(), false));
    let (changes, carried, waited) = balloon_steps(&mut a, 20);
    assert_eq!((changes, waited), (0, 0), "a steady guest is left alone");
    assert!(carried >= 5, "carried {carried}");
    a.host.mem_available_kib = Some(512 << 10);
    let (changes, carried, waited) = balloon_steps(&mut a, 10);
    assert_eq!(waited, 1, "the first plan under pressure waited for a fresh reading");
    assert_eq!(changes, 1, "then the guest gave memory back");
    assert_eq!(carried, 1, "and nothing is carried while the host is short");
}

#[test]
fn a_guest_near_starving_or_without_its_own_figures_is_read_every_interval() {
    // All steady and quiet; "tight" has 14% of its 1 GiB usable (under twice the 10%
    // starving threshold), "blind" reports no figures of its own; the others 25%. (Two due of
    // five: the others are not read along in a call for all.)
    let mut h = Faulty::new(2, &[("tight", 1), ("blind", 1), ("roomy", 1), ("roomy2", 1), ("roomy3", 1)]);
    h.sim.set_mem_need(0, 880 << 10);
    for g in 1..5 {
        h.sim.set_mem_need(g, 768 << 10);
    }
    h.no_guest_figures = vec!["blind".into()];
    let mut a = Agent::new(h, AgentConfig::from_flags(&quiet_flags(), false));
    let mut carried: HashMap<String, u64> = HashMap::new();
    for _ in 0..20 {
        a.host.sim.advance(Q);
        let r = a.step();
        for d in r.snapshot.iter().flat_map(|s| &s.domains) {
            if d.balloon
                .as_ref()
                .is_some_and(|(b, t)| *t == r.snapshot.as_ref().unwrap().t_ns && b.carried_for_s.is_some())
            {
                *carried.entry(d.dom.name.clone()).or_default() += 1;
            }
        }
    }
    assert!(carried.get("roomy").is_some_and(|&n| n >= 5), "{carried:?}");
    assert!(!carried.contains_key("tight") && !carried.contains_key("blind"), "{carried:?}");
}

#[test]
fn a_guest_holding_a_grant_the_host_has_not_paid_for_is_read_every_interval() {
    // 8 GiB of maximum started at 6 GiB (all touched); nearly all of it in use: starving,
    // granted toward the middle of the band. It never touches the grant (the host never pays
    // for it: on credit), and it is steady and quiet after: still read at every interval.
    let mut h = Faulty::new(2, &[("grown", 1)]);
    let specs = [crate::sim::GuestSpec { name: "grown".into(), vcpus: 1, max_kib: 8 << 20, liar: false }];
    h.sim = crate::sim::SimHost::new(crate::sim::SimConfig::new(2, 16 << 20, 9 << 20), &specs).unwrap();
    assert_eq!(h.sim.guest_sizes_kib()[0], 6 << 20);
    h.sim.set_mem_need(0, (6 << 20) - (100 << 10));
    let mut a = Agent::new(h, AgentConfig::from_flags(&quiet_flags(), false));
    let (changes, _, _) = balloon_steps(&mut a, 8);
    assert!(changes >= 1 && a.host.sim.guest_sizes_kib()[0] > 6 << 20, "granted");
    a.host.sim.set_mem_need(0, (5 << 20) + (512 << 10));
    let (changes, carried, _) = balloon_steps(&mut a, 30);
    assert_eq!(changes, 0, "steady after the grant");
    assert!(a.mem.on_credit("grown"), "the grant is still on credit");
    assert_eq!(carried, 0, "a guest with a grant on credit is not carried");
}

#[test]
fn a_balloon_event_has_a_quiet_guest_read_again_and_a_pin_event_does_not() {
    // A steady, quiet guest on a host that reports events: carried forward between readings.
    let mut h = Faulty::new(2, &[("steady", 1)]);
    h.sim.set_mem_need(0, 768 << 10);
    h.events = Some(vec![]);
    let mut a = Agent::new(h, AgentConfig::from_flags(&quiet_flags(), false));
    balloon_steps(&mut a, 10);
    // A pin or metadata event (the agent's own pins raise them) says nothing about memory: it
    // has the definition read again, not the statistics.
    let (mut carried, describes) = (0, a.host.describes);
    for _ in 0..10 {
        a.host.events = Some(vec!["steady".into()]);
        carried += balloon_steps(&mut a, 1).1;
    }
    assert!(a.host.describes > describes, "the definition was read again");
    assert_eq!(carried, 5, "carried at every interval through pin events");
    // Its balloon moved (`virsh setmem`, its driver): read at the next interval, and at the
    // one after (the first reading's figures are stamped the second of the event: maybe from
    // before it), then carried.
    a.host.memory_events = vec!["steady".into()];
    assert_eq!(balloon_steps(&mut a, 4).1, 0, "read again after a balloon event");
    assert_eq!(balloon_steps(&mut a, 10).1, 5, "then carried again");
}

#[test]
fn balloon_statistics_that_do_not_answer_cost_the_memory_interval_not_the_quantum() {
    // A pile-up to spread, and memory balancing on; a guest's QEMU does not answer its
    // monitor: the balloon statistics call comes back late, every time.
    let mut h = piled();
    h.balloon_stats_late = true;
    let mut c = flags();
    c.no_memory = false;
    c.mem_interval = Duration::from_secs(1);
    let mut a = Agent::new(h, AgentConfig::from_flags(&c, false));
    let reports = run(&mut a, 10);
    assert!(reports[1..].iter().all(|r| r.snapshot.is_some()), "every quantum after the first planned on");
    assert!(reports.iter().any(|r| !r.plan.is_empty()), "the CPU balancer acted");
    assert!(reports.iter().all(|r| r.mem_verdicts.is_empty() && r.balloon_reads.read == 0));
    // The statistics answer again: the memory balancer judges the guests at the next interval.
    a.host.balloon_stats_late = false;
    let reports = run(&mut a, 4);
    assert!(reports.iter().any(|r| r.balloon_reads.read > 0 && !r.mem_verdicts.is_empty()));
}

#[test]
fn a_domain_whose_discovery_failed_for_a_passing_reason_is_tried_again() {
    // "web" cannot be described for a while (libvirtd timing out), "odd" never (its definition
    // is refused for good).
    let mut h = Faulty::new(2, &[("web", 1), ("odd", 1)]);
    h.describe_fails.insert("web".into(), ErrorClass::Transient);
    h.describe_fails.insert("odd".into(), ErrorClass::Permanent);
    let mut a = agent(h);
    run(&mut a, 4);
    let tries = a.host.describes;
    run(&mut a, 20);
    assert_eq!(a.host.describes, tries, "not tried every quantum (10 s)");
    // 30 s after the failure web is tried again (and fails again); odd is not.
    run(&mut a, 45);
    assert_eq!(a.host.describes, tries + 1, "one more try, for web only");
    a.host.describe_fails.remove("web");
    let reports = run(&mut a, 62);
    let names: Vec<&str> =
        reports.last().unwrap().snapshot.iter().flat_map(|s| &s.domains).map(|d| d.dom.name.as_str()).collect();
    assert_eq!(names, ["web"], "web found at its next try; odd left alone while it runs");
}
