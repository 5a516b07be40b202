use super::*;

use crate::cli::Common;
use crate::daemon::AgentConfig;
use crate::sim::{GuestSpec, SimConfig, SimHost};

fn host(cpus: u32, guests: &[(&str, u32)]) -> SimHost {
    let specs: Vec<GuestSpec> = guests
        .iter()
        .map(|&(name, vcpus)| GuestSpec { name: name.into(), vcpus, max_kib: 1 << 20, liar: false })
        .collect();
    SimHost::new(SimConfig::new(cpus, 64 << 20, 1 << 20), &specs).unwrap()
}

fn agent(h: SimHost, dry_run: bool, keep: bool) -> Agent<SimHost> {
    let mut c = Common::defaults().unwrap();
    c.no_memory = true;
    c.keep_pins_on_exit = keep;
    Agent::new(h, AgentConfig::from_flags(&c, dry_run))
}

/// Steps the agent until it has a snapshot (rates need two samples).
fn snapshot(a: &mut Agent<SimHost>) -> Snapshot {
    for _ in 0..5 {
        a.host.advance(2_000_000_000);
        if let Some(s) = a.step().snapshot {
            return s;
        }
    }
    panic!("no snapshot")
}

fn dom(h: &mut SimHost, g: usize) -> DomainRef {
    h.list_domains().unwrap()[g].clone()
}

fn set(c: &[u32]) -> CpuSet {
    CpuSet(c.to_vec())
}

fn pin(domain: &str, vcpu: u32, from: &[u32], to: u32) -> Action {
    let kind = crate::policy::PinKind::Move;
    Action::Pin { domain: domain.into(), vcpu, from: set(from), to: CpuSet::single(to), kind, reason: "test".into() }
}

fn rec(h: &mut SimHost, g: usize) -> Vec<(u32, CpuSet)> {
    let d = dom(h, g);
    h.agent_pins(&d).unwrap().into_iter().map(|p| (p.vcpu, p.prior)).collect()
}

#[test]
fn the_first_pin_records_the_prior_and_later_pins_keep_it() {
    let mut a = agent(host(2, &[("a", 2)]), true, false);
    let s = snapshot(&mut a);
    let out = apply_recorded(&mut a.host, &s, &[pin("a", 0, &[0, 1], 0)], u64::MAX, Granularity::Cpu).unwrap();
    assert!(matches!(out[..], [Outcome::Applied]), "{out:?}");
    assert_eq!(rec(&mut a.host, 0), vec![(0, set(&[0, 1]))]);
    assert_eq!(a.host.affinity(0, 0), Some(&set(&[0])));

    let s = snapshot(&mut a);
    let out =
        apply_recorded(&mut a.host, &s, &[pin("a", 0, &[0], 1), pin("a", 1, &[0, 1], 0)], u64::MAX, Granularity::Cpu)
            .unwrap();
    assert!(matches!(out[..], [Outcome::Applied, Outcome::Applied]), "{out:?}");
    assert_eq!(rec(&mut a.host, 0), vec![(0, set(&[0, 1])), (1, set(&[0, 1]))], "vCPU 0 keeps its first prior");
    assert_eq!(a.host.affinity(0, 0), Some(&set(&[1])));
}

#[test]
fn a_restarted_agent_keeps_the_prior_its_predecessor_recorded() {
    let mut h = host(2, &[("a", 1)]);
    // What a crashed agent left: vCPU 0 on cpu 1, recorded as floating over 0-1 before.
    let d = dom(&mut h, 0);
    h.pin_vcpu(&d, 0, 1).unwrap();
    h.set_agent_pins(&d, &[AgentPin { vcpu: 0, prior: set(&[0, 1]), granularity: None }]).unwrap();
    let mut a = agent(h, true, false);
    let s = snapshot(&mut a);
    apply_recorded(&mut a.host, &s, &[pin("a", 0, &[1], 0)], u64::MAX, Granularity::Cpu).unwrap();
    assert_eq!(rec(&mut a.host, 0), vec![(0, set(&[0, 1]))], "not overwritten by the single-cpu pin it found");
    let sum = release_all(&mut a.host, Granularity::Cpu).unwrap();
    assert_eq!(sum, Summary { domains: 1, restored: 1, failed: 0 });
    assert_eq!(a.host.affinity(0, 0), Some(&set(&[0, 1])), "the true original, not the predecessor's pin");
}

