//! Consolidation's rules as examples, and its invariants as properties: no cpu left above
//! `--high` or its peaks above `--peak-limit`, no busy vCPU moved or packed onto, whole cores
//! emptied, nothing for the balancer to undo, and no moves left on a steady load.

use super::*;
use crate::host::CpuTopo;
use crate::policy::cpu::fixtures::{self, cpus};
use crate::policy::cpu::{self, VcpuSlot};
use proptest::prelude::*;

fn vcpu(dom: &str, n: u32, demand: f64, cpu: usize) -> VcpuSlot {
    fixtures::vcpu(dom, n, demand, Some(cpu))
}

/// Each cpu a core of its own.
fn flat(n: usize) -> Vec<usize> {
    (0..n).collect()
}

/// The input with a plan's pins applied.
fn apply(input: &CpuInput, plan: &[Action]) -> CpuInput {
    let mut out = input.clone();
    for a in plan {
        let Action::Pin { domain, vcpu, to, .. } = a else { panic!("only pins: {a}") };
        let v = out.vcpus.iter_mut().find(|v| *v.domain == **domain && v.vcpu == *vcpu).unwrap();
        let c = input.cpus.iter().position(|c| Some(c.id) == to.as_single()).unwrap();
        v.cpu = Some(c);
        v.current = to.clone();
    }
    out
}

fn peaks(input: &CpuInput) -> Vec<f64> {
    let mut p: Vec<f64> = input.cpus.iter().map(|c| c.fixed).collect();
    for v in &input.vcpus {
        if let Some(c) = v.cpu {
            p[c] += v.peak;
        }
    }
    p
}

/// Cpus (indices) holding no vCPU.
fn empty(input: &CpuInput) -> Vec<usize> {
    (0..input.cpus.len()).filter(|&c| input.vcpus.iter().all(|v| v.cpu != Some(c))).collect()
}

#[test]
fn idle_vcpus_spread_over_cpus_are_packed_onto_one() {
    // Three idle vCPUs: two on cpu 0, one on cpu 1 (the lab's end-to-end case).
    let input =
        CpuInput { cpus: cpus(2), vcpus: vec![vcpu("a", 0, 0.02, 0), vcpu("b", 0, 0.03, 0), vcpu("c", 0, 0.01, 1)] };
    let p = plan(&input, &flat(2), &ConsolidatePolicy::default());
    assert_eq!(p.len(), 1, "{p:#?}");
    let Action::Pin { domain, to, kind, reason, .. } = &p[0] else { panic!() };
    assert_eq!((domain.as_str(), to.as_single(), *kind), ("c", Some(0), PinKind::Consolidate), "{reason}");
    assert!(reason.contains("to leave cpu 1 with no vCPU"), "{reason}");
    let after = apply(&input, &p);
    assert_eq!(empty(&after), vec![1]);
    assert!(plan(&after, &flat(2), &ConsolidatePolicy::default()).is_empty(), "settled: nothing more to do");
    assert!(cpu::plan(&after, &CpuPolicy::default()).is_empty(), "nothing for the balancer to undo");
}

#[test]
fn a_busy_vcpu_is_never_moved_nor_packed_onto() {
    let pol = ConsolidatePolicy::default();
    // cpu 0: a busy vCPU alone; cpu 1: two idle ones. Packing the idle ones onto cpu 0 would
    // fit under --high, but cpu 0's vCPU needs it; and the busy one itself stays.
    let input = CpuInput {
        cpus: cpus(2),
        vcpus: vec![vcpu("busy", 0, pol.busy + 0.05, 0), vcpu("a", 0, 0.02, 1), vcpu("b", 0, 0.02, 1)],
    };
    assert!(plan(&input, &flat(2), &pol).is_empty());
    // With a third cpu holding one idle vCPU, that one joins cpu 1, never cpu 0.
    let mut three = input.clone();
    three.cpus = cpus(3);
    three.vcpus.push(vcpu("c", 0, 0.02, 2));
    let p = plan(&three, &flat(3), &pol);
    assert_eq!(p.len(), 1, "{p:#?}");
    let Action::Pin { domain, to, .. } = &p[0] else { panic!() };
    assert_eq!((domain.as_str(), to.as_single()), ("c", Some(1)));
}

#[test]
fn packing_stops_below_high_less_the_hysteresis_and_under_the_peak_limit() {
    let pol = ConsolidatePolicy::default();
    let room = pol.high - pol.headroom;
    // cpu 0 holds two low vCPUs; the one on cpu 1 joins them only if the sum stays within room.
    let d = pol.busy - 0.01;
    let case = |last: f64| CpuInput {
        cpus: cpus(2),
        vcpus: vec![vcpu("a", 0, d, 0), vcpu("a", 1, d, 0), vcpu("b", 0, last, 1)],
    };
    assert!(plan(&case(room - 2.0 * d + 0.01), &flat(2), &pol).is_empty(), "would pack above {room}");
    assert_eq!(plan(&case(room - 2.0 * d - 0.01), &flat(2), &pol).len(), 1, "fits under {room}");
    // Idle now, but with peaks that would add up to more than the limit on one cpu.
    let mut spiky = CpuInput { cpus: cpus(2), vcpus: vec![vcpu("a", 0, 0.02, 0), vcpu("b", 0, 0.02, 1)] };
    for v in &mut spiky.vcpus {
        v.peak = pol.peak_limit / 2.0 + 0.05;
    }
    assert!(plan(&spiky, &flat(2), &pol).is_empty(), "peaks would exceed the limit");
    for v in &mut spiky.vcpus {
        v.peak = pol.peak_limit / 2.0 - 0.05;
    }
    assert_eq!(plan(&spiky, &flat(2), &pol).len(), 1, "peaks fit");
}

