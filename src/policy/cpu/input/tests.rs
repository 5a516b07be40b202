//! Tests of the planner input: slots at each `--pin-granularity`, on sysfs fixtures of real
//! machine layouts.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::host::{DomainDesc, DomainRef};
use crate::model::{DomainView, HostView, VcpuRates, VcpuView};
use crate::policy::Action;
use crate::policy::cpu::plan;

fn xeon() -> Topology {
    crate::host::procfs::topology(&crate::host::procfs::tests::fixture("xeon-2s16c2t")).unwrap()
}

fn epyc() -> Topology {
    crate::host::procfs::topology(&crate::host::procfs::tests::fixture("epyc-1s4ccx")).unwrap()
}

fn set(c: &[u32]) -> CpuSet {
    CpuSet(c.to_vec())
}

#[test]
fn groups_are_cores_or_llcs_of_the_allowed_cpus_with_their_capacity() {
    let t = xeon();
    let all: Vec<u32> = (0..64).collect();
    let cpu = groups(&all, &t, Granularity::Cpu);
    assert_eq!(cpu.len(), 64);
    assert_eq!(cpu[5], (set(&[5]), 1.0));
    let core = groups(&all, &t, Granularity::Core);
    assert_eq!(core.len(), 32);
    assert_eq!(core[0], (set(&[0, 32]), topo::SMT_YIELD), "both threads of core 0");
    assert_eq!(core[17], (set(&[17, 49]), topo::SMT_YIELD));
    let llc = groups(&all, &t, Granularity::Llc);
    let sock0: Vec<u32> = (0..16).chain(32..48).collect();
    assert_eq!(llc.len(), 2);
    assert_eq!(llc[0], (CpuSet(sock0), 16.0 * topo::SMT_YIELD));
    // `--cpus 0-15,32-33`: core 2-15's second threads not allowed; those cores count one core.
    let some: Vec<u32> = (0..16).chain(32..34).collect();
    let core = groups(&some, &t, Granularity::Core);
    assert_eq!(core.len(), 16);
    assert_eq!(core[2], (set(&[2]), 1.0));
    let llc = groups(&some, &t, Granularity::Llc);
    assert_eq!(llc, vec![(CpuSet(some.clone()), 2.0 * topo::SMT_YIELD + 14.0)]);
    // A chiplet: four LLCs of 4 cores (8 threads) in one node.
    let e = epyc();
    let all: Vec<u32> = (0..32).collect();
    let llc = groups(&all, &e, Granularity::Llc);
    assert_eq!(llc.len(), 4);
    assert_eq!(llc[1], (set(&[4, 5, 6, 7, 20, 21, 22, 23]), 4.0 * topo::SMT_YIELD));
}

fn snapshot(topology: Topology, busy: f64, vcpus: &[(&str, u32, &[u32], f64)]) -> Snapshot {
    let cpus: Vec<u32> = topology.cpus.iter().map(|c| c.cpu).collect();
    let mut domains: Vec<DomainView> = Vec::new();
    for &(name, id, pinned, demand) in vcpus {
        if !domains.iter().any(|d| d.dom.name == name) {
            let dom = DomainRef { name: name.into(), uuid: name.into(), id: 1 };
            let desc = DomainDesc::bare(dom.clone());
            domains.push(DomainView {
                dom,
                desc,
                cpu_excluded: None,
                mem_excluded: None,
                vcpus: vec![],
                balloon: None,
            });
        }
        let d = domains.iter_mut().find(|d| d.dom.name == name).unwrap();
        let rates = VcpuRates { usage: demand, delay: 0.0, demand, peak: demand };
        let pcpu = pinned.first().copied();
        d.vcpus.push(VcpuView { id, pcpu, pinned_to: set(pinned), rates: Some(rates), wait_ns: 0 });
    }
    let n = cpus.len();
    Snapshot {
        t_ns: 1_000_000_000_000,
        epoch_s: 0,
        quantum: 10,
        host: HostView {
            cpus,
            topology,
            cpu_busy: vec![busy; n],
            mem_total_kib: 0,
            mem_available_kib: 0,
            mem_pressure_some_avg10: None,
        },
        domains,
    }
}

