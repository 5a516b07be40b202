use super::*;
use proptest::prelude::*;

fn guest(name: &str, current_mib: u64, max_mib: u64, usable_mib: u64) -> GuestMem {
    GuestMem {
        name: name.into(),
        current_kib: current_mib * MIB,
        max_kib: max_mib * MIB,
        usable_kib: Some(usable_mib * MIB),
        usable_low_kib: None,
        swap_in_delta_kib: 0,
        major_fault_delta: 0,
        moved_by_others: false,
        cooling: false,
        hold: None,
    }
}

fn host(avail_mib: u64) -> HostMem {
    HostMem { available_kib: avail_mib * MIB, psi_some_avg10: Some(0.0), outstanding_kib: 0 }
}

fn targets(p: &MemPlan) -> Vec<(String, u64)> {
    p.actions
        .iter()
        .map(|a| match a {
            Action::Balloon { domain, to_kib, .. } => (domain.clone(), *to_kib / MIB),
            _ => panic!("memory planner pins nothing"),
        })
        .collect()
}

#[test]
fn idle_guest_gives_back_toward_the_band_middle() {
    let p = plan(&[guest("idle", 1024, 1024, 900)], &host(8000), &MemPolicy::default());
    let t = targets(&p);
    assert_eq!(t.len(), 1);
    // At most one step (256 MiB) per change.
    assert_eq!(t[0].1, 1024 - 256);
}

#[test]
fn never_below_the_floor() {
    let pol = MemPolicy { floor_kib: 900 * MIB, ..MemPolicy::default() };
    let p = plan(&[guest("idle", 1024, 1024, 1000)], &host(8000), &pol);
    assert_eq!(targets(&p), vec![("idle".into(), 900)]);
    let p = plan(&[guest("idle", 900, 1024, 880)], &host(8000), &pol);
    assert!(p.actions.is_empty(), "already at the floor: {p:?}");
}

#[test]
fn starving_guest_grows_but_never_above_max() {
    let p = plan(&[guest("hungry", 500, 520, 5)], &host(8000), &MemPolicy::default());
    assert_eq!(targets(&p), vec![("hungry".into(), 520)]);
}

#[test]
fn no_grant_that_breaks_the_host_reserve() {
    let pol = MemPolicy { host_reserve_kib: 1000 * MIB, ..MemPolicy::default() };
    // 100 MiB above the reserve: the grant is capped at 100 MiB.
    let p = plan(&[guest("hungry", 512, 2048, 5)], &host(1100), &pol);
    assert_eq!(targets(&p), vec![("hungry".into(), 612)]);
    // Below the reserve: nothing granted, and diagnose can say why.
    let p = plan(&[guest("hungry", 512, 2048, 5)], &host(900), &pol);
    assert!(p.actions.is_empty());
    assert!(p.verdicts[0].why.contains("host reserve"), "{:?}", p.verdicts);
}

#[test]
fn a_guest_refused_for_the_hosts_sake_carries_what_it_wanted() {
    let pol = MemPolicy { host_reserve_kib: 1000 * MIB, ..MemPolicy::default() };
    let hungry = guest("hungry", 512, 2048, 5);
    // Below the reserve: refused, and its whole want is unmet.
    let p = plan(std::slice::from_ref(&hungry), &host(900), &pol);
    assert_eq!(p.verdicts[0].not_granted, Some(NotGranted::HostReserve));
    assert!(p.verdicts[0].unmet_kib >= pol.min_change_kib, "{:?}", p.verdicts);
    // Granted: nothing unmet. At its own maximum: not the host's doing, nothing unmet either.
    let p = plan(std::slice::from_ref(&hungry), &host(8000), &pol);
    assert_eq!((p.verdicts[0].state, p.verdicts[0].unmet_kib), (State::Grant, 0));
    let p = plan(&[guest("full", 512, 512, 5)], &host(8000), &pol);
    assert_eq!((p.verdicts[0].not_granted, p.verdicts[0].unmet_kib), (Some(NotGranted::AtMaximum), 0));
    // Refused for the reserve, but no more than its maximum allows is unmet.
    let p = plan(&[guest("nearly", 512, 520, 5)], &host(900), &pol);
    assert_eq!(p.verdicts[0].not_granted, Some(NotGranted::HostReserve));
    assert_eq!(p.verdicts[0].unmet_kib, 8 * MIB);
}

