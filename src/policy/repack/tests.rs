//! The re-pack planner on plain inputs: its gain is what applying its steps gives, it is never
//! worse than the placement now, nothing applies below the threshold, and its steps keep each
//! cpu within its bound.

use super::*;
use crate::policy::cpu::VcpuSlot;
use crate::policy::cpu::fixtures::{self, cpus};
use proptest::prelude::*;

fn vcpu(dom: &str, n: u32, demand: f64, cpu: usize) -> VcpuSlot {
    fixtures::vcpu(dom, n, demand, Some(cpu))
}

fn pol() -> RepackPolicy {
    RepackPolicy::new(&CpuPolicy::default(), 0.2)
}

/// The placement after applying `steps` to `input` (pins only), checking each pin's `from`.
fn apply(input: &CpuInput, steps: &[Vec<Action>]) -> Vec<Option<usize>> {
    apply_from(input, current(input), steps)
}

/// The same from the placement `at`.
fn apply_from(input: &CpuInput, mut at: Vec<Option<usize>>, steps: &[Vec<Action>]) -> Vec<Option<usize>> {
    for a in steps.iter().flatten() {
        let Action::Pin { domain, vcpu, from, to, kind, .. } = a else { panic!("only pins: {a}") };
        assert_eq!(*kind, PinKind::Repack);
        let i = input.vcpus.iter().position(|v| *v.domain == **domain && v.vcpu == *vcpu).unwrap();
        assert_eq!(from.as_single(), at[i].map(|c| input.cpus[c].id), "each vCPU moves once, from where it is");
        at[i] = Some(input.cpus.iter().position(|c| c.id == to.as_single().unwrap()).unwrap());
    }
    at
}

/// A bad placement: cpu 0 holds a busy vCPU and two middling ones (1.2 cores), cpu 1 a busy
/// one, cpu 2 a light one. Every cpu can stay under --high: the middling ones go to cpu 2.
fn bad() -> CpuInput {
    let vcpus = vec![
        vcpu("a", 0, 0.6, 0),
        vcpu("b", 0, 0.3, 0),
        vcpu("c", 0, 0.3, 0),
        vcpu("d", 0, 0.6, 1),
        vcpu("e", 0, 0.1, 2),
    ];
    CpuInput { cpus: cpus(3), vcpus }
}

#[test]
fn a_bad_placement_is_repacked_and_the_gain_is_what_the_cost_says() {
    let input = bad();
    let p = plan(&input, &pol());
    let now = current(&input);
    assert!((p.cost_before - cost(&input, &now, 0.75, 1.2)).abs() < 1e-9);
    assert!(p.cost_before > 0.0 && p.worth_it, "{p:#?}");
    let after = apply(&input, &p.steps);
    let c = cost(&input, &after, 0.75, 1.2);
    assert!((c - p.cost_after).abs() < 1e-9, "{c} vs {p:#?}");
    assert!((p.gain - (p.cost_before - p.cost_after)).abs() < 1e-12);
    let (load, _) = loads(&input, &after);
    assert!(load.iter().all(|&l| l <= 0.75 + 1e-9), "every cpu under --high after: {load:?}");
    // Fewest moves: the two heavy vCPUs stay where they are.
    assert_eq!(after[0], now[0]);
    assert_eq!(after[3], now[3]);
}

#[test]
fn below_min_gain_applies_nothing() {
    let input = bad();
    let gain = plan(&input, &pol()).gain;
    let high_bar = RepackPolicy { min_gain: gain + 0.01, ..pol() };
    let p = plan(&input, &high_bar);
    assert!(!p.worth_it, "{p:#?}");
    assert!((p.gain - gain).abs() < 1e-12, "the gain is still reported");
    // A balanced host has nothing to gain at all.
    let calm = CpuInput { cpus: cpus(2), vcpus: vec![vcpu("a", 0, 0.5, 0), vcpu("b", 0, 0.5, 1)] };
    let p = plan(&calm, &RepackPolicy { min_gain: 0.0, ..pol() });
    assert_eq!(p.gain, 0.0);
    assert!(!p.worth_it && p.steps.is_empty(), "{p:#?}");
}

#[test]
fn steps_respect_max_repins_and_fill_emptier_cpus_first() {
    // Eight busy vCPUs piled on cpu 0 of 8 cpus; 2 pins per step.
    let input = CpuInput { cpus: cpus(8), vcpus: (0..8).map(|i| vcpu("a", i, 0.9, 0)).collect() };
    let p = plan(&input, &RepackPolicy { max_repins: 2, ..pol() });
    assert!(p.worth_it);
    assert_eq!(p.moves(), 7, "one stays");
    assert!(p.steps.iter().all(|s| !s.is_empty() && s.len() <= 2), "{:?}", p.steps);
    assert_eq!(p.steps.len(), 4);
    let after = apply(&input, &p.steps);
    let (load, _) = loads(&input, &after);
    assert!(load.iter().all(|&l| (l - 0.9).abs() < 1e-9), "one per cpu: {load:?}");
}

