//! MemTracker over hand-built snapshots: grants on credit, rediscovery, bounded history.

use super::*;
use crate::host::{BalloonStats, DomainDesc, DomainRef, OptOut, Topology};
use crate::model::{DomainView, HostView};

const S: u64 = 1_000_000_000;
const MIB: u64 = 1024;

/// (name, runtime id, balloon current MiB, maximum MiB, usable MiB)
type G<'a> = (&'a str, u32, u64, u64, u64);

fn snap(t_s: u64, avail_mib: u64, guests: &[G]) -> Snapshot {
    let domains = guests
        .iter()
        .map(|&(name, id, cur, max, usable)| {
            let dom = DomainRef { name: name.into(), uuid: format!("u-{name}"), id };
            let b = BalloonStats {
                current_kib: cur * MIB,
                maximum_kib: max * MIB,
                unused_kib: Some(usable * MIB),
                available_kib: Some(cur * MIB),
                usable_kib: Some(usable * MIB),
                swap_in_kib: Some(0),
                major_fault: Some(0),
                last_update_s: Some(1000 + t_s),
                carried_for_s: None,
            };
            DomainView {
                desc: DomainDesc {
                    dom: dom.clone(),
                    vcpu_tids: vec![],
                    vcpu_count: 0,
                    pid: Some(1),
                    max_kib: max * MIB,
                    has_balloon: true,
                    stats_period_s: 1,
                    opt_out: OptOut::default(),
                    started_epoch_s: Some(0),
                    default_affinity: None,
                    threads: vec![],
                },
                dom,
                cpu_excluded: None,
                mem_excluded: None,
                vcpus: vec![],
                balloon: Some((b, t_s * S)),
            }
        })
        .collect();
    Snapshot {
        t_ns: t_s * S,
        epoch_s: 1000 + t_s,
        quantum: t_s,
        host: HostView {
            cpus: vec![0],
            topology: Topology::flat(1),
            cpu_busy: vec![0.0],
            mem_total_kib: 1 << 30,
            mem_available_kib: avail_mib * MIB,
            mem_pressure_some_avg10: Some(0.0),
        },
        domains,
    }
}

fn timing(credit_timeout_s: u64) -> MemTiming {
    MemTiming {
        min_age_ns: 0,
        cooldown_ns: 0,
        target_timeout_ns: 1000 * S,
        backoff_ns: 300 * S,
        reclaim_window_ns: 600 * S,
        credit_timeout_ns: credit_timeout_s * S,
    }
}

#[test]
fn a_grant_stays_on_credit_until_the_host_pays_for_it() {
    let t = timing(600);
    let mut m = MemTracker::new();
    let (_, h) = m.input(&snap(1, 2000, &[("a", 1, 256, 768, 20), ("b", 1, 256, 768, 20)]), &t);
    assert_eq!(h.outstanding_kib, 0);
    m.set_target("a", 356 * MIB, S);
    m.set_target("b", 356 * MIB, S);
    // Balloons grew; nothing touched: MemAvailable did not move.
    let (_, h) = m.input(&snap(6, 2000, &[("a", 1, 356, 768, 120), ("b", 1, 356, 768, 120)]), &t);
    assert_eq!(h.outstanding_kib, 200 * MIB);
    // 150 MiB left MemAvailable: paid for the oldest grant first, then part of the next.
    let (_, h) = m.input(&snap(11, 1850, &[("a", 1, 356, 768, 20), ("b", 1, 356, 768, 70)]), &t);
    assert_eq!(h.outstanding_kib, 50 * MIB);
    // Memory coming free does not bring a credit back.
    let (_, h) = m.input(&snap(16, 1900, &[("a", 1, 356, 768, 20), ("b", 1, 356, 768, 70)]), &t);
    assert_eq!(h.outstanding_kib, 50 * MIB);
    let (_, h) = m.input(&snap(21, 1850, &[("a", 1, 356, 768, 20), ("b", 1, 356, 768, 20)]), &t);
    assert_eq!(h.outstanding_kib, 0);
}

