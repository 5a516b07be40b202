//! End-to-end: the agent gives back the vCPU affinities it took, on real QEMU guests under a
//! real libvirtd: on SIGTERM, with `vm-balancer release` after `kill -9`, not at all with
//! `--keep-pins-on-exit`, and with the true original after a crash and a restart.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Namespace of the opt-out, and of the agent's pin record beside it.
const NS: &str = "https://vm-balancer.org/xmlns/1";
const PINS_NS: &str = "https://vm-balancer.org/xmlns/1/pins";
const FAST: &[&str] = &["--quantum", "500ms", "--cooldown", "2s", "--smoothing", "1s", "--no-memory"];

/// The guest's live pin record, as libvirt prints it; `None` without one.
fn record(g: &Guest) -> Option<String> {
    virsh(&["metadata", &g.name, PINS_NS, "--live"]).ok()
}

/// The guest's live opt-out element; `None` without one.
fn opt_out(g: &Guest) -> Option<String> {
    virsh(&["metadata", &g.name, NS, "--live"]).ok()
}

fn all_single(pins: &[String]) -> bool {
    pins.len() == 2 && pins.iter().all(|p| p.parse::<u32>().is_ok())
}

/// Runs `vm-balancer release ARGS` with `env` set; returns success and stderr.
fn release(env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .arg("release")
        .args(args)
        .env_remove("VM_BALANCER_KEEP_PINS_ON_EXIT")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A 2-vCPU busy guest floating over every cpu, and an agent that has pinned both vCPUs and
/// recorded their affinity before. Returns the guest, that affinity and the agent.
fn pinned_by_agent(prefix: &str, spec: GuestSpec, extra: &[&str]) -> (Guest, Vec<String>, Agent) {
    let g = Guest::start(prefix, &GuestSpec { vcpus: 2, burn: 2, ..spec });
    let original = g.pins();
    assert!(original.len() == 2 && original.iter().all(|p| p.contains('-')), "a fresh guest floats: {original:?}");
    let mut args = FAST.to_vec();
    args.extend_from_slice(extra);
    let agent = Agent::start(&args);
    let t = Instant::now();
    let pinned = wait_for(Duration::from_secs(30), || all_single(&g.pins()));
    assert!(pinned, "both vCPUs pinned: {:?}\nagent log:\n{}", g.pins(), agent.log());
    eprintln!("{}: both vCPUs pinned {:?} after {:?}", g.name, g.pins(), t.elapsed());
    let rec = record(&g).unwrap_or_default();
    for (v, prior) in original.iter().enumerate() {
        assert!(rec.contains(&format!("<pin vcpu=\"{v}\" prior=\"{prior}\"/>")), "vCPU {v} recorded: {rec}");
    }
    (g, original, agent)
}

#[test]
fn sigterm_gives_the_vcpus_their_affinity_back() {
    let _lab = lab();
    let meta = format!(r#"<vmb:balancer xmlns:vmb="{NS}" memory="no"/>"#);
    let (g, original, mut agent) =
        pinned_by_agent("rel-term", GuestSpec { metadata: Some(meta), ..GuestSpec::default() }, &[]);
    assert!(record(&g).unwrap().contains("<pin "), "recorded");
    assert!(opt_out(&g).unwrap().contains("memory=\"no\""), "the opt-out is kept beside the record");
    let (st, took) = agent.terminate();
    eprintln!("{}: SIGTERM to exit {took:?}", g.name);
    assert!(st.success(), "agent log:\n{}", agent.log());
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");
    assert_eq!(g.pins(), original, "vCPUs float again; agent log:\n{}", agent.log());
    let rec = record(&g).unwrap_or_default();
    assert!(!rec.contains("pin"), "record cleared: {rec}");
    assert!(opt_out(&g).unwrap_or_default().contains("memory=\"no\""), "opt-out kept");
    assert!(agent.log().contains(&format!("gave back the vCPU pins of {}", g.name)), "{}", agent.log());
}

#[test]
fn after_kill_9_release_gives_them_back() {
    let _lab = lab();
    // A persistent guest (its cputune pins no vCPU): the agent must change only the live
    // definition.
    let spec = GuestSpec { cputune: Some("<emulatorpin cpuset='0'/>".into()), ..GuestSpec::default() };
    let (g, original, mut agent) = pinned_by_agent("rel-kill", spec, &[]);
    let inactive = virsh(&["dumpxml", "--inactive", &g.name]).unwrap();
    assert!(!inactive.contains(NS) && !inactive.contains("vcpupin"), "persistent definition changed:\n{inactive}");
    let pins = g.pins();
    agent.kill9();
    assert_eq!(g.pins(), pins, "a crash gives nothing back");
    let t = Instant::now();
    let (ok, err) = release(&[], &[]);
    eprintln!("{}: release took {:?}", g.name, t.elapsed());
    assert!(ok, "release: {err}");
    assert!(err.contains(&format!("gave back the vCPU pins of {}", g.name)), "{err}");
    assert_eq!(g.pins(), original, "vCPUs float again");
    assert_eq!(record(&g), None, "the record is gone with nothing else in the element");
    let (ok, err) = release(&[], &[]);
    assert!(ok && err.contains("no recorded vCPU pins to give back"), "nothing left to do: {err}");
}

#[test]
fn keep_pins_on_exit_keeps_them_and_release_honours_it() {
    let _lab = lab();
    let (g, original, mut agent) = pinned_by_agent("rel-keep", GuestSpec::default(), &["--keep-pins-on-exit"]);
    let pins = g.pins();
    let (st, _) = agent.terminate();
    assert!(st.success());
    assert_eq!(g.pins(), pins, "pins kept; agent log:\n{}", agent.log());
    assert!(record(&g).is_some_and(|r| r.contains("prior")), "still recorded");
    let (ok, err) = release(&[("VM_BALANCER_KEEP_PINS_ON_EXIT", "true")], &[]);
    assert!(ok, "{err}");
    assert_eq!(g.pins(), pins, "release with the same environment keeps them too: {err}");
    let (ok, err) = release(&[], &["vmbt-not-running"]);
    assert!(ok && err.contains("vmbt-not-running is not running"), "{err}");
    assert_eq!(g.pins(), pins, "release of another domain leaves this one: {err}");
    // Named, the domain's pins are given back whatever the setting (the README's
    // troubleshooting step, on a host whose settings keep pins on exit).
    let (ok, err) = release(&[("VM_BALANCER_KEEP_PINS_ON_EXIT", "true")], &[&g.name]);
    assert!(ok, "{err}");
    assert_eq!(g.pins(), original, "release NAME gives them back: {err}");
}

#[test]
fn a_restarted_agent_adopts_the_record_and_gives_back_the_original() {
    let _lab = lab();
    let (g, original, mut first) = pinned_by_agent("rel-adopt", GuestSpec::default(), &[]);
    first.kill9();
    // As if vCPU 1 had been confined to cpu 1 before the first agent pinned it (a 2-cpu lab
    // offers no other way to have a prior the next agent's pin does not start from), and
    // floating again now, so that the next agent pins it at once whatever the host's load.
    let rec = format!("<balancer><pin vcpu=\"0\" prior=\"{}\"/><pin vcpu=\"1\" prior=\"1\"/></balancer>", original[0]);
    virsh(&["metadata", &g.name, PINS_NS, "--key", "vmbpins", "--set", &rec, "--live"]).unwrap();
    g.pin(1, &original[1]);
    let mut second = Agent::start(FAST);
    let pinned = wait_for(Duration::from_secs(30), || all_single(&g.pins()));
    assert!(pinned, "the restarted agent pins vCPU 1: {:?}\nagent log:\n{}", g.pins(), second.log());
    let rec = record(&g).unwrap_or_default();
    assert!(rec.contains(&format!("<pin vcpu=\"0\" prior=\"{}\"/>", original[0])), "{rec}");
    assert!(rec.contains("<pin vcpu=\"1\" prior=\"1\"/>"), "the recorded prior is kept, not replaced: {rec}");
    let (st, _) = second.terminate();
    assert!(st.success());
    assert_eq!(g.pins(), vec![original[0].clone(), "1".to_string()], "log:\n{}", second.log());
    assert_eq!(record(&g), None);
}

#[test]
fn release_fails_when_libvirt_is_unreachable_and_keep_skips_it() {
    let run = |args: &[&str]| {
        Command::new(bin())
            .arg("release")
            .args(["--connect", "qemu+unix:///system?socket=/nonexistent/libvirt-sock"])
            .args(args)
            .env_remove("VM_BALANCER_KEEP_PINS_ON_EXIT")
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot connect"), "{err}");
    let out = run(&["--keep-pins-on-exit"]);
    assert!(out.status.success(), "keeping the pins needs no connection: {}", String::from_utf8_lossy(&out.stderr));
}