/// The capacity advice's input from a planner input (`--high 0.75`, no reserve).
fn advice_input(snap: &Snapshot, i: &CpuInput) -> crate::policy::advice::AdviceInput {
    let cfg = crate::capacity::AdviceConfig {
        window: std::time::Duration::ZERO,
        high: 0.75,
        host_reserve_kib: 0,
        host_psi_limit: 10.0,
    };
    crate::capacity::input_from(snap, i, &HashMap::new(), 0, &cfg)
}

fn input(snap: &Snapshot, g: Granularity) -> CpuInput {
    let policy = CpuPolicy { granularity: g, ..CpuPolicy::default() };
    input_from(snap, &MovedAt::new(), &HashMap::new(), &BlockedPins::new(), &HashSet::new(), &policy)
}

#[test]
fn at_core_granularity_a_core_pin_is_a_slot_and_loads_are_shares_of_the_core() {
    let all: Vec<u32> = (0..64).collect();
    let snap = snapshot(
        xeon(),
        0.0,
        &[
            ("a", 0, &[3, 35], 1.0),    // pinned to core 3: on its slot
            ("a", 1, &all, 0.5),        // floating: placed
            ("b", 0, &[7], 0.25),       // pinned to one cpu (by `cpu` granularity): placed again
            ("c", 0, &[3, 4, 35], 0.5), // someone's set: left out, its load fixed
        ],
    );
    let i = input(&snap, Granularity::Core);
    assert_eq!(i.cpus.len(), 32);
    assert_eq!(i.cpus[3].group, Some(set(&[3, 35])));
    assert_eq!(i.cpus[3].to_string(), "cpus 3,35");
    assert_eq!(i.vcpus.len(), 3, "c's vCPU is someone else's: {:?}", i.vcpus);
    let (a0, a1, b0) = (&i.vcpus[0], &i.vcpus[1], &i.vcpus[2]);
    assert_eq!(a0.cpu, Some(3));
    assert!((a0.demand - 1.0 / topo::SMT_YIELD).abs() < 1e-9, "a share of the core: {}", a0.demand);
    assert_eq!((a1.cpu, b0.cpu), (None, None), "floating, and on one cpu: both placed");
    // The fixed load: a pinned vCPU's usage taken out of its core's busy time (0 here).
    assert!(i.cpus.iter().all(|c| c.fixed == 0.0));
    let plan = plan(&i, &CpuPolicy { granularity: Granularity::Core, ..CpuPolicy::default() });
    assert_eq!(plan.len(), 2, "{plan:?}");
    for a in &plan {
        let Action::Pin { to, .. } = a else { panic!("{a:?}") };
        assert_eq!(to.0.len(), 2, "pinned to both threads of a core: {a:?}");
        assert_eq!(to.0[1], to.0[0] + 32);
        assert_ne!(to.0[0], 3, "not onto the busy core: {a:?}");
    }
}

#[test]
fn at_llc_granularity_an_overloaded_llc_sheds_to_the_other() {
    // The chiplet: LLC 0 (cpus 0-3,16-19, capacity 5 cores) holds 8 full vCPUs, the others none.
    let llc0: Vec<u32> = vec![0, 1, 2, 3, 16, 17, 18, 19];
    let vcpus: Vec<(&str, u32, &[u32], f64)> = (0..8).map(|k| ("a", k, &llc0[..], 1.0)).collect();
    let snap = snapshot(epyc(), 0.0, &vcpus);
    let pol = CpuPolicy { granularity: Granularity::Llc, ..CpuPolicy::default() };
    let i = input(&snap, Granularity::Llc);
    assert_eq!(i.cpus.len(), 4);
    assert!(i.vcpus.iter().all(|v| v.cpu == Some(0)));
    let plan = plan(&i, &pol);
    assert!(!plan.is_empty());
    for a in &plan {
        let Action::Pin { from, to, reason, .. } = a else { panic!("{a:?}") };
        assert_eq!(from, &CpuSet(llc0.clone()));
        assert_eq!(to.0.len(), 8, "{a:?}");
        assert!(to.0.iter().all(|c| !llc0.contains(c)), "{a:?}");
        assert!(reason.contains("cpus 0-3,16-19"), "{reason}");
    }
}