#[test]
fn the_agent_records_what_it_pins_and_a_clean_stop_gives_it_back() {
    let mut h = host(2, &[("a", 2), ("b", 1)]);
    h.set_demand(0, 0, 1.0);
    h.set_demand(0, 1, 1.0);
    let mut a = agent(h, false, false);
    for _ in 0..6 {
        a.host.advance(2_000_000_000);
        a.step();
    }
    for v in 0..2 {
        assert!(a.host.affinity(0, v).unwrap().as_single().is_some(), "vCPU {v} pinned: {:?}", a.host.affinity(0, v));
    }
    assert_eq!(rec(&mut a.host, 0), vec![(0, set(&[0, 1])), (1, set(&[0, 1]))]);
    // The idle guest is placed too (every floating vCPU is), perhaps not yet; its emulator
    // then follows its one vCPU (a's vCPUs are on both cpus: its emulator may stay floating).
    let idle = rec(&mut a.host, 1).len();
    let db = dom(&mut a.host, 1);
    let threads = a.host.agent_threads(&db).unwrap();
    assert_eq!(threads.len(), idle, "the idle guest's emulator is recorded when it is pinned: {threads:?}");
    if idle > 0 {
        assert_eq!(threads[0], ThreadPin { thread: QemuThread::Emulator, prior: set(&[0, 1]) });
        assert_eq!(a.host.emulator_pin(1), a.host.affinity(1, 0), "with its vCPU");
    }
    let sum = stop_release(&mut a).unwrap().unwrap();
    assert_eq!(sum, Summary { domains: 1 + idle, restored: 2 + 2 * idle, failed: 0 });
    for (g, v) in [(0, 0), (0, 1), (1, 0)] {
        assert_eq!(a.host.affinity(g, v), Some(&set(&[0, 1])), "guest {g} vCPU {v} floats again");
    }
    if idle > 0 {
        assert_eq!(a.host.emulator_pin(1), Some(&set(&[0, 1])), "the emulator floats again");
    }
    assert!(rec(&mut a.host, 0).is_empty() && rec(&mut a.host, 1).is_empty(), "records cleared");
    assert!(a.host.agent_threads(&db).unwrap().is_empty(), "thread record cleared");
    assert_eq!(
        release_all(&mut a.host, Granularity::Cpu).unwrap(),
        Summary::default(),
        "a second release has nothing to do"
    );
}

#[test]
fn a_dry_run_records_nothing_and_gives_nothing_back() {
    let mut h = host(2, &[("a", 2)]);
    h.set_demand(0, 0, 1.0);
    let mut a = agent(h, true, false);
    for _ in 0..4 {
        a.host.advance(2_000_000_000);
        a.step();
    }
    assert!(rec(&mut a.host, 0).is_empty());
    assert_eq!(a.host.affinity(0, 0), Some(&set(&[0, 1])));
    assert!(stop_release(&mut a).is_none());
}

#[test]
fn keep_pins_on_exit_keeps_the_pins_and_the_record() {
    let mut h = host(2, &[("a", 2)]);
    h.set_demand(0, 0, 1.0);
    h.set_demand(0, 1, 1.0);
    let mut a = agent(h, false, true);
    for _ in 0..6 {
        a.host.advance(2_000_000_000);
        a.step();
    }
    assert!(stop_release(&mut a).is_none());
    assert!(a.host.affinity(0, 0).unwrap().as_single().is_some());
    assert_eq!(rec(&mut a.host, 0).len(), 2, "still recorded for the next agent or `release`");
}

