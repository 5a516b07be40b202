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

/// Advances 5 s and reads the balloons: (names read, names carried with their age in s).
fn tick(c: &mut Collector, h: &mut SimHost, quiet_s: u64, must: &[String]) -> (Vec<String>, Vec<(String, u64)>) {
    h.advance(5 * S);
    let raw = c.sample(h, Some(BalloonRead { quiet_ns: quiet_s * S, must_read: must })).unwrap();
    let b = raw.balloons.unwrap();
    let read: Vec<String> = b.iter().filter(|(_, s)| s.read_age_s == 0).map(|(n, _)| n.clone()).collect();
    let carried: Vec<(String, u64)> =
        b.iter().filter(|(_, s)| s.read_age_s > 0).map(|(n, s)| (n.clone(), s.read_age_s)).collect();
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
    // The agent set g2's balloon target: read it until it gets there.
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
