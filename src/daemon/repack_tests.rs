//! The scheduled re-pack and the safeguard in the loop, over the simulated host in virtual time:
//! the schedule fires at its minute of the virtual clock, the re-pack moves what the balancer
//! left, and a re-pack that stops paying off is rolled back to exactly the old pins, once.

use super::*;
use crate::cli::Common;
use crate::host::CpuSet;
use crate::schedule::Schedule;
use crate::sim::faulty::Faulty;

const Q: u64 = 500_000_000;
const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// Two busy and two light one-vCPU guests on a 2-cpu host.
fn host() -> Faulty {
    let guests: Vec<(&str, u32)> = NAMES.iter().map(|n| (*n, 1)).collect();
    let mut h = Faulty::new(2, &guests);
    for (g, d) in [0.6, 0.6, 0.1, 0.1].into_iter().enumerate() {
        h.sim.set_demand(g, 0, d);
    }
    h
}

/// The agent with a re-pack at `schedule`, and a day-long cooldown: once its vCPUs have
/// moved, the balancer leaves them alone and only the re-pack and the safeguard move them.
fn agent(h: Faulty, schedule: &str) -> Agent<Faulty> {
    let mut c = Common::defaults().unwrap();
    c.quantum = Duration::from_nanos(Q);
    c.smoothing = Duration::from_millis(500);
    c.no_memory = true;
    c.cooldown = Duration::from_secs(86_400);
    c.repack_schedule = Some(Schedule::parse(schedule).unwrap());
    c.repack_min_gain = 0.1;
    Agent::new(h, AgentConfig::from_flags(&c, false))
}

/// A daily schedule at the second whole minute after the host clock's now (UTC), and that time.
fn two_minutes_on(h: &Faulty) -> (String, u64) {
    let fire = (h.epoch_s() / 60 + 2) * 60;
    let t = chrono::DateTime::from_timestamp(i64::try_from(fire).unwrap(), 0).unwrap();
    (t.format("%M %H * * *").to_string(), fire)
}

fn step(a: &mut Agent<Faulty>) -> StepReport {
    a.host.sim.advance(Q);
    a.step()
}

fn pins(a: &Agent<Faulty>) -> Vec<u32> {
    (0..NAMES.len()).map(|g| a.host.sim.affinity(g, 0).and_then(CpuSet::as_single).unwrap_or(u32::MAX)).collect()
}

/// Piles the two busy guests on cpu 0 and the light ones on cpu 1 (an operator's pins), each
/// marked as just moved: the balancer may not touch them for a day.
fn pile(a: &mut Agent<Faulty>) -> Vec<u32> {
    let doms = a.host.sim.list_domains().unwrap();
    for (name, cpu) in NAMES.iter().zip([0, 0, 1, 1]) {
        let d = doms.iter().find(|d| d.name == *name).unwrap();
        a.host.sim.pin_vcpu(d, 0, cpu).unwrap();
        a.moved_at.entry(d.name.clone()).or_default().insert(0, a.host.now_ns());
    }
    pins(a)
}

/// Steps until the scheduled re-pack has been applied to its end; returns the host clock
/// (epoch s) of the quantum it started in. Checks that nothing moved before.
fn until_repacked(a: &mut Agent<Faulty>, piled: &[u32], fire: u64) -> u64 {
    let mut started = None;
    for _ in 0..600 {
        step(a);
        let s = a.repack_stats();
        if s.started == 1 && started.is_none() {
            started = Some(a.host.epoch_s());
        }
        if started.is_none() {
            assert_eq!(pins(a), piled, "the balancer left the pile alone until the schedule");
        }
        if s.completed == 1 {
            return started.unwrap();
        }
    }
    panic!("no re-pack by {fire}: {:?}", a.repack_stats());
}

/// An agent scheduled to re-pack two minutes on, settled for 10 quanta, then the busy guests
/// piled on one cpu and stepped until the re-pack started: the agent, the piled pins, the
/// scheduled time and the quantum the re-pack started at.
fn piled_then_repacked() -> (Agent<Faulty>, Vec<u32>, u64, u64) {
    let h = host();
    let (cron, fire) = two_minutes_on(&h);
    let mut a = agent(h, &cron);
    for _ in 0..10 {
        step(&mut a);
    }
    let piled = pile(&mut a);
    let started = until_repacked(&mut a, &piled, fire);
    (a, piled, fire, started)
}