#[test]
fn a_domain_gone_during_release_is_skipped() {
    let mut h = host(2, &[("a", 1), ("b", 1)]);
    for g in 0..2 {
        let d = dom(&mut h, g);
        h.set_agent_pins(&d, &[AgentPin { vcpu: 0, prior: set(&[0, 1]), granularity: None }]).unwrap();
        h.pin_vcpu(&d, 0, 0).unwrap();
    }
    let listed = h.list_domains().unwrap();
    h.restart_guest(0);
    let sum = release_domains(&mut h, &listed, Granularity::Cpu).unwrap();
    assert_eq!(sum, Summary { domains: 1, restored: 1, failed: 0 });
    assert_eq!(h.affinity(1, 0), Some(&set(&[0, 1])));
}

#[test]
fn a_pin_that_fails_is_taken_out_of_the_record() {
    let mut a = agent(host(2, &[("a", 1)]), true, false);
    let s = snapshot(&mut a);
    // No vCPU 7: the pin fails after its prior was recorded.
    let out = apply_recorded(
        &mut a.host,
        &s,
        &[pin("a", 7, &[0, 1], 0), pin("a", 0, &[0, 1], 1)],
        u64::MAX,
        Granularity::Cpu,
    )
    .unwrap();
    assert!(matches!(out[..], [Outcome::Failed(_), Outcome::Applied]), "{out:?}");
    assert_eq!(rec(&mut a.host, 0), vec![(0, set(&[0, 1]))]);
}

#[test]
fn a_thread_pin_records_its_prior_first_and_a_failed_one_is_taken_out_again() {
    let mut a = agent(host(2, &[("a", 1)]), true, false);
    let s = snapshot(&mut a);
    let thread = |thread, to: &[u32]| Action::PinThread {
        domain: "a".into(),
        thread,
        from: set(&[0, 1]),
        to: set(to),
        reason: "test".into(),
    };
    // The simulated guest has no I/O thread: that pin fails after its prior was recorded.
    let plan = [thread(QemuThread::Emulator, &[1]), thread(QemuThread::IoThread(1), &[1])];
    let out = apply_recorded(&mut a.host, &s, &plan, u64::MAX, Granularity::Cpu).unwrap();
    assert!(matches!(out[..], [Outcome::Applied, Outcome::Failed(_)]), "{out:?}");
    let d = dom(&mut a.host, 0);
    assert_eq!(
        a.host.agent_threads(&d).unwrap(),
        vec![ThreadPin { thread: QemuThread::Emulator, prior: set(&[0, 1]) }]
    );
    assert_eq!(a.host.emulator_pin(0), Some(&set(&[1])));
    // A later pin keeps the first prior; release gives it back and clears the record.
    let s = snapshot(&mut a);
    let mut later = thread(QemuThread::Emulator, &[0]);
    if let Action::PinThread { from, .. } = &mut later {
        *from = set(&[1]);
    }
    apply_recorded(&mut a.host, &s, &[later], u64::MAX, Granularity::Cpu).unwrap();
    assert_eq!(a.host.agent_threads(&d).unwrap()[0].prior, set(&[0, 1]));
    let r = release_domain(&mut a.host, &d, Granularity::Cpu).unwrap().unwrap();
    assert_eq!(r.threads_restored, vec![ThreadPin { thread: QemuThread::Emulator, prior: set(&[0, 1]) }]);
    assert_eq!(a.host.emulator_pin(0), Some(&set(&[0, 1])));
    assert!(a.host.agent_threads(&d).unwrap().is_empty());
}

#[test]
fn a_vcpu_someone_else_has_set_since_is_left_alone() {
    let mut h = host(4, &[("a", 3)]);
    let d = dom(&mut h, 0);
    let prior = set(&[0, 1, 2, 3]);
    let pins: Vec<AgentPin> = (0..3).map(|vcpu| AgentPin { vcpu, prior: prior.clone(), granularity: None }).collect();
    h.set_agent_pins(&d, &pins).unwrap();
    h.pin_vcpu(&d, 0, 1).unwrap();
    h.pin_vcpu_set(&d, 1, &set(&[2, 3])).unwrap();
    let r = release_domain(&mut h, &d, Granularity::Cpu).unwrap().unwrap();
    assert_eq!(r.left, vec![(1, set(&[2, 3]))]);
    assert_eq!(
        r.restored.iter().map(|p| p.vcpu).collect::<Vec<_>>(),
        vec![0, 2],
        "vCPU 2 already floats: nothing to set"
    );
    assert_eq!(h.affinity(0, 0), Some(&prior));
    assert_eq!(h.affinity(0, 1), Some(&set(&[2, 3])));
    assert!(h.agent_pins(&d).unwrap().is_empty());
}