#[test]
fn host_below_reserve_reclaims_from_the_freest_first() {
    let pol = MemPolicy { host_reserve_kib: 1000 * MIB, ..MemPolicy::default() };
    // 25% usable: inside the dead band normally, but the host is short.
    let guests = [guest("a", 2048, 2048, 512), guest("b", 2048, 2048, 1500), guest("s", 1024, 2048, 10)];
    let p = plan(&guests, &host(500), &pol);
    let t = targets(&p);
    assert_eq!(t.iter().map(|x| x.0.as_str()).collect::<Vec<_>>(), vec!["b", "a"], "{t:?}");
    let normal = plan(&guests[..2], &host(8000), &pol);
    assert_eq!(targets(&normal).len(), 1, "only b gives when the host is fine");
}

#[test]
fn dead_band_stops_oscillation_on_a_steady_guest() {
    // A guest that keeps using 600 MiB: iterate plan → apply → report.
    let pol = MemPolicy::default();
    let used = 600;
    let mut current = 2048u64;
    let mut changes = 0;
    for _ in 0..30 {
        let p = plan(&[guest("g", current, 2048, current.saturating_sub(used))], &host(8000), &pol);
        if let Some((_, to)) = targets(&p).first() {
            current = *to;
            changes += 1;
        }
    }
    let last = plan(&[guest("g", current, 2048, current - used)], &host(8000), &pol);
    assert!(last.actions.is_empty(), "settled");
    assert!(changes <= 6, "{changes} changes");
    let usable_frac = (current - used) as f64 / current as f64;
    assert!((pol.starve_below..=pol.reclaim_above).contains(&usable_frac), "{usable_frac}");
}

#[test]
fn swapping_counts_as_starving_even_with_free_memory() {
    let mut g = guest("swapper", 1024, 2048, 400);
    g.swap_in_delta_kib = 4096;
    let p = plan(&[g], &host(8000), &MemPolicy::default());
    assert_eq!(targets(&p), vec![("swapper".into(), 1024 + 256)], "at least one reclaim step");
}

#[test]
fn lying_guest_is_capped_and_neighbours_keep_their_memory() {
    // A liar reports no usable memory; a neighbour sits in the dead band.
    let guests = [guest("liar", 1024, 1536, 0), guest("neighbour", 1024, 2048, 200)];
    let pol = MemPolicy::default();
    let mut liar_current = 1024;
    for _ in 0..20 {
        let mut gs = guests.clone();
        gs[0].current_kib = liar_current * MIB;
        let p = plan(&gs, &host(8000), &pol);
        for (d, to) in targets(&p) {
            assert_ne!(d, "neighbour", "the neighbour is never squeezed for the liar");
            liar_current = to;
        }
    }
    assert_eq!(liar_current, 1536, "capped at its configured maximum");
}

#[test]
fn inconsistent_reports_are_no_report() {
    let p = plan(&[guest("odd", 512, 1024, 900)], &host(8000), &MemPolicy::default());
    assert!(p.actions.is_empty());
    assert!(p.verdicts[0].why.contains("inconsistent"));
}

#[test]
fn a_balloon_moved_without_the_agent_is_not_moved_back() {
    let mut g = guest("oom", 1024, 2048, 900);
    g.moved_by_others = true;
    let p = plan(&[g], &host(8000), &MemPolicy::default());
    assert!(p.actions.is_empty());
}

#[test]
fn held_guests_are_left_alone_with_the_reason() {
    let mut g = guest("young", 1024, 2048, 900);
    g.hold = Some(Hold::Young);
    let p = plan(&[g], &host(8000), &MemPolicy::default());
    assert!(p.actions.is_empty());
    assert!(p.verdicts[0].why.contains("min-age"));
}

proptest! {
    #[test]
    fn targets_within_floor_max_step_and_host_budget(
        gs in proptest::collection::vec(
            (64u64..8192, 0u64..8192, 0u64..9000, any::<bool>(), 0u64..4096, any::<bool>(), any::<bool>(), 0u8..4),
            1..20,
        ),
        avail in 0u64..16384, reserve in 0u64..4096, outstanding in 0u64..4096,
    ) {
        let pol = MemPolicy { host_reserve_kib: reserve * MIB, ..MemPolicy::default() };
        let guests: Vec<GuestMem> = gs.iter().enumerate().map(|(i, &(cur, max, usable, swap, low, cooling, oom, kind))| {
            // Any size against any maximum: above it (hot-plug, bad report) included.
            let mut g = guest(&format!("g{i}"), cur, max, usable);
            if swap { g.swap_in_delta_kib = 1; }
            g.usable_low_kib = (kind == 1).then_some(low * MIB);
            g.cooling = cooling;
            g.moved_by_others = oom && kind == 2;
            if kind == 3 { g.usable_kib = None; }
            g
        }).collect();
        let h = HostMem { outstanding_kib: outstanding * MIB, ..host(avail) };
        let p = plan(&guests, &h, &pol);
        let mut granted = 0u64;
        for a in &p.actions {
            let Action::Balloon { domain, from_kib, to_kib, .. } = a else { panic!() };
            let g = guests.iter().find(|g| &g.name == domain).unwrap();
            prop_assert_eq!(*from_kib, g.current_kib);
            prop_assert!(g.current_kib <= g.max_kib, "a guest above its maximum is never changed");
            prop_assert!(*to_kib <= g.max_kib, "above max");
            if to_kib < from_kib {
                prop_assert!(*to_kib >= pol.floor_kib, "below floor");
                prop_assert!(from_kib - to_kib <= pol.step_kib, "reclaim above the step");
            } else {
                prop_assert!(to_kib - from_kib <= pol.grant_step_kib, "grant above its step");
                granted += to_kib - from_kib;
            }
        }
        // All grants together stay within what is above the reserve, less what is on credit.
        let budget = (avail * MIB).saturating_sub(pol.host_reserve_kib).saturating_sub(h.outstanding_kib);
        prop_assert!(granted <= budget, "granted {} of {}", granted, budget);
        prop_assert_eq!(p.verdicts.len(), guests.len());
    }
}

