use super::*;

const GIB: u64 = 1 << 20;

fn spec(name: &str, vcpus: u32, max_gib: u64) -> GuestSpec {
    GuestSpec { name: name.into(), vcpus, max_kib: max_gib * GIB, liar: false }
}

fn host(cpus: u32, mem_gib: u64, guests: &[GuestSpec]) -> SimHost {
    SimHost::new(SimConfig::new(cpus, mem_gib * GIB, GIB), guests).unwrap()
}

fn dom(h: &mut SimHost, i: usize) -> DomainRef {
    h.list_domains().unwrap()[i].clone()
}

/// Σ served + Σ delay = Σ demand, per vCPU and in total; delay never negative.
fn check_conservation(h: &SimHost) {
    let s = h.last_interval();
    assert!((s.served + s.delay - s.demand).abs() < 1e-9, "{s:?}");
    assert!(s.delay >= -1e-12, "{s:?}");
    for g in &h.guests {
        for v in &g.vcpus {
            assert!(v.served <= v.demand + 1e-12 && v.served >= 0.0, "{v:?}");
            assert!(v.wait_ns >= 0.0);
        }
    }
}

fn check_memory(h: &SimHost) {
    let sum: u64 = h.guest_resident_kib().iter().sum();
    assert_eq!(sum + h.mem_available_kib() + h.config().host_overhead_kib, h.config().mem_total_kib);
    for (r, c) in h.guest_resident_kib().iter().zip(h.guest_sizes_kib()) {
        assert!(*r <= c, "a guest backs no more than its size: {r} > {c}");
    }
}

#[test]
fn topology_has_two_nodes_and_smt_pairs() {
    let t = topology(8);
    assert_eq!(t.cpus.len(), 8);
    assert_eq!(t.siblings(0), vec![0, 4]);
    assert_eq!(t.get(1).unwrap().node, 0);
    assert_eq!(t.get(2).unwrap().node, 1);
    assert_eq!(t.get(6).unwrap().node, 1);
    assert_eq!(topology(1).cpus.len(), 1);
    assert_eq!(topology(3).cpus.len(), 3);
}

#[test]
fn pinned_vcpus_share_in_proportion() {
    let mut h = host(2, 8, &[spec("a", 3, 1)]);
    let d = dom(&mut h, 0);
    for v in 0..3 {
        h.pin_vcpu(&d, v, 0).unwrap();
    }
    h.set_demand(0, 0, 1.0);
    h.set_demand(0, 1, 0.5);
    h.set_demand(0, 2, 0.5);
    h.advance(1_000_000_000);
    check_conservation(&h);
    let (r0, w0) = h.vcpu_totals_s(0, 0).unwrap();
    assert!((r0 - 0.5).abs() < 1e-9 && (w0 - 0.5).abs() < 1e-9, "{r0} {w0}");
    let s = h.last_interval();
    assert!((s.delay - 1.0).abs() < 1e-9);
    assert!((s.busiest_load - 2.0).abs() < 1e-9);
    assert!((s.bound - 1.0).abs() < 1e-9);
    let hs = h.host_sample().unwrap();
    assert_eq!(hs.cpu_busy_ns, vec![1_000_000_000, 0]);
    assert_eq!(h.take_actions().placements, 3);
}

#[test]
fn floating_vcpus_are_work_conserving() {
    let mut h = host(4, 8, &[spec("a", 6, 1)]);
    for v in 0..6 {
        h.set_demand(0, v, 0.9);
    }
    h.advance(2_000_000_000);
    check_conservation(&h);
    let s = h.last_interval().clone();
    // 5.4 cores wanted on 4 cpus: 1.4 cores unmet, shared evenly.
    assert!((s.served - 4.0).abs() < 1e-9, "{s:?}");
    assert!((s.delay - 1.4).abs() < 1e-9);
    let hs = h.host_sample().unwrap();
    assert!(hs.cpu_busy_ns.iter().all(|&b| b.abs_diff(2_000_000_000) < 10), "{:?}", hs.cpu_busy_ns);
    let times = {
        let d = dom(&mut h, 0);
        let desc = h.describe(&d).unwrap();
        h.vcpu_times(&desc).unwrap()
    };
    let t = times[0].as_ref().unwrap();
    assert!(t.run_ns.abs_diff(1_333_333_333) < 10 && t.wait_ns.abs_diff(466_666_667) < 10, "{t:?}");
    assert_eq!(t.affinity_mask.0.len(), 4);
}