#[test]
fn a_set_inside_one_core_or_llc_is_the_agents_only_at_that_granularity() {
    // 8 simulated cpus: 2 sockets of 2 cores of 2 threads; cpus 1 and 5 share a core, cpus
    // 0, 1, 4, 5 socket 0's LLC.
    let all = set(&[0, 1, 2, 3, 4, 5, 6, 7]);
    let setup = || {
        let mut h = host(8, &[("a", 3)]);
        let d = dom(&mut h, 0);
        let pins: Vec<AgentPin> = (0..3).map(|vcpu| AgentPin { vcpu, prior: all.clone(), granularity: None }).collect();
        h.set_agent_pins(&d, &pins).unwrap();
        h.pin_vcpu_set(&d, 0, &set(&[1, 5])).unwrap();
        h.pin_vcpu_set(&d, 1, &set(&[0, 1, 4, 5])).unwrap();
        h.pin_vcpu_set(&d, 2, &set(&[1, 2])).unwrap();
        (h, d)
    };
    let restored = |r: &Released| r.restored.iter().map(|p| p.vcpu).collect::<Vec<_>>();
    let left = |r: &Released| r.left.iter().map(|(v, _)| *v).collect::<Vec<_>>();
    // At `cpu` the agent pins single cpus only: every set is someone else's.
    let (mut h, d) = setup();
    let r = release_domain(&mut h, &d, Granularity::Cpu).unwrap().unwrap();
    assert_eq!((restored(&r), left(&r)), (vec![], vec![0, 1, 2]));
    assert_eq!(h.affinity(0, 0), Some(&set(&[1, 5])), "an operator's set inside one core stays");
    // At `core`: the core's two threads.
    let (mut h, d) = setup();
    let r = release_domain(&mut h, &d, Granularity::Core).unwrap().unwrap();
    assert_eq!((restored(&r), left(&r)), (vec![0], vec![1, 2]));
    // At `llc`: a set inside socket 0's LLC (a core is inside it too), not one across sockets.
    let (mut h, d) = setup();
    let r = release_domain(&mut h, &d, Granularity::Llc).unwrap().unwrap();
    assert_eq!((restored(&r), left(&r)), (vec![0, 1], vec![2]));
    assert_eq!(h.affinity(0, 1), Some(&all));
}

#[test]
fn a_pin_recorded_at_a_group_granularity_is_given_back_whatever_the_settings_say_now() {
    // The agent pinned at `llc` and crashed; `release` runs with settings now saying `cpu`.
    let all = set(&[0, 1, 2, 3, 4, 5, 6, 7]);
    let mut a = agent(host(8, &[("a", 2)]), true, false);
    let s = snapshot(&mut a);
    let llc = set(&[0, 1, 4, 5]);
    let to_llc = |vcpu| {
        let kind = crate::policy::PinKind::Placement;
        Action::Pin { domain: "a".into(), vcpu, from: all.clone(), to: llc.clone(), kind, reason: "test".into() }
    };
    let plan = [to_llc(0), to_llc(1)];
    apply_recorded(&mut a.host, &s, &plan, u64::MAX, Granularity::Llc).unwrap();
    let d = dom(&mut a.host, 0);
    let rec = a.host.agent_pins(&d).unwrap();
    assert!(rec.iter().all(|p| p.granularity.as_deref() == Some("llc")), "{rec:?}");
    // An operator narrowed vCPU 1 to two cpus across the sockets meanwhile: that one stays.
    a.host.pin_vcpu_set(&d, 1, &set(&[1, 2])).unwrap();
    let r = release_domain(&mut a.host, &d, Granularity::Cpu).unwrap().unwrap();
    assert_eq!(r.restored.iter().map(|p| p.vcpu).collect::<Vec<_>>(), vec![0]);
    assert_eq!(r.left, vec![(1, set(&[1, 2]))]);
    assert_eq!(a.host.affinity(0, 0), Some(&all));
}