#[test]
fn at_cpu_granularity_a_set_is_someone_elses_and_one_cpu_is_a_slot() {
    let snap = snapshot(xeon(), 0.6, &[("a", 0, &[3, 35], 0.5), ("a", 1, &[7], 0.5)]);
    let i = input(&snap, Granularity::Cpu);
    assert_eq!(i.cpus.len(), 64);
    assert_eq!(i.vcpus.len(), 1);
    assert_eq!(i.vcpus[0].cpu, Some(7));
    assert!((i.cpus[7].fixed - 0.1).abs() < 1e-9, "its usage out of cpu 7's busy time");
    assert!((i.cpus[3].fixed - 0.6).abs() < 1e-9, "the set's usage stays in the fixed load");
}

#[test]
fn the_capacity_advice_reads_a_groups_loads_in_cores() {
    // Two vCPUs (1 and 0.5 cores) on the chiplet's first LLC (8 cpus, 5 cores of capacity).
    let llc0: Vec<u32> = vec![0, 1, 2, 3, 16, 17, 18, 19];
    let snap = snapshot(epyc(), 0.0, &[("a", 0, &llc0[..], 1.0), ("a", 1, &llc0[..], 0.5)]);
    let i = input(&snap, Granularity::Llc);
    assert!((i.vcpus[0].demand - 0.2).abs() < 1e-9, "the planner's share of the LLC");
    let a = advice_input(&snap, &i);
    assert_eq!(a.cpus, 32, "every allowed cpu, not one per group");
    assert!((a.guests[0].cpu_cores - 1.5).abs() < 1e-9, "{:?}", a.guests);
    assert!((a.load_cores - 1.5).abs() < 1e-9, "{}", a.load_cores);
}

#[test]
fn a_smaller_group_carries_what_it_lacks_as_fixed_load() {
    // `--cpus 0-15,32-33` on the Xeon at core granularity: cores 0 and 1 with both threads
    // (1.25 cores each), cores 2-15 with one (1 core each).
    let mut snap = snapshot(xeon(), 0.0, &[("a", 0, &[2], 1.0)]);
    snap.host.cpus = (0..16).chain(32..34).collect();
    snap.host.cpu_busy = vec![0.0; 18];
    snap.host.cpu_busy[2] = 1.0; // the vCPU runs there
    let i = input(&snap, Granularity::Core);
    assert_eq!(i.cpus.len(), 16);
    assert_eq!(i.cpus[0].group, Some(set(&[0, 32])));
    assert_eq!(i.cpus[2].group, Some(set(&[2])));
    let unit = topo::SMT_YIELD;
    assert!(i.cpus[0].fixed.abs() < 1e-9);
    assert!((i.cpus[2].fixed - (unit - 1.0) / unit).abs() < 1e-9, "{}", i.cpus[2].fixed);
    // One full vCPU weighs the same on either: a one-thread core holding it is full.
    let v = &i.vcpus[0];
    assert!((v.demand - 1.0 / unit).abs() < 1e-9);
    assert!((i.cpus[2].fixed + v.demand - 1.0).abs() < 1e-9);
    // The advice counts cores, not what a group lacks: one core of demand on an idle host.
    let a = advice_input(&snap, &i);
    assert_eq!(a.cpus, 18);
    assert!((a.load_cores - 1.0).abs() < 1e-9, "{}", a.load_cores);
}

#[test]
fn a_group_pin_the_hosts_cpuset_narrowed_is_still_on_its_group() {
    // Core {3, 35}, but the guest's cpuset (its default affinity) leaves out cpu 35: the
    // kernel narrowed the agent's pin to {3}; it is on core 3's slot, not placed again.
    let all: Vec<u32> = (0..64).filter(|&c| c != 35).collect();
    let mut snap = snapshot(xeon(), 0.0, &[("a", 0, &[3], 0.5)]);
    snap.domains[0].desc.default_affinity = Some(CpuSet(all));
    let i = input(&snap, Granularity::Core);
    assert_eq!(i.vcpus[0].cpu, Some(3), "{:?}", i.vcpus[0]);
    // Without that cpuset, a vCPU on one cpu of a core is the agent's to place again.
    snap.domains[0].desc.default_affinity = None;
    assert_eq!(input(&snap, Granularity::Core).vcpus[0].cpu, None);
}