#[test]
fn whole_smt_cores_are_emptied() {
    // 2 cores of 2 threads, numbered like Linux: cpus 0 and 2 share core 0, 1 and 3 core 1.
    let topo =
        Topology { cpus: (0..4).map(|cpu| CpuTopo { cpu, node: 0, package: 0, core: cpu % 2, llc: 0 }).collect() };
    let input = CpuInput { cpus: cpus(4), vcpus: (0..4).map(|i| vcpu("a", i, 0.05, i as usize)).collect() };
    let cores = core_groups(&input.cpus, &topo);
    assert_eq!(cores[0], cores[2]);
    assert_eq!(cores[1], cores[3]);
    assert_ne!(cores[0], cores[1]);
    let p = plan(&input, &cores, &ConsolidatePolicy::default());
    let after = apply(&input, &p);
    let free = empty(&after);
    assert_eq!(free.len(), 2, "{p:#?}");
    assert_eq!(cores[free[0]], cores[free[1]], "both threads of one core are free: {free:?}");
    assert_eq!(p.len(), 2, "two moves free a whole core");
}

#[test]
fn a_drain_larger_than_max_repins_goes_on_over_quanta_and_then_stops() {
    // 8 idle vCPUs, one per cpu, 2 repins per quantum: consolidation drains over several plans
    // (each applied), never exceeds the limit, and stops.
    let pol = ConsolidatePolicy { max_repins: 2, ..ConsolidatePolicy::default() };
    let mut input = CpuInput { cpus: cpus(8), vcpus: (0..8).map(|i| vcpu("a", i, 0.05, i as usize)).collect() };
    let mut rounds = 0;
    loop {
        let p = plan(&input, &flat(8), &pol);
        assert!(p.len() <= pol.max_repins);
        if p.is_empty() {
            break;
        }
        input = apply(&input, &p);
        rounds += 1;
        assert!(rounds < 50, "no convergence");
    }
    let loads = cpu::loads(&input);
    let room = pol.high - pol.headroom;
    assert!(loads.iter().all(|&l| l <= room + 1e-9), "{loads:?}");
    // 8 × 0.05 = 0.4 fits on one cpu.
    assert_eq!(empty(&input).len(), 7, "{loads:?}");
}

#[test]
fn nothing_while_a_vcpu_floats_or_a_vcpu_of_the_core_cannot_move() {
    let pol = ConsolidatePolicy::default();
    let mut input = CpuInput { cpus: cpus(2), vcpus: vec![vcpu("a", 0, 0.02, 0), vcpu("b", 0, 0.02, 1)] };
    input.vcpus[0].cpu = None;
    assert!(plan(&input, &flat(2), &pol).is_empty(), "floating: the balancer places it first");
    input.vcpus[0].cpu = Some(0);
    input.vcpus[0].movable = false;
    input.vcpus[1].movable = false;
    assert!(plan(&input, &flat(2), &pol).is_empty(), "cooling down on both cpus: nothing moves");
    input.vcpus[1].movable = true;
    let p = plan(&input, &flat(2), &pol);
    assert_eq!(p.len(), 1, "the movable one joins the one cooling down");
    input.cpus[0].settling = true;
    assert!(plan(&input, &flat(2), &pol).is_empty(), "a settling cpu is no target");
}

#[test]
fn free_cpus_are_the_allowed_cpus_no_affinity_covers() {
    let pins = [CpuSet::single(0), CpuSet::single(0), CpuSet(vec![2, 3])];
    assert_eq!(free_cpus(&[0, 1, 2, 3, 4], &pins), vec![1, 4]);
    // A vCPU floating over every cpu leaves none free; a pin outside the allowed set is ignored.
    assert!(free_cpus(&[0, 1], &[CpuSet(vec![0, 1])]).is_empty());
    assert_eq!(free_cpus(&[0, 1], &[CpuSet::single(7)]), vec![0, 1]);
}