#[test]
fn a_recorded_vcpu_pinned_again_at_a_coarser_granularity_has_its_entry_say_so() {
    let all = set(&[0, 1, 2, 3, 4, 5, 6, 7]);
    let mut a = agent(host(8, &[("a", 1)]), true, false);
    let s = snapshot(&mut a);
    apply_recorded(&mut a.host, &s, &[pin("a", 0, &all.0, 1)], u64::MAX, Granularity::Cpu).unwrap();
    let d = dom(&mut a.host, 0);
    assert_eq!(a.host.agent_pins(&d).unwrap()[0].granularity, None);
    // `diagnose --apply --pin-granularity llc` beside it: the same vCPU to socket 0's LLC.
    let s = snapshot(&mut a);
    let llc = set(&[0, 1, 4, 5]);
    let kind = crate::policy::PinKind::Move;
    let to_llc = Action::Pin { domain: "a".into(), vcpu: 0, from: set(&[1]), to: llc, kind, reason: "test".into() };
    apply_recorded(&mut a.host, &s, &[to_llc], u64::MAX, Granularity::Llc).unwrap();
    let rec = a.host.agent_pins(&d).unwrap();
    assert_eq!((rec[0].prior.clone(), rec[0].granularity.as_deref()), (all.clone(), Some("llc")), "first prior kept");
    // A crash, and a release at `cpu`: given back.
    let r = release_domain(&mut a.host, &d, Granularity::Cpu).unwrap().unwrap();
    assert_eq!(r.restored.len(), 1, "{r:?}");
    assert_eq!(a.host.affinity(0, 0), Some(&all));
}

#[test]
fn a_prior_naming_cpus_this_host_lacks_gives_back_the_part_it_has() {
    // A guest live-migrated from a 64-cpu host, its record and pin carried along.
    let mut h = host(2, &[("a", 2)]);
    let d = dom(&mut h, 0);
    h.pin_vcpu(&d, 0, 1).unwrap();
    h.pin_vcpu(&d, 1, 0).unwrap();
    let pins = [
        AgentPin { vcpu: 0, prior: set(&(0..64).collect::<Vec<u32>>()), granularity: None },
        AgentPin { vcpu: 1, prior: set(&[40, 41]), granularity: None },
    ];
    h.set_agent_pins(&d, &pins).unwrap();
    let mut a = agent(h, true, false);
    let sum = release_all(&mut a.host, Granularity::Cpu).unwrap();
    assert_eq!(sum, Summary { domains: 1, restored: 2, failed: 0 });
    assert_eq!(a.host.affinity(0, 0), Some(&set(&[0, 1])), "0-63 on a 2-cpu host: its cpus");
    assert_eq!(a.host.affinity(0, 1), Some(&set(&[0, 1])), "none of 40-41 here: every cpu");
}

#[test]
fn a_prior_naming_a_cpu_offline_now_is_given_back_its_online_part_when_refused() {
    // cgroup v1 refuses a set naming an offline cpu: the online part is given back.
    let mut h = crate::sim::faulty::Faulty::new(4, &[("a", 1)]);
    let d = h.sim.list_domains().unwrap()[0].clone();
    h.sim.pin_vcpu(&d, 0, 1).unwrap();
    h.sim.set_agent_pins(&d, &[AgentPin { vcpu: 0, prior: set(&[0, 1, 2, 3]), granularity: None }]).unwrap();
    h.sim.set_cpu_online(3, false);
    h.offline_sets_refused = true;
    let sum = release_all(&mut h, Granularity::Cpu).unwrap();
    assert_eq!(sum, Summary { domains: 1, restored: 1, failed: 0 });
    assert_eq!(h.sim.affinity(0, 0), Some(&set(&[0, 1, 2])));
}
