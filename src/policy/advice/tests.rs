//! The capacity advice: which guest is named, when none is, spare capacity, and the window.

use super::*;
use proptest::prelude::*;

const GIB: u64 = 1 << 20;

fn guest(name: &str, cpu_cores: f64, mem_gib: u64) -> Guest {
    Guest { name: name.into(), cpu_cores, mem_kib: mem_gib * GIB, unmet_kib: 0, left_alone: false }
}

/// A host of `cpus` cpus at the default `--high`, loaded only by `guests` plus `fixed` cores.
fn host(cpus: usize, fixed: f64, guests: Vec<Guest>) -> AdviceInput {
    let load_cores = fixed + guests.iter().map(|g| g.cpu_cores).sum::<f64>();
    AdviceInput { cpus, high: 0.75, load_cores, mem: MemSide { free_kib: 4 * GIB, ..MemSide::default() }, guests }
}

fn named(a: &Assessment) -> Option<&str> {
    a.migrate.as_ref().map(Advice::domain)
}

fn reason(a: &Assessment) -> &str {
    match a.migrate.as_ref().expect("advice") {
        Advice::Migrate { reason, .. } => reason,
    }
}

/// The host's cpu load with guest `name` gone.
fn load_without(input: &AdviceInput, name: &str) -> f64 {
    input.load_cores - input.guests.iter().find(|g| g.name == name).map_or(0.0, |g| g.cpu_cores)
}

/// The host with guest `g` gone, modelled here independently of the planner: its demand, its
/// memory (first filling the shortfall below the reserve) and its own want leave with it.
fn gone(input: &AdviceInput, g: &Guest) -> AdviceInput {
    let mut after = input.clone();
    after.load_cores -= g.cpu_cores;
    let short = after.mem.short_kib.min(g.mem_kib);
    after.mem.short_kib -= short;
    after.mem.free_kib += g.mem_kib - short;
    after.mem.unmet_kib -= g.unmet_kib;
    after.guests.retain(|x| x.name != g.name);
    after
}

#[allow(clippy::cast_precision_loss)]
fn capacity_of(input: &AdviceInput) -> f64 {
    input.high * input.cpus as f64
}

#[test]
fn a_host_under_its_threshold_gets_no_advice_and_has_spare() {
    let input = host(4, 0.2, vec![guest("a", 1.0, 2), guest("b", 0.5, 1)]);
    let a = assess(&input, None);
    assert!(!a.overload.any());
    assert_eq!(a.migrate, None);
    let expected = capacity_of(&input) - input.load_cores;
    assert!((a.spare.cpu_cores - expected).abs() < 1e-9, "{a:?}");
    assert_eq!(a.spare.mem_kib, input.mem.free_kib);
}

#[test]
fn the_guest_named_is_not_the_busiest_but_the_one_that_suffices_with_least_memory() {
    // Two cpus allow 1.5 cores; the load is 0.5 above. Each of the three would suffice alone.
    let input = host(2, 0.0, vec![guest("busiest", 1.0, 8), guest("mid", 0.5, 4), guest("small", 0.5, 1)]);
    assert!(input.guests.iter().all(|g| load_without(&input, &g.name) <= capacity_of(&input) + 1e-9));
    let a = assess(&input, None);
    assert_eq!(named(&a), Some("small"), "{a:?}");
    assert!(load_without(&input, "small") <= capacity_of(&input) + 1e-9);
    assert!(reason(&a).contains("least memory to move"), "{}", reason(&a));
    assert_eq!(a.spare.cpu_cores, 0.0, "an overloaded host has no cpu to spare");
}

#[test]
fn a_guest_too_light_to_bring_the_host_under_is_passed_over_for_one_that_does() {
    // "light" has the least memory, but its removal leaves the host above its threshold.
    let input = host(2, 0.0, vec![guest("light", 0.2, 1), guest("heavy", 1.0, 2), guest("other", 0.8, 3)]);
    let a = assess(&input, None);
    assert_eq!(named(&a), Some("heavy"), "{a:?}");
}