#[test]
fn floating_uses_what_pinned_leave() {
    let mut h = host(2, 8, &[spec("a", 3, 1)]);
    let d = dom(&mut h, 0);
    h.pin_vcpu(&d, 0, 0).unwrap();
    h.set_demand(0, 0, 0.8);
    h.set_demand(0, 1, 1.0);
    h.set_demand(0, 2, 0.5);
    h.advance(1_000_000_000);
    check_conservation(&h);
    // Spare: 0.2 + 1.0 = 1.2 for 1.5 of floating demand: level 0.6 → served 0.6 + 0.5... no:
    // water level L with min(1,L) + min(0.5,L) = 1.2 → L = 0.7.
    let (r1, _) = h.vcpu_totals_s(0, 1).unwrap();
    let (r2, _) = h.vcpu_totals_s(0, 2).unwrap();
    assert!((r1 - 0.7).abs() < 1e-9 && (r2 - 0.5).abs() < 1e-9, "{r1} {r2}");
}

#[test]
fn randomized_conservation() {
    let mut rng = fastrand::Rng::with_seed(7);
    let guests: Vec<GuestSpec> = (0..20).map(|i| spec(&format!("g{i}"), rng.u32(1..=6), rng.u64(1..=8))).collect();
    let mut h = host(8, 32, &guests);
    check_memory(&h);
    for _ in 0..200 {
        for (g, spec) in guests.iter().enumerate() {
            for v in 0..spec.vcpus as usize {
                h.set_demand(g, v, rng.f64());
            }
            h.set_mem_need(g, rng.u64(0..=spec.max_kib));
        }
        let gi = rng.usize(0..guests.len());
        let d = dom(&mut h, gi);
        let cpus = h.config().cpus;
        let _ = h.pin_vcpu(&d, rng.u32(0..guests[gi].vcpus), rng.u32(0..cpus));
        h.set_balloon(&d, rng.u64(0..=guests[gi].max_kib * 2)).unwrap();
        h.advance(rng.u64(1..3_000_000_000));
        check_conservation(&h);
        check_memory(&h);
        let s = h.last_interval();
        assert!(s.reclaimed_kib <= s.reclaimable_kib);
        assert!(s.busiest_load + 1e-9 >= s.bound.min(s.demand), "{s:?}");
    }
}

#[test]
fn start_sizes_scale_to_fit() {
    // 4 guests of 8 GiB on 16 GiB (1 GiB overhead, 1 GiB reserve): 14/32 of each.
    let g: Vec<GuestSpec> = (0..4).map(|i| spec(&format!("g{i}"), 1, 8)).collect();
    let h = host(2, 16, &g);
    let sizes = h.guest_sizes_kib();
    assert!(sizes.iter().all(|&s| s == 14 * GIB / 4), "{sizes:?}");
    assert_eq!(h.mem_available_kib(), GIB);
    // Room for all: provisioned size.
    let h = host(2, 64, &g);
    assert!(h.guest_sizes_kib().iter().all(|&s| s == 8 * GIB));
}

#[test]
fn balloons_move_at_a_finite_rate_and_never_create_memory() {
    let g = vec![spec("a", 1, 8), spec("b", 1, 8)];
    // 15 GiB for guests after the overhead, 1 GiB reserve: both start at 7 GiB, touched.
    let mut h = host(2, 16, &g);
    let (a, b) = (dom(&mut h, 0), dom(&mut h, 1));
    assert_eq!(h.guest_sizes_kib(), vec![7 * GIB, 7 * GIB]);
    assert_eq!(h.mem_available_kib(), GIB);
    h.set_balloon(&a, GIB).unwrap();
    h.advance(1_000_000_000);
    assert_eq!(h.guest_sizes_kib()[0], 7 * GIB - (512 << 10));
    assert_eq!(h.mem_available_kib(), GIB + (512 << 10), "inflating frees touched pages");
    check_memory(&h);
    for _ in 0..20 {
        h.advance(1_000_000_000);
    }
    assert_eq!(h.mem_available_kib(), 7 * GIB);
    // b is granted 1 GiB: its balloon grows, the host pays nothing until b touches it.
    h.set_balloon(&b, 8 * GIB).unwrap();
    assert_eq!(h.take_actions().grants_kib, GIB);
    for _ in 0..10 {
        h.advance(1_000_000_000);
        check_memory(&h);
    }
    assert_eq!(h.guest_sizes_kib(), vec![GIB, 8 * GIB]);
    assert_eq!(h.mem_available_kib(), 7 * GIB, "an untouched grant costs nothing yet");
    assert_eq!(h.mem_available_committed_kib(), 6 * 1024 * 1024);
    h.set_mem_need(1, 8 * GIB);
    h.advance(1_000_000_000);
    assert_eq!(h.mem_available_kib(), 6 * GIB, "touched: now the host pays");
    // Now a wants its 8 GiB back and uses them: only 6 GiB are free to back them.
    h.set_balloon(&a, 8 * GIB).unwrap();
    h.set_mem_need(0, 8 * GIB);
    for _ in 0..40 {
        h.advance(1_000_000_000);
        check_memory(&h);
    }
    assert_eq!(h.guest_sizes_kib(), vec![8 * GIB, 8 * GIB]);
    assert_eq!(h.mem_available_kib(), 0);
    assert_eq!(h.guest_resident_kib()[0], 7 * GIB);
    assert_eq!(h.last_interval().swapping_guests, 1, "what the host cannot back, the guest swaps");
    assert!(h.mem_available_committed_kib() < 0);
}

