//! End-to-end: consolidation (`--consolidate`) on real QEMU guests under a real libvirtd. Three
//! idle guests spread over the lab's two cpus are packed onto one; libvirt's pins, the metrics
//! and `diagnose` (JSON and table) then show one cpu with no vCPU. Other work on the lab's cpus
//! counts in their load: on a machine whose cpus other processes keep busy, nothing is packed.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::*;

const FAST: &[&str] = &["--quantum", "500ms", "--cooldown", "2s", "--smoothing", "1s", "--no-memory"];

/// The body of `GET /metrics` on loopback, or the error.
fn scrape(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).ok_or_else(|| "no header end".into())
}

/// The value of one sample line (`name{labels} value`) of a text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn free_cpus(doc: &serde_json::Value, key: &str) -> Vec<u64> {
    doc[key].as_array().unwrap_or_else(|| panic!("{key} in {doc:#}")).iter().map(|c| c.as_u64().unwrap()).collect()
}

#[test]
fn idle_guests_spread_over_both_cpus_are_packed_onto_one() {
    let _lab = lab();
    let guests: Vec<Guest> = (0..3).map(|_| Guest::start("idle", &GuestSpec::default())).collect();
    guests[0].pin(0, "0");
    guests[1].pin(0, "0");
    guests[2].pin(0, "1");
    let pins = || guests.iter().map(|g| g.pins()[0].clone()).collect::<Vec<_>>();
    assert_eq!(pins(), ["0", "0", "1"]);

    // Spread: no cpu is free now; with --consolidate, diagnose plans the packing (applying
    // nothing). A few tries: while other work loads a cpu, packing onto it would not fit.
    let mut doc = serde_json::Value::Null;
    let planned = wait_for(Duration::from_secs(30), || {
        doc = diagnose_json(&["--no-memory", "--consolidate"]);
        doc["plan"].as_array().unwrap().iter().any(|a| a["kind"] == "consolidate")
    });
    assert!(free_cpus(&doc, "free_cpus").is_empty(), "{doc:#}");
    assert!(
        planned,
        "diagnose --consolidate plans no consolidation (cpu busy {}: a cpu that other work keeps busy takes no vCPU): {doc:#}",
        doc["host"]["cpu_busy"]
    );
    assert_eq!(free_cpus(&doc, "free_cpus_after_plan").len(), 1, "{doc:#}");
    assert_eq!(pins(), ["0", "0", "1"], "diagnose without --apply changes nothing");

    // The agent, consolidation on through its environment variable.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = FAST.to_vec();
    args.extend(["--metrics-listen", listen.as_str()]);
    let mut agent = Agent::start_with_env(&args, &[("VM_BALANCER_CONSOLIDATE".into(), "true".into())]);
    let packed = wait_for(Duration::from_secs(60), || {
        let p = pins();
        p.iter().all(|c| c.parse::<u32>().is_ok() && *c == p[0])
    });
    assert!(packed, "not packed: {:?}\nagent log:\n{}", pins(), agent.log());
    let on = pins()[0].clone();
    assert!(agent.log().contains("consolidate: "), "the move is logged with its reason:\n{}", agent.log());

    // The metrics: one free cpu, consolidation moves counted under their own kind.
    let mut text = String::new();
    let seen = wait_for(Duration::from_secs(10), || {
        text = scrape(port).unwrap_or_default();
        sample(&text, "vm_balancer_free_cpus") == Some(1.0)
    });
    assert!(seen, "vm_balancer_free_cpus:\n{text}");
    let moves = sample(&text, "vm_balancer_repins_total{kind=\"consolidate\"}").unwrap_or(0.0);
    assert!(moves >= 1.0, "{text}");

    // diagnose (JSON and table) agrees: the other cpu holds no vCPU.
    let doc = diagnose_json(&["--no-memory"]);
    let other: u64 = if on == "0" { 1 } else { 0 };
    assert_eq!(free_cpus(&doc, "free_cpus"), vec![other], "{doc:#}");
    let out = std::process::Command::new(bin()).args(["diagnose", "--interval", "1s", "--no-memory"]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(&format!("free cpus (no vCPU pinned there): 1 ({other})")), "{table}");

    // And it stays packed: no ping-pong with the balancer.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(pins(), [on.as_str(); 3], "agent log:\n{}", agent.log());
    let (st, _) = agent.terminate();
    assert!(st.success());
}