#[test]
fn the_schedule_fires_in_virtual_time_and_the_repack_separates_the_busy_guests() {
    let (mut a, piled, fire, started) = piled_then_repacked();
    assert_eq!(piled[0], piled[1]);
    assert!(started >= fire && started <= fire + 1, "started at {started}, scheduled for {fire}");
    let after = pins(&a);
    assert_ne!(after[0], after[1], "the busy guests on cpus of their own: {after:?}");
    assert_eq!(after[0], piled[0], "fewest moves: the first busy guest stays");
    // The safeguard judges it on the same demand: it pays off and stays.
    for _ in 0..20 {
        step(&mut a);
    }
    let s = a.repack_stats();
    assert_eq!((s.scheduled, s.started, s.completed, s.repack_kept, s.repack_rolled_back), (1, 1, 1, 1, 0), "{s:?}");
    let moved = after.iter().zip(&piled).filter(|(x, y)| x != y).count();
    assert_eq!(s.repack_pins, moved as u64);
    assert_eq!(pins(&a), after);
}

#[test]
fn a_repack_that_stops_paying_off_is_rolled_back_to_exactly_the_old_pins_once() {
    let (mut a, piled, _, _) = piled_then_repacked();
    let repacked = pins(&a);
    // Right after, the demand turns: the guests the re-pack put together get busy, those it
    // separated go quiet. On that demand the old pins are the better placement.
    let together: Vec<usize> = (1..4).filter(|&g| repacked[g] == repacked[0]).collect();
    assert_eq!(together.len(), 1, "{repacked:?}");
    for g in 0..4 {
        let busy = g == 0 || g == together[0];
        a.host.sim.set_demand(g, 0, if busy { 0.9 } else { 0.05 });
    }
    for _ in 0..20 {
        step(&mut a);
    }
    let s = a.repack_stats();
    assert_eq!(s.repack_rolled_back, 1, "{s:?}");
    assert_eq!(pins(&a), piled, "exactly the pins before the re-pack");
    assert_eq!(s.rollback_pins, s.repack_pins);
    // Once: the rollback is not judged in turn, and nothing moves again.
    assert_eq!(a.repacker.watching(), 0);
    for _ in 0..200 {
        step(&mut a);
    }
    assert_eq!(pins(&a), piled);
    assert_eq!(a.repack_stats().rollback_pins, s.rollback_pins);
}

#[test]
fn during_a_repack_the_balancer_goes_first_and_the_run_waits() {
    // 4 cpus: three busy guests piled on cpu 0 (held by their cooldown), two idle ones on
    // cpu 1. One pin per quantum, so the re-pack takes two steps.
    let names = ["a", "b", "g", "e", "f"];
    let guests: Vec<(&str, u32)> = names.iter().map(|n| (*n, 1)).collect();
    let mut h = Faulty::new(4, &guests);
    for (g, d) in [0.6, 0.6, 0.6, 0.0, 0.0].into_iter().enumerate() {
        h.sim.set_demand(g, 0, d);
    }
    let (cron, _) = two_minutes_on(&h);
    let mut c = Common::defaults().unwrap();
    c.quantum = Duration::from_nanos(Q);
    c.smoothing = Duration::from_millis(500);
    c.no_memory = true;
    c.cooldown = Duration::from_secs(86_400);
    c.max_repins = 1;
    c.repack_schedule = Some(Schedule::parse(&cron).unwrap());
    c.repack_min_gain = 0.1;
    let mut a = Agent::new(h, AgentConfig::from_flags(&c, false));
    for _ in 0..10 {
        step(&mut a);
    }
    let doms = a.host.sim.list_domains().unwrap();
    for (name, cpu) in names.iter().zip([0, 0, 0, 1, 1]) {
        let d = doms.iter().find(|d| d.name == *name).unwrap();
        a.host.sim.pin_vcpu(d, 0, cpu).unwrap();
        if cpu == 0 {
            a.moved_at.entry(d.name.clone()).or_default().insert(0, a.host.now_ns());
        }
    }
    // Run until the re-pack's first pin; then the idle guests get busy: cpu 1 is overloaded.
    for _ in 0..600 {
        step(&mut a);
        if a.repack_stats().repack_pins == 1 {
            break;
        }
    }
    assert_eq!(a.repack_stats().repack_pins, 1, "{:?}", a.repack_stats());
    a.host.sim.set_demand(3, 0, 0.6);
    a.host.sim.set_demand(4, 0, 0.6);
    let mut balanced_during_run = false;
    for _ in 0..40 {
        let r = step(&mut a);
        let running = a.repacker.running();
        let moved_idle = r.plan.iter().zip(&r.was_applied).any(|(x, ok)| {
            *ok && matches!(x, Action::Pin { domain, kind: crate::policy::PinKind::Move | crate::policy::PinKind::Swap, .. } if domain == "e" || domain == "f")
        });
        if moved_idle && running {
            balanced_during_run = true;
        }
    }
    assert!(balanced_during_run, "the balancer moved e or f while the re-pack waited");
    let s = a.repack_stats();
    assert_eq!((s.completed, s.dropped, s.repack_pins), (1, 0, 2), "the run finished afterwards: {s:?}");
}
