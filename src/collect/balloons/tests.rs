//! Which guests are read: quiet ones carried forward up to the quiet interval, busy, moving,
//! new and restarted ones read at once, on the simulated host.

use super::*;
use crate::collect::Collector;
use crate::sim::{GuestSpec, SimConfig, SimHost};

const S: u64 = 1_000_000_000;

fn host(guests: usize) -> SimHost {
    let specs: Vec<GuestSpec> =
        (0..guests).map(|i| GuestSpec { name: format!("g{i}"), vcpus: 1, max_kib: 1 << 20, liar: false }).collect();
    SimHost::new(SimConfig::new(4, 64 << 20, 1 << 20), &specs).unwrap()
}

/// Advances 5 s and reads the balloons, every guest but those in `not_steady` left steady by
/// the planner: (names read, names carried with their age in s).
fn tick(c: &mut Collector, h: &mut SimHost, quiet_s: u64, not_steady: &[String]) -> (Vec<String>, Vec<(String, u64)>) {
    h.advance(5 * S);
    let steady: HashSet<String> =
        (0..h.guests()).map(|i| format!("g{i}")).filter(|n| !not_steady.contains(n)).collect();
    let how = BalloonRead { quiet_ns: quiet_s * S, interval_ns: 5 * S, may_carry: &steady };
    let raw = c.sample(h, Some(how)).unwrap();
    let b = raw.balloons.unwrap();
    let read: Vec<String> = b.iter().filter(|(_, s)| s.carried_for_s.is_none()).map(|(n, _)| n.clone()).collect();
    let carried: Vec<(String, u64)> = b.iter().filter_map(|(n, s)| s.carried_for_s.map(|a| (n.clone(), a))).collect();
    assert_eq!(raw.balloon_counts.read, read.len() as u64);
    assert_eq!(raw.balloon_counts.carried, carried.len() as u64);
    assert_eq!(read.len() + carried.len(), h.guests(), "every guest has a reading");
    (read, carried)
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_string()).collect()
}

#[test]
fn a_quiet_guest_is_carried_forward_up_to_the_quiet_interval_then_read_again() {
    let mut h = host(3);
    let mut c = Collector::new();
    // First reading: everyone (one bulk call).
    assert_eq!(tick(&mut c, &mut h, 20, &[]).0, names(&["g0", "g1", "g2"]));
    assert_eq!(h.take_actions().balloon_reads, 3);
    // Nothing ran: carried forward, aging, without a call.
    for age in [5, 10, 15] {
        let (read, carried) = tick(&mut c, &mut h, 20, &[]);
        assert!(read.is_empty(), "{read:?}");
        assert!(carried.iter().all(|(_, a)| *a == age), "{carried:?}");
    }
    assert_eq!(h.take_actions().balloon_reads, 0);
    // 20 s after the reading: read again.
    assert_eq!(tick(&mut c, &mut h, 20, &[]).0, names(&["g0", "g1", "g2"]));
    assert_eq!(h.take_actions().balloon_reads, 3);
}

#[test]
fn a_guest_that_ran_is_read_alone_and_the_others_are_carried() {
    let mut h = host(3);
    let mut c = Collector::new();
    tick(&mut c, &mut h, 60, &[]);
    h.take_actions();
    // g1 runs at 2% of a cpu: above the quiet share.
    h.set_demand(1, 0, 2.0 * QUIET_SHARE);
    let (read, carried) = tick(&mut c, &mut h, 60, &[]);
    assert_eq!(read, names(&["g1"]));
    assert_eq!(carried.len(), 2);
    assert_eq!(h.take_actions().balloon_reads, 1, "only g1 was asked for");
    // At half the quiet share it is quiet again.
    h.set_demand(1, 0, QUIET_SHARE / 2.0);
    tick(&mut c, &mut h, 60, &[]);
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, Vec::<String>::new());
    // Two of three running: one bulk call reads all three.
    h.set_demand(0, 0, 0.5);
    h.set_demand(2, 0, 0.5);
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, names(&["g0", "g1", "g2"]));
    assert_eq!(h.take_actions().balloon_reads, 3);
}

