//! The safeguard on synthetic quanta: when it judges, on which figure, what it rolls back
//! (exactly the old pins, once), and how strikes lengthen the back-off.

use super::*;
use crate::host::CpuSet;
use crate::policy::cpu::{CpuSlot, VcpuSlot};

const S: u64 = 1_000_000_000;

fn cfg() -> SafeguardConfig {
    SafeguardConfig { settle_ns: 8 * S, margin: 0.1, high: 0.75, peak_limit: 1.2, cooldown_ns: 30 * S }
}

/// Two cpus; vCPUs (domain, demand, cpu id).
fn input(vcpus: &[(&str, f64, u32)]) -> CpuInput {
    CpuInput {
        cpus: (0..2)
            .map(|id| CpuSlot { id, node: 0, fixed: 0.0, settling: false, sibling: None, group: None, capacity: 1.0 })
            .collect(),
        vcpus: vcpus
            .iter()
            .map(|&(d, demand, cpu)| VcpuSlot {
                domain: d.into(),
                vcpu: 0,
                demand,
                peak: demand,
                current: CpuSet::single(cpu),
                cpu: Some(cpu as usize),
                movable: true,
            })
            .collect(),
    }
}

fn moved(d: &str, before: u32, after: u32) -> Moved {
    Moved { domain: d.into(), vcpu: 0, before, after }
}

/// Feeds `input` every 2 s from `from` to `to` (seconds); returns the verdicts.
fn feed(g: &mut Safeguard, input: &CpuInput, from: u64, to: u64) -> Vec<Verdict> {
    (from..=to).step_by(2).flat_map(|t| g.observe(input, t * S, &cfg())).collect()
}

#[test]
fn a_set_that_made_things_worse_is_rolled_back_to_exactly_its_old_pins() {
    let mut g = Safeguard::default();
    // `a` moved 0 -> 1 next to `b`, `c` moved 1 -> 0. On today's demand, `a` and `b` are both
    // busy: together on cpu 1 they are 0.65 over --high and 0.2 over --peak-limit; on the old
    // pins cpu 1 would be 0.05 over --high.
    let moves = vec![moved("a", 0, 1), moved("c", 1, 0)];
    g.watch(Origin::Repack, Figure::Cost, moves.clone(), 0);
    let now = input(&[("a", 0.7, 1), ("b", 0.7, 1), ("c", 0.1, 0)]);
    let early = feed(&mut g, &now, 0, 14);
    assert!(early.is_empty(), "judged only after settling and averaging: {early:?}");
    let v = feed(&mut g, &now, 16, 16);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].roll_back, "{v:?}");
    assert_eq!(v[0].moves, moves, "the old pins, exactly");
    assert!((v[0].worse_by - 0.8).abs() < 1e-9, "{v:?}");
    assert_eq!(g.watching(), 0, "judged once");
    assert!(feed(&mut g, &now, 18, 60).is_empty(), "nothing more to say about it");
}

#[test]
fn a_set_that_paid_off_is_kept() {
    let mut g = Safeguard::default();
    g.watch(Origin::Repack, Figure::Cost, vec![moved("b", 0, 1)], 0);
    // Before: both busy on cpu 0; after: one each.
    let now = input(&[("a", 0.7, 0), ("b", 0.7, 1)]);
    let v = feed(&mut g, &now, 0, 20);
    assert_eq!(v.len(), 1);
    assert!(!v[0].roll_back && v[0].worse_by < 0.0, "{v:?}");
}

#[test]
fn worse_within_the_margin_is_kept() {
    let mut g = Safeguard::default();
    g.watch(Origin::Repack, Figure::Cost, vec![moved("a", 0, 1)], 0);
    // On cpu 1 with `b`: 0.8, 0.05 over --high; on cpu 0 it would be alone.
    let now = input(&[("a", 0.4, 1), ("b", 0.4, 1)]);
    let v = feed(&mut g, &now, 0, 20);
    assert!(!v[0].roll_back && (v[0].worse_by - 0.05).abs() < 1e-9, "{v:?}");
}