#[test]
fn a_grant_taken_back_or_of_a_gone_guest_is_off_credit() {
    let t = timing(600);
    let mut m = MemTracker::new();
    // (a's size, a's usable, b's runtime id): an untouched grant shows as new usable memory.
    let g = |a: u64, au: u64, b_id: u32| [("a", 1, a, 768, au), ("b", b_id, 256, 768, 20)];
    m.input(&snap(1, 2000, &g(256, 20, 1)), &t);
    m.set_target("a", 356 * MIB, S);
    m.set_target("b", 306 * MIB, S);
    let (_, h) = m.input(&snap(6, 2000, &[("a", 1, 356, 768, 120), ("b", 1, 306, 768, 70)]), &t);
    assert_eq!(h.outstanding_kib, 150 * MIB);
    // a is given 60 MiB back; b restarted (new runtime id).
    m.set_target("a", 296 * MIB, 6 * S);
    let (_, h) = m.input(&snap(11, 2000, &g(296, 60, 2)), &t);
    assert_eq!(h.outstanding_kib, 40 * MIB);
    // A credit timeout of 0 is the old behaviour: never on credit.
    let t0 = timing(0);
    let mut m = MemTracker::new();
    m.input(&snap(1, 2000, &g(256, 20, 1)), &t0);
    m.set_target("a", 356 * MIB, S);
    assert_eq!(m.input(&snap(6, 2000, &g(356, 120, 1)), &t0).1.outstanding_kib, 0);
}

#[test]
fn a_credit_ends_only_on_the_hosts_word_or_at_the_timeout() {
    let t = timing(60);
    let mut m = MemTracker::new();
    let g = |a: u64, au: u64| [("a", 1, a, 768, au)];
    m.input(&snap(1, 2000, &g(256, 20)), &t);
    m.set_target("a", 356 * MIB, S);
    // The guest says it used it all (usable back at 20), the host saw nothing leave: a liar, or
    // a reclaim elsewhere hid it. Only the host's figure counts.
    let (_, h) = m.input(&snap(6, 2000, &g(356, 20)), &t);
    assert_eq!(h.outstanding_kib, 100 * MIB);
    let (_, h) = m.input(&snap(60, 2000, &g(356, 20)), &t);
    assert_eq!(h.outstanding_kib, 100 * MIB);
    // The timeout: MemAvailable is trusted again.
    let (_, h) = m.input(&snap(61, 2000, &g(356, 20)), &t);
    assert_eq!(h.outstanding_kib, 0);
}

#[test]
fn the_host_pays_first_for_the_guest_whose_use_grew() {
    let t = timing(600);
    let mut m = MemTracker::new();
    m.input(&snap(1, 2000, &[("a", 1, 256, 768, 20), ("b", 1, 256, 768, 20)]), &t);
    m.set_target("a", 356 * MIB, S);
    m.set_target("b", 356 * MIB, S);
    m.input(&snap(6, 2000, &[("a", 1, 356, 768, 120), ("b", 1, 356, 768, 120)]), &t);
    // b uses its grant and the host pays 100 MiB; a does not touch its own.
    let (_, h) = m.input(&snap(11, 1900, &[("a", 1, 356, 768, 120), ("b", 1, 356, 768, 20)]), &t);
    assert_eq!(h.outstanding_kib, 100 * MIB);
    // So a's credit is the one left: taking b's grant back ends nothing...
    m.set_target("b", 256 * MIB, 11 * S);
    let (_, h) = m.input(&snap(16, 2000, &[("a", 1, 356, 768, 120), ("b", 1, 256, 768, 20)]), &t);
    assert_eq!(h.outstanding_kib, 100 * MIB);
    // ...taking a's back does.
    m.set_target("a", 256 * MIB, 16 * S);
    let (_, h) = m.input(&snap(21, 2000, &[("a", 1, 256, 768, 20), ("b", 1, 256, 768, 20)]), &t);
    assert_eq!(h.outstanding_kib, 0);
}

