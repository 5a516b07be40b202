//! End-to-end: the memory balancer on real QEMU guests under a real libvirtd. Every figure is
//! read back from libvirt (`virsh domstats --balloon`), not from the agent's log.

mod common;

use std::time::Duration;

use common::*;

const MIB: u64 = 1024;
const FAST: &[&str] =
    &["--no-cpu", "-v", "--quantum", "500ms", "--mem-interval", "1s", "--mem-cooldown", "2s", "--min-age", "3s"];

fn current_kib(g: &Guest) -> u64 {
    g.stat_u64(&["--balloon"], "balloon.current").expect("balloon.current")
}

#[test]
fn idle_guest_is_inflated_down_toward_its_floor() {
    let _lab = lab();
    let g = Guest::start("idle", &GuestSpec { memory_mib: 1024, current_mib: 1024, ..GuestSpec::default() });
    assert!(current_kib(&g) > 1000 * MIB);
    let mut args = FAST.to_vec();
    args.extend(["--guest-floor", "384MiB"]);
    let agent = Agent::start(&args);
    let mut lowest = u64::MAX;
    let reached = wait_for(Duration::from_secs(40), || {
        let c = current_kib(&g);
        lowest = lowest.min(c);
        c <= 400 * MIB
    });
    assert!(reached, "idle guest still at {} KiB\n{}", current_kib(&g), agent.log());
    std::thread::sleep(Duration::from_secs(3));
    let c = current_kib(&g);
    lowest = lowest.min(c);
    assert!(lowest >= 384 * MIB - 4 * MIB, "went below the floor: {lowest} KiB\n{}", agent.log());
    assert!(agent.log().contains("reclaim"), "{}", agent.log());
}

#[test]
fn starving_guest_is_grown_toward_its_maximum_and_never_past_it() {
    let _lab = lab();
    // Starts at 256 MiB of 768 and keeps filling a tmpfs, 8 MiB a second, up to 440 MiB.
    let g = Guest::start(
        "hungry",
        &GuestSpec { memory_mib: 768, current_mib: 256, fill_mib: 440, fill_step_mib: 8, ..GuestSpec::default() },
    );
    // QEMU boots a guest with its full `<memory>`; the balloon driver then inflates to
    // `<currentMemory>`. Start the agent once the guest is down at its boot size.
    let settled = wait_for(Duration::from_secs(30), || current_kib(&g) <= 320 * MIB);
    assert!(settled, "balloon never reached its boot target: {} KiB", current_kib(&g));
    let agent = Agent::start(FAST);
    let mut highest = 0;
    let grown = wait_for(Duration::from_secs(60), || {
        let c = current_kib(&g);
        highest = highest.max(c);
        c >= 480 * MIB
    });
    assert!(grown, "guest not grown: {} KiB\n{}", current_kib(&g), agent.log());
    assert!(highest <= 768 * MIB, "above its maximum: {highest}");
    assert!(agent.log().contains("grant"), "{}", agent.log());
}

#[test]
fn host_reserve_blocks_grants_and_diagnose_says_so() {
    let _lab = lab();
    let g = Guest::start(
        "reserve",
        &GuestSpec { memory_mib: 768, current_mib: 256, fill_mib: 200, ..GuestSpec::default() },
    );
    // Let the balloon settle first: toward its boot size, as far as the filled guest lets it.
    let mut prev = u64::MAX;
    let settled = wait_for(Duration::from_secs(40), || {
        let c = current_kib(&g);
        let stable = c < 400 * MIB && c.abs_diff(prev) < MIB;
        prev = c;
        std::thread::sleep(Duration::from_millis(800));
        stable
    });
    assert!(settled, "balloon never settled: {} KiB", current_kib(&g));
    let start = current_kib(&g);
    let mut args = FAST.to_vec();
    args.extend(["--host-reserve", "100000GiB"]);
    let agent = Agent::start(&args);
    std::thread::sleep(Duration::from_secs(10));
    let after = current_kib(&g);
    assert!(after <= start + 8 * MIB, "grown despite the host reserve: {start} -> {after}\n{}", agent.log());
    drop(agent);

    let doc = diagnose_json(&["--no-cpu", "--min-age", "1s", "--host-reserve", "100000GiB"]);
    let d = doc["domains"].as_array().unwrap().iter().find(|d| d["name"] == g.name.as_str()).unwrap();
    let v = &d["memory_verdict"];
    assert_eq!(v["state"], "starving", "{d:#}");
    assert!(v["why"].as_str().unwrap().contains("host reserve"), "{d:#}");
    assert!(d["memory"]["current_kib"].as_u64().unwrap() > 0);
    // Without the reserve, the same diagnosis plans a grant.
    let doc = diagnose_json(&["--no-cpu", "--min-age", "1s"]);
    let planned =
        doc["plan"].as_array().unwrap().iter().any(|a| a["action"] == "balloon" && a["domain"] == g.name.as_str());
    assert!(planned, "{:#}", doc["plan"]);
}

#[test]
fn guest_without_stats_period_gets_it_turned_on() {
    let _lab = lab();
    let g = Guest::start(
        "noperiod",
        &GuestSpec { memory_mib: 512, current_mib: 512, stats_period: None, ..GuestSpec::default() },
    );
    // Without a period the guest reports once, at driver load, and never again.
    let last = || g.stat_u64(&["--balloon"], "balloon.last-update").unwrap_or(0);
    let before = last();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(last(), before, "stats do not move without a period");
    let agent = Agent::start(FAST);
    let moving = wait_for(Duration::from_secs(20), || last() > before);
    assert!(moving, "{}", agent.log());
    assert!(agent.log().contains("turned on balloon statistics"));
}