#[test]
fn moving_new_and_restarted_guests_are_read_and_zero_reads_everyone() {
    let mut h = host(3);
    let mut c = Collector::new();
    tick(&mut c, &mut h, 60, &[]);
    // The planner did not leave g2 steady (its balloon is moving, say): read it.
    assert_eq!(tick(&mut c, &mut h, 60, &names(&["g2"])).0, names(&["g2"]));
    // g0 restarted: a new runtime id, read at once.
    h.restart_guest(0);
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, names(&["g0"]));
    // --mem-quiet-interval 0: everyone, every time.
    for _ in 0..3 {
        assert_eq!(tick(&mut c, &mut h, 0, &[]).0, names(&["g0", "g1", "g2"]));
    }
    // After a reconnect nothing is carried.
    c.reset();
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, names(&["g0", "g1", "g2"]));
}

#[test]
fn a_burst_in_the_last_interval_is_not_averaged_away() {
    let mut h = host(2);
    let mut c = Collector::new();
    tick(&mut c, &mut h, 60, &[]);
    tick(&mut c, &mut h, 60, &[]);
    tick(&mut c, &mut h, 60, &[]);
    // 15 s after the reading g0 runs at 1.5% for one interval: 0.5% since the reading, but
    // not quiet in the last interval.
    h.set_demand(0, 0, 1.5 * QUIET_SHARE);
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, names(&["g0"]));
}

#[test]
fn after_a_memory_event_a_guest_is_read_until_it_made_its_figures_after_the_event() {
    let mut h = host(2);
    let mut c = Collector::new();
    tick(&mut c, &mut h, 60, &[]);
    // The event 12 s from now in the guest's figures' clock: the readings of the next two
    // intervals (stamped 5 and 10 s from now) are figures from before it.
    c.balloons.changed(&names(&["g1"]), h.epoch_s() + 12);
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, names(&["g1"]));
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, names(&["g1"]));
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, names(&["g1"]), "its figures of after the event");
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, Vec::<String>::new(), "then quiet again");
    // A domain no longer listed is forgotten, whether or not balloons are read.
    c.balloons.changed(&names(&["gone"]), h.epoch_s());
    c.sample(&mut h, None).unwrap();
    assert!(c.balloons.changed.is_empty());
}

#[test]
fn a_guest_libvirt_reports_changed_or_with_unknown_counters_is_read() {
    let mut h = host(3);
    let mut c = Collector::new();
    tick(&mut c, &mut h, 60, &[]);
    c.balloons.changed(&names(&["g1"]), h.epoch_s());
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, names(&["g1"]));
    assert_eq!(tick(&mut c, &mut h, 60, &[]).0, Vec::<String>::new(), "read once, then quiet again");
    // g2's vCPU thread is unknown this quantum: nothing says it was quiet.
    h.advance(5 * S);
    let mut raw = c.sample(&mut h, None).unwrap();
    raw.domains[2].vcpus = vec![None];
    let steady: HashSet<String> = names(&["g0", "g1", "g2"]).into_iter().collect();
    let how = BalloonRead { quiet_ns: 60 * S, interval_ns: 5 * S, may_carry: &steady };
    let (out, counts) = c.balloons.read(&mut h, &raw.domains, how).unwrap();
    assert_eq!(counts, BalloonCounts { read: 1, carried: 2, unread: 0 });
    assert!(out.iter().any(|(n, b)| n == "g2" && b.carried_for_s.is_none()), "{out:?}");
}

#[test]
fn only_a_reading_with_the_guests_own_figures_is_carried() {
    let full = BalloonStats {
        current_kib: 1 << 20,
        maximum_kib: 1 << 20,
        usable_kib: Some(1 << 19),
        last_update_s: Some(1),
        ..BalloonStats::default()
    };
    assert!(complete(&full));
    // What libvirt returns for a guest whose monitor was busy, or without a stats period.
    assert!(!complete(&BalloonStats { usable_kib: None, available_kib: None, ..full.clone() }));
    assert!(!complete(&BalloonStats { last_update_s: None, ..full }));
}