#[test]
fn when_no_single_guest_suffices_the_most_relief_per_memory_moved_is_named() {
    // Three busy one-vCPU guests on two cpus (the lab's overloaded host): 3.0 cores against
    // 1.5; no single removal brings it under.
    let input = host(2, 0.05, vec![guest("a", 1.0, 2), guest("b", 1.0, 1), guest("c", 1.0, 4)]);
    let a = assess(&input, None);
    assert_eq!(named(&a), Some("b"), "same relief, least memory: {a:?}");
    assert!(reason(&a).contains("no single guest"), "{}", reason(&a));
    assert!(load_without(&input, "b") > capacity_of(&input));
}

#[test]
fn an_excluded_or_opted_out_guest_is_never_named() {
    // 1.8 cores against 1.5: only "only" would bring the host under.
    let mut input = host(2, 1.2, vec![guest("only", 0.6, 1), guest("idle", 0.0, 1)]);
    input.guests[0].left_alone = true;
    let a = assess(&input, None);
    assert!(a.overload.any(), "still overloaded");
    assert_eq!(a.migrate, None, "the one guest that would help is left alone, the other relieves nothing: {a:?}");
    input.guests.push(guest("helper", 0.4, 1));
    input.load_cores += 0.4;
    let a = assess(&input, None);
    assert_eq!(named(&a), Some("helper"), "it relieves part of the overload: {a:?}");
    assert!(reason(&a).contains("no single guest"), "{}", reason(&a));
}

#[test]
fn starving_guests_the_host_cannot_serve_name_a_guest_with_enough_memory() {
    let mut input = host(8, 0.0, vec![guest("big", 0.1, 8), guest("enough", 0.1, 2), guest("tiny", 0.1, 1)]);
    input.guests.push(Guest { unmet_kib: GIB, ..guest("starving", 0.1, 1) });
    // 1 GiB wanted, 256 MiB free: 768 MiB needed. "tiny" (1 GiB) already frees enough.
    input.mem = MemSide { free_kib: GIB / 4, short_kib: 0, unmet_kib: GIB };
    let a = assess(&input, None);
    assert_eq!(a.overload.mem_kib, GIB - GIB / 4);
    assert_eq!(a.overload.cpu_cores, 0.0);
    assert!(matches!(named(&a), Some("tiny" | "starving")), "1 GiB to move: {a:?}");
    assert!(reason(&a).contains("starving guests want"), "{}", reason(&a));
    assert_eq!(a.spare.mem_kib, 0, "the free memory is wanted already");
    // Below the reserve the shortfall counts too: now 1 GiB frees too little.
    input.mem = MemSide { free_kib: 0, short_kib: GIB, unmet_kib: GIB };
    let a = assess(&input, None);
    assert_eq!(a.overload.mem_kib, 2 * GIB);
    assert!(matches!(named(&a), Some("enough" | "starving")), "{a:?}");
}

#[test]
fn refused_guests_the_budget_can_serve_are_no_overload() {
    let mut input = host(8, 0.0, vec![guest("a", 0.1, 1)]);
    input.mem = MemSide { free_kib: 2 * GIB, short_kib: 0, unmet_kib: GIB };
    let a = assess(&input, None);
    assert!(!a.overload.any());
    assert_eq!(a.spare.mem_kib, GIB);
}

#[test]
fn the_guest_named_before_stays_while_it_is_about_as_good() {
    let input = host(2, 0.0, vec![guest("a", 1.0, 2), guest("b", 1.0, 2), guest("c", 1.0, 2)]);
    let first = named(&assess(&input, None)).unwrap().to_string();
    for other in ["a", "b", "c"] {
        assert_eq!(named(&assess(&input, Some(other))), Some(other), "equal guests: the named one stays");
    }
    // A clearly better choice replaces it.
    let mut better = input.clone();
    better.guests[0].mem_kib = GIB / 2;
    assert_eq!(named(&assess(&better, Some(&first))), Some("a"));
}