#[test]
fn memory_taken_by_others_pays_for_no_grant() {
    let t = timing(600);
    let mut m = MemTracker::new();
    m.input(&snap(1, 2000, &[("a", 1, 256, 768, 20)]), &t);
    m.set_target("a", 356 * MIB, S);
    m.input(&snap(6, 2000, &[("a", 1, 356, 768, 120)]), &t);
    // A build takes 500 MiB; the guest used nothing of its grant (usable still +100).
    let (_, h) = m.input(&snap(11, 1500, &[("a", 1, 356, 768, 120)]), &t);
    assert_eq!(h.outstanding_kib, 100 * MIB);
    // The build ends: 500 MiB come back, the grant is still owed.
    let (_, h) = m.input(&snap(16, 2000, &[("a", 1, 356, 768, 120)]), &t);
    assert_eq!(h.outstanding_kib, 100 * MIB);
}

#[test]
fn a_balloon_still_moving_counts_at_its_target() {
    let t = timing(600);
    let mut m = MemTracker::new();
    m.input(&snap(1, 2000, &[("a", 1, 256, 768, 20)]), &t);
    m.set_target("a", 456 * MIB, S);
    // Half way there: the whole grant is still on its way.
    let (_, h) = m.input(&snap(6, 2000, &[("a", 1, 356, 768, 120)]), &t);
    assert_eq!(h.outstanding_kib, 200 * MIB);
}

#[test]
fn above_its_maximum_asks_for_rediscovery_once_per_backoff() {
    let t = timing(600);
    let mut m = MemTracker::new();
    let (gs, _) = m.input(&snap(1, 2000, &[("a", 1, 1024, 1024, 500), ("plugged", 1, 4096, 1024, 3000)]), &t);
    assert_eq!(m.needs_rediscovery(), vec!["plugged".to_string()]);
    assert!(gs[1].current_kib > gs[1].max_kib, "the planner sees it and holds it");
    let p = crate::policy::mem::plan(&gs[1..], &HostMem::default(), &crate::policy::mem::MemPolicy::default());
    assert!(p.actions.is_empty() && p.verdicts[0].state == crate::policy::mem::State::Hold, "{p:?}");
    // Not asked again at every interval...
    m.input(&snap(6, 2000, &[("plugged", 1, 4096, 1024, 3000)]), &t);
    assert!(m.needs_rediscovery().is_empty());
    // ...but again after the back-off, while it stays above.
    m.input(&snap(302, 2000, &[("plugged", 1, 4096, 1024, 3000)]), &t);
    assert_eq!(m.needs_rediscovery(), vec!["plugged".to_string()]);
    // Re-read (maximum now 4 GiB): nothing to ask.
    m.input(&snap(307, 2000, &[("plugged", 1, 4096, 4096, 3000)]), &t);
    assert!(m.needs_rediscovery().is_empty());
}

#[test]
fn history_stays_bounded_whatever_the_window_and_interval() {
    // --reclaim-window 24h at --mem-interval 100ms: 864,000 reports per window.
    let t = MemTiming { reclaim_window_ns: 86_400 * S, ..timing(600) };
    let mut m = MemTracker::new();
    let n: u64 = 200_000;
    let mut last = None;
    for i in 1..=n {
        let t_ns = i * S / 10;
        let mut s = snap(0, 2000, &[("a", 1, 1024, 1024, 900)]);
        // Peak use (1024 − 100 = 924 MiB) once, early; otherwise 124 MiB.
        if i == 10 {
            s.domains[0].balloon.as_mut().unwrap().0.usable_kib = Some(100 * MIB);
        }
        s.t_ns = t_ns;
        s.domains[0].balloon.as_mut().unwrap().1 = t_ns;
        let (gs, _) = m.input(&s, &t);
        last = gs[0].usable_low_kib;
    }
    assert!(m.history_entries("a").unwrap() <= crate::window::BUCKETS, "{:?}", m.history_entries("a"));
    // The early peak is still remembered (within the window): usable at peak use = 100 MiB.
    assert_eq!(last, Some(100 * MIB));
}