#[test]
fn grants_on_credit_count_against_the_budget() {
    // 200 MiB above the reserve, two starving guests that will not touch what they get.
    let pol = MemPolicy { host_reserve_kib: 1000 * MIB, starve_below: 0.8, reclaim_above: 0.9, ..MemPolicy::default() };
    let mut gs = [guest("a", 256, 768, 20), guest("b", 256, 768, 20)];
    let p = plan(&gs, &host(1200), &pol);
    let first: u64 = targets(&p).iter().map(|(_, to)| to - 256).sum();
    assert_eq!(first, 200, "{:?}", targets(&p));
    // Next interval: the balloons grew, the host's MemAvailable did not move (nothing touched).
    for (g, (_, to)) in gs.iter_mut().zip(targets(&p)) {
        g.usable_kib = Some((to - 256 + 20) * MIB);
        g.current_kib = to * MIB;
    }
    let on_credit = HostMem { outstanding_kib: first * MIB, ..host(1200) };
    let p = plan(&gs, &on_credit, &pol);
    assert!(p.actions.is_empty(), "granted again on credit: {:?}", targets(&p));
    assert!(p.verdicts.iter().all(|v| v.why.contains("on credit")), "{:?}", p.verdicts);
    // Without the credit (the old budget) the same input grants another 200 MiB.
    let p = plan(&gs, &host(1200), &pol);
    assert_eq!(targets(&p).iter().map(|(_, to)| to - 356).sum::<u64>(), 200);
    // Half paid for: 100 MiB left MemAvailable, 100 still on credit; nothing left to grant.
    let half = HostMem { outstanding_kib: 100 * MIB, ..host(1100) };
    assert!(plan(&gs, &half, &pol).actions.is_empty());
}

#[test]
fn balloon_above_its_maximum_is_held_not_reclaimed_in_one_go() {
    // 4 GiB reported against a cached maximum of 1 GiB (hot-plugged since): mostly free, but
    // "reclaim to 0.75 GiB" would take 3.25 GiB at once.
    let p = plan(&[guest("plugged", 4096, 1024, 3500)], &host(8000), &MemPolicy::default());
    assert!(p.actions.is_empty(), "{:?}", p.actions);
    assert_eq!(p.verdicts[0].state, State::Hold);
    assert!(p.verdicts[0].why.contains("above its known maximum"), "{:?}", p.verdicts);
    // Starving and above its maximum: not "granted" down to its maximum either.
    let p = plan(&[guest("plugged", 4096, 1024, 5)], &host(8000), &MemPolicy::default());
    assert!(p.actions.is_empty(), "{:?}", p.actions);
}

#[test]
fn cooling_guest_gives_nothing_back_but_may_be_fed() {
    let mut idle = guest("idle", 1024, 1024, 900);
    idle.cooling = true;
    let mut hungry = guest("hungry", 512, 1024, 5);
    hungry.cooling = true;
    let p = plan(&[idle, hungry], &host(8000), &MemPolicy::default());
    assert_eq!(targets(&p).iter().map(|t| t.0.as_str()).collect::<Vec<_>>(), vec!["hungry"]);
}

#[test]
fn reclaim_looks_at_recent_peak_use() {
    // Uses 100 MiB now but used 900 MiB a minute ago: nothing to reclaim.
    let mut g = guest("swing", 1024, 1024, 924);
    g.usable_low_kib = Some(124 * MIB);
    let p = plan(&[g], &host(8000), &MemPolicy::default());
    assert!(p.actions.is_empty(), "{p:?}");
}
