//! End-to-end: QEMU's emulator thread, pinned by the agent on real guests under a real
//! libvirtd: with the guest's vCPUs after a spread, to a housekeeping set with
//! `--emulator-cpus`, never over an operator's pin, and given back (every cpu again) on
//! SIGTERM and by `vm-balancer release`, as `virsh emulatorpin` shows.

mod common;

use std::time::Duration;

use common::*;

const PINS_NS: &str = "https://vm-balancer.org/xmlns/1/pins";
const FAST: &[&str] = &["--quantum", "500ms", "--cooldown", "2s", "--smoothing", "1s", "--no-memory", "-v"];

/// The emulator's affinity as `virsh emulatorpin NAME --live` prints it (`*: 0-1`).
fn emulatorpin(g: &Guest) -> String {
    let out = virsh(&["emulatorpin", &g.name, "--live"]).unwrap_or_default();
    out.lines().find_map(|l| l.trim().strip_prefix("*:")).map(|s| s.trim().to_string()).unwrap_or_default()
}

/// The guest's live pin record, as libvirt prints it; empty without one.
fn record(g: &Guest) -> String {
    virsh(&["metadata", &g.name, PINS_NS, "--live"]).unwrap_or_default()
}

/// Every online cpu of the host, as virsh prints a set (`0-1`).
fn all_cpus() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap().trim().to_string()
}

#[test]
fn emulators_follow_their_spread_vcpus_and_are_given_back_on_sigterm() {
    let _lab = lab();
    let busy = GuestSpec { vcpus: 1, burn: 1, ..GuestSpec::default() };
    let (a, b) = (Guest::start("emu-a", &busy), Guest::start("emu-b", &busy));
    let all = all_cpus();
    for g in [&a, &b] {
        assert_eq!(emulatorpin(g), all, "a fresh guest's emulator floats over every cpu");
        g.pin(0, "0");
    }
    // The lab machine may be busy with other work on cpu 1: a wide flip margin lets the agent
    // spread the pile-up all the same (what is tested here is where the emulators go).
    let mut args = FAST.to_vec();
    args.extend(["--flip-margin", "1"]);
    let mut agent = Agent::start(&args);
    // Two busy guests piled on cpu 0: one is moved, and each emulator goes where its vCPU is.
    let spread = wait_for(Duration::from_secs(30), || {
        let (pa, pb) = (a.pins(), b.pins());
        pa != pb && emulatorpin(&a) == pa.concat() && emulatorpin(&b) == pb.concat()
    });
    let state = || format!("vCPUs {:?} {:?}, emulators {} {}", a.pins(), b.pins(), emulatorpin(&a), emulatorpin(&b));
    assert!(spread, "{}\nagent log:\n{}", state(), agent.log());
    eprintln!("after the spread: {}", state());
    let log = agent.log();
    assert!(log.contains("pin emulator of vmbt-emu-"), "each pin is logged with its reason:\n{log}");
    assert!(log.contains(": with its vCPUs (on "), "{log}");
    for g in [&a, &b] {
        assert!(record(g).contains(&format!("<emulator prior=\"{all}\"/>")), "recorded first: {}", record(g));
    }
    // No emulator pin without a vCPU move: on a steady host, no call at all.
    let count = |log: &str| (log.matches("pin emulator of").count(), log.matches("pin vCPU").count());
    let (emulators, vcpus) = count(&agent.log());
    std::thread::sleep(Duration::from_secs(3));
    let (emulators_after, vcpus_after) = count(&agent.log());
    assert!(emulators_after - emulators <= vcpus_after - vcpus, "{}", agent.log());
    let (st, _) = agent.terminate();
    assert!(st.success(), "{}", agent.log());
    for g in [&a, &b] {
        assert_eq!(emulatorpin(g), all, "given back: {}\nagent log:\n{}", g.name, agent.log());
        assert!(!record(g).contains("emulator"), "record cleared: {}", record(g));
    }
    assert!(agent.log().contains(&format!("emulator -> {all}")), "{}", agent.log());
}

#[test]
fn a_housekeeping_set_takes_the_emulators_an_operators_pin_stays_and_release_gives_back() {
    let _lab = lab();
    let ours = Guest::start("emu-hk", &GuestSpec::default());
    let theirs = Guest::start("emu-op", &GuestSpec::default());
    virsh(&["emulatorpin", &theirs.name, "0", "--live"]).unwrap();
    assert_eq!(emulatorpin(&theirs), "0");
    let all = all_cpus();
    assert_eq!(emulatorpin(&ours), all);
    let mut args = FAST.to_vec();
    args.extend(["--emulator-cpus", "1"]);
    let mut agent = Agent::start(&args);
    let pinned = wait_for(Duration::from_secs(20), || emulatorpin(&ours) == "1");
    assert!(pinned, "emulator on {}\nagent log:\n{}", emulatorpin(&ours), agent.log());
    eprintln!(
        "--emulator-cpus 1: {} on {}, {} (the operator's) on {}",
        ours.name,
        emulatorpin(&ours),
        theirs.name,
        emulatorpin(&theirs)
    );
    assert!(agent.log().contains("the housekeeping cpus (--emulator-cpus)"), "{}", agent.log());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(emulatorpin(&theirs), "0", "an operator's pin is left alone:\n{}", agent.log());
    // A crash gives nothing back; `vm-balancer release` does.
    agent.kill9();
    assert_eq!(emulatorpin(&ours), "1");
    let out = std::process::Command::new(bin())
        .args(["release", &ours.name, &theirs.name])
        .env_remove("VM_BALANCER_KEEP_PINS_ON_EXIT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(emulatorpin(&ours), all, "given back by release: {err}");
    assert_eq!(emulatorpin(&theirs), "0", "not the agent's to give back: {err}");
    assert!(!record(&ours).contains("emulator"), "record cleared: {}", record(&ours));
}