#[test]
fn a_cycle_moves_together_within_one_step() {
    // Three cpus at their limit whose vCPUs must rotate: a cycle no single move starts.
    let mut c = cpus(3);
    for s in &mut c {
        s.fixed = 0.0;
    }
    let input = CpuInput { cpus: c, vcpus: vec![vcpu("a", 0, 0.4, 0), vcpu("b", 0, 0.4, 1), vcpu("c", 0, 0.4, 2)] };
    let to = vec![Some(1), Some(2), Some(0)];
    let p = RepackPolicy { high: 0.3, peak_limit: 0.3, ..pol() };
    let steps = order_steps(&input, &current(&input), &to, &p, PinKind::Repack, &|_, _, _, _, _| String::new());
    assert_eq!(steps.len(), 1, "the whole cycle in one step: {steps:?}");
    assert_eq!(steps[0].len(), 3);
}

#[test]
fn light_vcpus_are_spread_off_a_busy_cpu() {
    // A guest's four vCPUs, each light, all on cpu 0 of 5 with one busy neighbour: the
    // re-pack moves the light ones off, one per cpu, not piled on one other cpu.
    let mut vcpus: Vec<VcpuSlot> = (0..4).map(|i| vcpu("g", i, 0.2, 0)).collect();
    vcpus.push(vcpu("busy", 0, 0.9, 0));
    let input = CpuInput { cpus: cpus(5), vcpus };
    let p = plan(&input, &pol());
    let after = apply(&input, &p.steps);
    assert_eq!(after[4], Some(0), "the busy one stays");
    let on = |c: usize| (0..4).filter(|&i| after[i] == Some(c)).count();
    assert!((0..5).all(|c| on(c) <= 1), "one sibling per cpu: {after:?}");
}

prop_compose! {
    fn arb_input()(n in 1u32..10, demands in proptest::collection::vec((0.0f64..1.0, 0.0f64..1.0, 0usize..10, any::<bool>(), 0usize..4), 0..40),
                   fixed in proptest::collection::vec(0.0f64..0.5, 10)) -> CpuInput {
        let mut c = cpus(n);
        for (i, s) in c.iter_mut().enumerate() { s.fixed = fixed[i]; s.node = u32::try_from(i % 2).unwrap(); }
        let vcpus = demands.iter().enumerate().map(|(i, &(d, extra, cpu, mv, dom))| {
            let mut v = vcpu(["a", "b", "c", "d"][dom], u32::try_from(i).unwrap(), d, cpu % n as usize);
            v.peak = (d + extra).min(1.0);
            v.movable = mv;
            v
        }).collect();
        CpuInput { cpus: c, vcpus }
    }
}

proptest! {
    #[test]
    fn invariants(input in arb_input(), max_repins in 0usize..6, min_gain in 0.0f64..0.5) {
        let pol = RepackPolicy { max_repins, min_gain, ..pol() };
        let p = plan(&input, &pol);
        let now = current(&input);
        // Never worse than the placement now, by its own measure; the gain is what applying it gives.
        prop_assert!(p.cost_after <= p.cost_before + 1e-9);
        prop_assert!(p.gain >= 0.0);
        let after = apply(&input, &p.steps);
        prop_assert!((cost(&input, &after, pol.high, pol.peak_limit) - p.cost_after).abs() < 1e-6);
        // Below the threshold nothing is worth applying.
        if p.gain < min_gain - 1e-9 { prop_assert!(!p.worth_it); }
        // Only movable vCPUs move; steps within the repin limit.
        for (i, v) in input.vcpus.iter().enumerate() {
            if !v.movable { prop_assert_eq!(after[i], now[i]); }
        }
        prop_assert!(p.steps.iter().all(|s| !s.is_empty() && s.len() <= max_repins));
        // Between steps no cpu holds more than the most of its start, its end and --high
        // (peaks: --peak-limit), unless a step had to break a cycle longer than the limit.
        let (l0, p0) = loads(&input, &now);
        let (l1, p1) = loads(&input, &after);
        let mut at = now.clone();
        for step in &p.steps {
            let cyc = step.len() == max_repins;
            at = apply_from(&input, at, std::slice::from_ref(step));
            let (l, pk) = loads(&input, &at);
            for c in 0..input.cpus.len() {
                let ok = l[c] <= l0[c].max(l1[c]).max(pol.high) + 1e-9 && pk[c] <= p0[c].max(p1[c]).max(pol.peak_limit) + 1e-9;
                prop_assert!(ok || cyc, "cpu {} over its bound after a step", c);
            }
        }
    }
}