#[test]
fn an_overload_is_advised_only_once_it_lasted_the_whole_window() {
    let s = 1_000_000_000u64;
    let mut t = Sustain::default();
    assert_eq!(t.observe(0, true, 300 * s), None);
    assert_eq!(t.observe(299 * s, true, 300 * s), None);
    assert_eq!(t.observe(300 * s, true, 300 * s), Some(300 * s));
    // One quantum under the threshold starts the window over.
    assert_eq!(t.observe(302 * s, false, 300 * s), None);
    assert_eq!(t.observe(304 * s, true, 300 * s), None);
    assert_eq!(t.observe(603 * s, true, 300 * s), None);
    assert_eq!(t.observe(604 * s, true, 300 * s), Some(300 * s));
    t.reset();
    assert_eq!(t.observe(606 * s, true, 300 * s), None, "a reset forgets the overload");
    // A zero window advises at once.
    assert_eq!(Sustain::default().observe(7, true, 0), Some(0));
}

#[test]
fn bad_figures_do_not_panic_or_go_negative() {
    let mut input = host(2, 0.0, vec![guest("nan", f64::NAN, 0), guest("inf", f64::INFINITY, 1)]);
    input.load_cores = f64::NAN;
    let a = assess(&input, None);
    assert!(a.spare.cpu_cores >= 0.0 && a.spare.cpu_cores.is_finite());
    input.cpus = 0;
    input.load_cores = 1.0;
    let a = assess(&input, None);
    assert!(a.overload.any() && a.spare.cpu_cores == 0.0);
}

prop_compose! {
    fn arb_input()(cpus in 1usize..16, high in 0.1f64..1.0, fixed in 0.0f64..2.0,
                   gs in proptest::collection::vec((0.0f64..4.0, 0u64..16 * GIB, 0u64..2 * GIB, any::<bool>()), 0..12),
                   free in 0u64..8 * GIB, short in 0u64..2 * GIB, extra_unmet in 0u64..GIB) -> AdviceInput {
        let guests: Vec<Guest> = gs.iter().enumerate().map(|(i, &(cpu, mem, unmet, left_alone))| Guest {
            name: format!("g{i}"), cpu_cores: cpu, mem_kib: mem, unmet_kib: unmet, left_alone,
        }).collect();
        let load_cores = fixed + guests.iter().map(|g| g.cpu_cores).sum::<f64>();
        let unmet_kib = guests.iter().map(|g| g.unmet_kib).sum::<u64>() + extra_unmet;
        let (free_kib, short_kib) = if short > GIB { (0, short - GIB) } else { (free, 0) };
        AdviceInput { cpus, high, load_cores, mem: MemSide { free_kib, short_kib, unmet_kib }, guests }
    }
}

proptest! {
    #[test]
    fn advice_invariants(input in arb_input(), before in proptest::option::of(0usize..12)) {
        let before = before.map(|i| format!("g{i}"));
        let a = assess(&input, before.as_deref());
        prop_assert!(a.spare.cpu_cores >= 0.0 && a.spare.cpu_cores.is_finite());
        if !a.overload.any() {
            prop_assert!(a.migrate.is_none(), "no advice on a host under its thresholds");
        }
        if let Some(adv) = &a.migrate {
            let g = input.guests.iter().find(|g| g.name == adv.domain()).unwrap();
            prop_assert!(!g.left_alone, "a guest left alone was named");
            // When some movable guest alone would bring the host under, the named one does.
            let any_suffices = input.guests.iter().filter(|g| !g.left_alone).any(|g| !overload(&gone(&input, g)).any());
            if any_suffices {
                prop_assert!(!overload(&gone(&input, g)).any(), "{} does not suffice", g.name);
                let least = input.guests.iter()
                    .filter(|x| !x.left_alone && !overload(&gone(&input, x)).any())
                    .map(|x| x.mem_kib).min().unwrap();
                #[allow(clippy::cast_precision_loss)]
                let within = g.mem_kib as f64 <= least as f64 * (1.0 + ABOUT_EQUAL);
                prop_assert!(within, "{} moves {} KiB, {} would do", g.name, g.mem_kib, least);
            }
        }
    }
}