#[test]
fn deficit_swaps_and_liar_lies() {
    let mut g = vec![spec("a", 1, 4), spec("l", 1, 4)];
    g[1].liar = true;
    let mut h = host(2, 64, &g);
    h.set_mem_need(0, 5 * GIB);
    h.set_mem_need(1, GIB / 2);
    h.advance(10_000_000_000);
    assert_eq!(h.last_interval().swapping_guests, 1);
    let st = h.balloon_stats().unwrap();
    assert!(st[0].1.swap_in_kib.unwrap() > 0 && st[0].1.major_fault.unwrap() > 0);
    assert_eq!(st[0].1.usable_kib, Some(0));
    assert!(st[1].1.usable_kib.unwrap() < GIB / 10, "{:?}", st[1].1);
    assert_eq!(st[1].1.swap_in_kib, Some(0));
    assert_eq!(st[1].1.last_update_s, Some(h.epoch_s()));
}

#[test]
fn unknown_domain_is_gone() {
    let mut h = host(2, 8, &[spec("a", 1, 1)]);
    let ghost = DomainRef { name: "x".into(), uuid: String::new(), id: 9 };
    assert!(matches!(h.pin_vcpu(&ghost, 0, 0), Err(HostError::DomainGone(_))));
    let d = dom(&mut h, 0);
    assert!(h.pin_vcpu(&d, 0, 5).is_err());
    assert!(h.pin_vcpu(&d, 3, 0).is_err());
}

#[test]
fn both_threads_of_a_core_busy_lose_work_and_separate_cores_do_not() {
    // smt_topology(4): cpus 0 and 2 share a core on node 0, cpus 1 and 3 on node 1.
    let mut h = host(4, 8, &[spec("a", 2, 1)]);
    let d = dom(&mut h, 0);
    h.pin_vcpu(&d, 0, 0).unwrap();
    h.pin_vcpu(&d, 1, 2).unwrap();
    h.set_demand(0, 0, 1.0);
    h.set_demand(0, 1, 1.0);
    h.advance(1_000_000_000);
    let y = h.config().smt_yield;
    assert!((h.last_interval().smt_lost - (2.0 - y)).abs() < 1e-9, "{:?}", h.last_interval());
    assert!(h.last_interval().remote < 1e-12, "first pinned on node 0: home is node 0");
    check_conservation(&h);
    h.pin_vcpu(&d, 1, 1).unwrap();
    h.advance(1_000_000_000);
    let s = h.last_interval();
    assert!(s.smt_lost < 1e-12, "{s:?}");
    assert!((s.remote - 1.0).abs() < 1e-9, "vCPU 1 now runs on node 1: {s:?}");
    assert!((s.remote_lost - h.config().remote_penalty).abs() < 1e-9, "{s:?}");
}

#[test]
fn floating_vcpus_take_idle_cores_first_and_a_flat_host_has_no_costs() {
    for kind in [TopologyKind::Smt, TopologyKind::Flat] {
        let cfg = SimConfig { topology: kind, ..SimConfig::new(8, 8 * GIB, GIB) };
        let mut h = SimHost::new(cfg, &[spec("a", 4, 1)]).unwrap();
        for v in 0..4 {
            h.set_demand(0, v, 1.0);
        }
        h.advance(1_000_000_000);
        // Four busy vCPUs on 4 physical cores (8 threads): no core need share.
        assert!(h.last_interval().smt_lost < 1e-9, "{kind:?}: {:?}", h.last_interval());
        check_conservation(&h);
    }
    // Six busy vCPUs on 4 physical cores: two cores share, losing 2 − yield each.
    let mut h = host(8, 8, &[spec("a", 6, 1)]);
    for v in 0..6 {
        h.set_demand(0, v, 1.0);
    }
    h.advance(1_000_000_000);
    let y = h.config().smt_yield;
    assert!((h.last_interval().smt_lost - 2.0 * (2.0 - y)).abs() < 1e-9, "{:?}", h.last_interval());
    // Home node 0 (guest 0) has 2 cores: the other node's 2 idle cores come before its siblings.
    assert!((h.last_interval().remote - 2.0).abs() < 1e-9, "{:?}", h.last_interval());
}