#[test]
fn a_watch_whose_vcpu_moved_again_is_dropped() {
    let mut g = Safeguard::default();
    g.watch(Origin::Balancing, Figure::BusiestLoad, vec![moved("a", 0, 1)], 0);
    let elsewhere = input(&[("a", 0.9, 0), ("b", 0.9, 1)]);
    assert!(feed(&mut g, &elsewhere, 0, 30).is_empty());
    assert_eq!(g.watching(), 0);
    // And one whose vCPU is gone.
    g.watch(Origin::Balancing, Figure::BusiestLoad, vec![moved("x", 0, 1)], 0);
    assert!(feed(&mut g, &elsewhere, 0, 30).is_empty());
    assert_eq!(g.watching(), 0);
}

#[test]
fn a_balancing_move_that_keeps_failing_backs_off_longer_each_time() {
    let mut g = Safeguard::default();
    let bad = input(&[("a", 0.5, 1), ("b", 0.5, 1)]);
    let mut backoffs = Vec::new();
    for k in 0..7u64 {
        let t0 = k * 100;
        g.watch(Origin::Balancing, Figure::BusiestLoad, vec![moved("a", 0, 1)], t0 * S);
        let v = feed(&mut g, &bad, t0, t0 + 20);
        assert_eq!(v.len(), 1);
        assert!(v[0].worse_by > 0.0);
        backoffs.push(g.backoff_ns("a", 0, &cfg()) / (30 * S));
    }
    // cooldown × (2^strikes − 1), strikes capped.
    assert_eq!(backoffs, [1, 3, 7, 15, 31, 31, 31]);
    assert_eq!(g.strikes("b", 0), 0, "only the moved vCPU");
    // A move that pays off clears its strikes.
    g.watch(Origin::Balancing, Figure::BusiestLoad, vec![moved("a", 0, 1)], 1000 * S);
    let good = input(&[("a", 0.5, 1), ("b", 0.5, 0)]);
    let _ = feed(&mut g, &good, 1000, 1020);
    assert_eq!(g.strikes("a", 0), 0);
    assert_eq!(g.backoff_ns("a", 0, &cfg()), 0);
}

#[test]
fn a_repack_earns_no_strikes() {
    let mut g = Safeguard::default();
    g.watch(Origin::Repack, Figure::Cost, vec![moved("a", 0, 1)], 0);
    let bad = input(&[("a", 0.5, 1), ("b", 0.5, 1)]);
    let _ = feed(&mut g, &bad, 0, 20);
    assert_eq!(g.strikes("a", 0), 0);
}

#[test]
fn each_set_is_judged_on_the_figure_it_promised() {
    // `a` (demand 0.5, peak 1.0) moved from cpu 0 to cpu 1, next to `b` (0.1, peaks 0.9).
    // The busiest cpu it touched went from 0.8 to 0.6: a balancing move paid off. The cost
    // went up (cpu 1's peaks now 0.7 over --peak-limit): as a re-pack it would not have.
    let mut now = input(&[("a", 0.5, 1), ("b", 0.1, 1), ("c", 0.3, 0)]);
    now.vcpus[0].peak = 1.0;
    now.vcpus[1].peak = 0.9;
    let verdict = |figure: Figure| {
        let mut g = Safeguard::default();
        g.watch(Origin::Balancing, figure, vec![moved("a", 0, 1)], 0);
        feed(&mut g, &now, 0, 20).pop().unwrap()
    };
    let v = verdict(Figure::BusiestLoad);
    assert!(!v.roll_back && (v.worse_by + 0.2).abs() < 1e-9, "{v:?}");
    let v = verdict(Figure::Cost);
    assert!(v.roll_back && (v.worse_by - 0.55).abs() < 1e-9, "{v:?}");
    let v = verdict(Figure::PeakExcess);
    assert!(v.roll_back && (v.worse_by - 0.6).abs() < 1e-9, "{v:?}");
}
