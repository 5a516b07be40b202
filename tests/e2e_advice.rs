//! End-to-end: the capacity advice on real QEMU guests under a real libvirtd. An overloaded lab
//! host (three busy one-vCPU guests on its two cpus) gets a migrate advice in `diagnose --json`
//! and in the daemon's log; an idle one gets none and has capacity to spare.

mod common;

use std::time::Duration;

use common::*;

/// The domains `diagnose --json` advises to migrate.
fn advised(doc: &serde_json::Value) -> Vec<String> {
    doc["advice"]
        .as_array()
        .expect("an advice list")
        .iter()
        .filter(|a| a["action"] == "migrate")
        .map(|a| a["domain"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_overloaded_lab_host_is_advised_to_migrate_a_guest_that_is_not_excluded() {
    let _lab = lab();
    let spec = GuestSpec { vcpus: 1, burn: 1, ..GuestSpec::default() };
    let guests: Vec<Guest> = (0..3).map(|_| Guest::start("busy", &spec)).collect();
    let names: Vec<&str> = guests.iter().map(|g| g.name.as_str()).collect();

    // diagnose judges the condition over its own interval: three cores of demand against the
    // 1.5 that --high 0.75 allows on two cpus.
    let mut doc = serde_json::Value::Null;
    let seen = wait_for(Duration::from_secs(30), || {
        doc = diagnose_json(&["--no-memory"]);
        advised(&doc).iter().any(|d| names.contains(&d.as_str()))
    });
    assert!(seen, "a migrate advice naming one of {names:?}: {doc:#}");
    assert_eq!(advised(&doc).len(), 1, "{:#}", doc["advice"]);
    let reason = doc["advice"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("above the") && reason.contains("seen over diagnose's"), "{reason}");
    assert_eq!(doc["spare"]["cpu_cores"].as_f64(), Some(0.0), "an overloaded host has no cpu to spare: {doc:#}");

    // Two of the three excluded: only the third may be named.
    let excluded = format!("{},{}", names[0], names[1]);
    let seen = wait_for(Duration::from_secs(30), || {
        doc = diagnose_json(&["--no-memory", "--exclude", &excluded]);
        !advised(&doc).is_empty()
    });
    assert!(seen, "advice with two guests excluded: {doc:#}");
    assert_eq!(advised(&doc), vec![names[2].to_string()], "{:#}", doc["advice"]);

    // The daemon waits --overload-window, then logs the advice once.
    let mut agent = Agent::start(&["--dry-run", "--quantum", "500ms", "--no-memory", "--overload-window", "3s"]);
    let logged = wait_for(Duration::from_secs(30), || agent.log().contains("capacity advice: migrate"));
    assert!(logged, "agent log:\n{}", agent.log());
    std::thread::sleep(Duration::from_secs(3));
    let log = agent.log();
    assert_eq!(log.matches("capacity advice: migrate").count(), 1, "logged once while it lasts:\n{log}");
    assert!(log.contains("overloaded for") && log.contains("--overload-window 3s"), "{log}");
    let (st, _) = agent.terminate();
    assert!(st.success());
}

#[test]
fn an_idle_lab_host_gets_no_advice_and_has_capacity_to_spare() {
    let _lab = lab();
    let g = Guest::start("idle", &GuestSpec::default());
    std::thread::sleep(Duration::from_secs(2));
    let doc = diagnose_json(&[]);
    assert!(doc["domains"].as_array().unwrap().iter().any(|d| d["name"] == g.name.as_str()), "{doc:#}");
    assert!(advised(&doc).is_empty(), "an idle guest is never worth migrating: {:#}", doc["advice"]);
    let spare_cpu = doc["spare"]["cpu_cores"].as_f64().unwrap();
    let spare_mem = doc["spare"]["mem_kib"].as_u64().unwrap();
    assert!(spare_mem > 0, "the lab host has memory above its reserve: {doc:#}");
    // The spare cores are what --high allows on the cpus less their load; with an idle guest
    // that load is the host's own (other processes on this machine included).
    let busy: f64 = doc["host"]["cpu_busy"].as_array().unwrap().iter().map(|b| b.as_f64().unwrap()).sum();
    let cpus = doc["host"]["cpus"].as_array().unwrap().len();
    #[allow(clippy::cast_precision_loss)]
    let expected = (0.75 * cpus as f64 - busy).max(0.0);
    assert!((spare_cpu - expected).abs() < 0.15, "spare {spare_cpu} vs {expected} (cpus busy {busy}): {doc:#}");
    if busy < 1.0 {
        assert!(spare_cpu > 0.4, "a host with an idle guest has cores to spare: {doc:#}");
    }
}