#[test]
fn a_reading_carried_forward_is_judged_stale_as_of_when_it_was_read() {
    let t = timing(600);
    let mut m = MemTracker::new();
    let hold = |m: &mut MemTracker, last_update_age: u64, read_age: u64| {
        let mut s = snap(100, 2000, &[("quiet", 1, 1024, 1024, 900)]);
        let b = &mut s.domains[0].balloon.as_mut().unwrap().0;
        b.last_update_s = Some(s.epoch_s - last_update_age);
        b.carried_for_s = (read_age > 0).then_some(read_age);
        m.input(&s, &t).0[0].hold.clone()
    };
    // Read 30 s ago, when the guest's report was 1 s old: good for this interval.
    assert_eq!(hold(&mut m, 31, 30), None);
    // The same report read now would be stale (the guest stopped reporting 31 s ago).
    assert!(matches!(hold(&mut m, 31, 0), Some(Hold::NoReport(ref why)) if why.contains("stale")));
    // Stale already when it was read: stale still.
    assert!(matches!(hold(&mut m, 60, 30), Some(Hold::NoReport(ref why)) if why.contains("stale")));
}

#[test]
fn counts_carried_forward_do_not_grow_and_are_counted_whole_when_read_again() {
    let t = timing(600);
    let mut m = MemTracker::new();
    let at = |t_s: u64, swap: u64, faults: u64| {
        let mut s = snap(t_s, 2000, &[("quiet", 1, 1024, 1024, 300)]);
        let b = &mut s.domains[0].balloon.as_mut().unwrap().0;
        b.swap_in_kib = Some(swap);
        b.major_fault = Some(faults);
        s
    };
    m.input(&at(100, 0, 0), &t);
    // The same counters carried forward: no growth.
    let mut carried = at(105, 0, 0);
    carried.domains[0].balloon.as_mut().unwrap().0.carried_for_s = Some(5);
    assert_eq!(m.input(&carried, &t).0[0].major_fault_delta, 0);
    // Read again: all the growth since the last reading counts (it came when the guest ran).
    let g = &m.input(&at(130, 4, 120), &t).0[0];
    assert_eq!((g.major_fault_delta, g.swap_in_delta_kib), (120, 4));
}

#[test]
fn a_balloon_moved_without_the_agent_is_not_reclaimed_from_for_a_while() {
    let t = timing(600);
    let pol = crate::policy::mem::MemPolicy::default();
    let mut m = MemTracker::new();
    m.input(&snap(1, 4000, &[("a", 1, 1024, 4096, 300)]), &t);
    m.set_target("a", 1024 * MIB, S);
    m.input(&snap(6, 4000, &[("a", 1, 1024, 4096, 300)]), &t); // reached
    // The operator grows it (virsh setmem 3G): lots free now, no swapping.
    let (gs, h) = m.input(&snap(11, 4000, &[("a", 1, 3072, 4096, 2300)]), &t);
    assert!(gs[0].moved_by_others && gs[0].cooling);
    let p = crate::policy::mem::plan(&gs, &h, &pol);
    assert!(p.actions.is_empty(), "{p:?}");
    assert_eq!(p.verdicts[0].state, crate::policy::mem::State::Hold, "not starving: {p:?}");
    // Later in the hold: still not reclaimed from (the 15 s --mem-cooldown is long over).
    let (gs, h) = m.input(&snap(300, 4000, &[("a", 1, 3072, 4096, 2300)]), &t);
    assert!(!gs[0].moved_by_others && gs[0].cooling);
    assert!(crate::policy::mem::plan(&gs, &h, &pol).actions.is_empty());
    // After it: an idle guest is reclaimed from as any other.
    let (gs, h) = m.input(&snap(11 + MOVED_HOLD_NS / S, 4000, &[("a", 1, 3072, 4096, 2300)]), &t);
    assert!(!gs[0].cooling);
    let p = crate::policy::mem::plan(&gs, &h, &pol);
    assert!(matches!(p.actions[..], [crate::policy::Action::Balloon { to_kib, .. }] if to_kib < 3072 * MIB), "{p:?}");
}