prop_compose! {
    /// Up to 12 cpus, in cores of one or two threads, with vCPUs of any demand (most of them
    /// low), peaks, fixed load, some not movable, some cpus settling.
    fn arb_case()(n in 2usize..12, smt in any::<bool>(),
                  vs in proptest::collection::vec((0.0f64..0.6, 0.0f64..0.6, 0usize..12, 0u8..8), 0..30),
                  fixed in proptest::collection::vec(0.0f64..0.3, 12),
                  settling in proptest::collection::vec(0u8..8, 12)) -> (CpuInput, Vec<usize>) {
        let mut c = cpus(u32::try_from(n).unwrap());
        for (i, s) in c.iter_mut().enumerate() {
            s.fixed = fixed[i];
            s.node = u32::try_from(i % 2).unwrap();
            s.settling = settling[i] == 0;
        }
        let vcpus = vs.iter().enumerate().map(|(i, &(d, extra, cpu, mv))| {
            // Mostly low demand: a third of the draw range.
            let mut v = vcpu("d", u32::try_from(i).unwrap(), if mv < 6 { d / 3.0 } else { d }, cpu % n);
            v.peak = (v.demand + extra).min(1.0);
            v.movable = mv != 0;
            v
        }).collect();
        let cores: Vec<usize> = if smt { (0..n).map(|c| c / 2).collect() } else { (0..n).collect() };
        (CpuInput { cpus: c, vcpus }, cores)
    }
}

proptest! {
    #[test]
    fn invariants((input, cores) in arb_case(), max_repins in 0usize..10) {
        let pol = ConsolidatePolicy { max_repins, ..ConsolidatePolicy::default() };
        let p = plan(&input, &cores, &pol);
        let after = apply(&input, &p);
        let (l0, l1) = (cpu::loads(&input), cpu::loads(&after));
        let (p0, p1) = (peaks(&input), peaks(&after));
        prop_assert!(p.len() <= max_repins);
        let mut moved = std::collections::HashSet::new();
        for a in &p {
            let Action::Pin { domain, vcpu, to, kind, .. } = a else { panic!() };
            prop_assert_eq!(*kind, PinKind::Consolidate);
            let v = input.vcpus.iter().find(|v| *v.domain == **domain && v.vcpu == *vcpu).unwrap();
            prop_assert!(v.movable, "only movable vCPUs move");
            prop_assert!(v.demand <= pol.busy + 1e-9, "a busy vCPU never moves: {}", v.demand);
            prop_assert!(moved.insert(*vcpu), "each vCPU moves at most once");
            let t = input.cpus.iter().position(|c| Some(c.id) == to.as_single()).unwrap();
            prop_assert!(!input.cpus[t].settling);
            prop_assert!(input.vcpus.iter().filter(|w| w.cpu == Some(t)).all(|w| w.demand <= pol.busy + 1e-9),
                "never packed onto a cpu a busy vCPU needs");
        }
        for c in 0..input.cpus.len() {
            // No cpu above --high or its peaks above the limit that was not already, and no
            // cpu over a limit gets busier.
            if l1[c] > l0[c] + 1e-9 {
                prop_assert!(l1[c] <= pol.high - pol.headroom + 1e-9, "cpu {c}: {} -> {}", l0[c], l1[c]);
                prop_assert!(p1[c] <= pol.peak_limit + 1e-9, "cpu {c} peaks: {} -> {}", p0[c], p1[c]);
            }
        }
        // A host at rest (the balancer plans nothing) stays at rest after consolidation: its
        // moves create no cpu the balancer would then want to unload.
        let cpol = CpuPolicy { max_repins: max_repins.max(1), ..CpuPolicy::default() };
        if cpu::plan(&input, &cpol).is_empty() && input.vcpus.iter().all(|v| v.cpu.is_some()) {
            let l_ok = l0.iter().all(|&l| l <= cpol.high + 1e-9);
            let p_ok = p0.iter().all(|&x| x <= cpol.peak_limit + 1e-9);
            if l_ok && p_ok {
                prop_assert!(cpu::plan(&after, &cpol).is_empty(), "the balancer would undo {p:#?}");
            }
        }
        // With repins to spare, a core is either emptied or left alone.
        if max_repins >= input.vcpus.len() {
            let count = |inp: &CpuInput, k: usize| inp.vcpus.iter().filter(|v| v.cpu.is_some_and(|c| cores[c] == k)).count();
            for k in 0..input.cpus.len() {
                let (b, a) = (count(&input, k), count(&after, k));
                prop_assert!(a >= b || a == 0, "core {k} partly drained: {b} -> {a}");
            }
        }
    }

    #[test]
    fn a_steady_load_converges_and_then_plans_nothing((input, cores) in arb_case(), max_repins in 1usize..5) {
        // Plans applied one after the other, nothing else changing: each plan raises the sum
        // over cores of (vCPUs on the core)², which is bounded, so the moves stop.
        let pol = ConsolidatePolicy { max_repins, ..ConsolidatePolicy::default() };
        let potential = |inp: &CpuInput| {
            let mut count = vec![0usize; inp.cpus.len()];
            for v in &inp.vcpus {
                count[cores[v.cpu.unwrap()]] += 1;
            }
            count.iter().map(|c| c * c).sum::<usize>()
        };
        let mut cur = input;
        loop {
            let p = plan(&cur, &cores, &pol);
            if p.is_empty() {
                break;
            }
            let next = apply(&cur, &p);
            prop_assert!(potential(&next) > potential(&cur), "{p:#?}");
            cur = next;
        }
    }
}
