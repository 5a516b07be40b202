//! End-to-end: the CPU balancer on real QEMU guests under a real libvirtd.

mod common;

use std::time::Duration;

use common::*;

const FAST: &[&str] = &["--quantum", "500ms", "--cooldown", "2s", "--smoothing", "1s", "--no-memory"];

fn distinct(pins: &[String]) -> bool {
    pins.len() >= 2 && pins.iter().all(|p| p.parse::<u32>().is_ok()) && pins[0] != pins[1]
}

#[test]
fn piled_up_busy_vcpus_get_spread() {
    let _lab = lab();
    let g = Guest::start("pile", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    g.pin(0, "0");
    g.pin(1, "0");
    assert_eq!(g.pins(), vec!["0", "0"]);
    // diagnose sees the pile-up and plans a move, without applying it. A few tries: while
    // something else loads the other cpu (seen in the lab: cpu 1 at 60% for a sample
    // interval), moving a busy vCPU there would flip the imbalance and rightly plans nothing.
    let mut before = serde_json::Value::Null;
    let planned = wait_for(Duration::from_secs(20), || {
        before = diagnose_json(&[]);
        before["plan"].as_array().unwrap().iter().any(|a| a["domain"] == g.name.as_str() && a["action"] == "pin")
    });
    assert!(planned, "diagnose plans a move: {before:#}");
    assert_eq!(g.pins(), vec!["0", "0"], "diagnose without --apply changes nothing");

    let mut agent = Agent::start(FAST);
    let spread = wait_for(Duration::from_secs(20), || distinct(&g.pins()));
    assert!(spread, "vCPUs still piled: {:?}\nagent log:\n{}", g.pins(), agent.log());
    assert!(
        agent.log().contains(&format!("of {} 0 -> 1", g.name)),
        "the move is logged with its reason:\n{}",
        agent.log()
    );

    // diagnose reports what libvirt says, and both vCPUs busy.
    let doc = diagnose_json(&[]);
    let dom = doc["domains"].as_array().unwrap().iter().find(|d| d["name"] == g.name.as_str()).expect("domain listed");
    let vcpus = dom["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2);
    let pinned: Vec<u64> = vcpus.iter().map(|v| v["pinned_to"][0].as_u64().unwrap()).collect();
    assert_ne!(pinned[0], pinned[1], "{dom:#}");
    let lib: Vec<u64> = g.pins().iter().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pinned, lib, "diagnose agrees with libvirt");
    for v in vcpus {
        assert!(v["usage"].as_f64().unwrap() > 0.6, "a burning vCPU alone on a core is busy: {v}");
    }
    let (st, _) = agent.terminate();
    assert!(st.success());
}

#[test]
fn excluded_and_opted_out_domains_are_not_touched() {
    let _lab = lab();
    let meta = r#"<vmb:balancer xmlns:vmb="https://vm-balancer.org/xmlns/1" manage="no"/>"#;
    let opted =
        Guest::start("optout", &GuestSpec { vcpus: 2, burn: 2, metadata: Some(meta.into()), ..GuestSpec::default() });
    let named = Guest::start("excl", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    for g in [&opted, &named] {
        g.pin(0, "0");
        g.pin(1, "0");
    }
    let doc = diagnose_json(&["--exclude", &named.name]);
    for (g, why) in [(&opted, "metadata"), (&named, "--exclude")] {
        let d = doc["domains"].as_array().unwrap().iter().find(|d| d["name"] == g.name.as_str()).unwrap();
        assert_eq!(d["excluded"], true, "{d:#}");
        assert!(d["excluded_why"].as_str().unwrap().contains(why), "{d:#}");
    }
    assert!(doc["plan"].as_array().unwrap().is_empty(), "nothing to plan: {:#}", doc["plan"]);
    let mut args = FAST.to_vec();
    args.extend(["--exclude", named.name.as_str()]);
    let mut agent = Agent::start(&args);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(opted.pins(), vec!["0", "0"], "agent log:\n{}", agent.log());
    assert_eq!(named.pins(), vec!["0", "0"], "agent log:\n{}", agent.log());
    assert!(agent.alive());
}

#[test]
fn procfs_rates_agree_with_libvirt_vcpu_stats() {
    let _lab = lab();
    let g = Guest::start("xcheck", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    g.pin(0, "0");
    g.pin(1, "0");
    std::thread::sleep(Duration::from_secs(1));
    let read = || {
        let s = g.domstats(&["--vcpu"]);
        let get = |k: &str| s.iter().find(|(n, _)| n == k).and_then(|(_, v)| v.parse::<u64>().ok()).unwrap();
        [get("vcpu.0.time"), get("vcpu.0.delay"), get("vcpu.1.time"), get("vcpu.1.delay")]
    };
    // libvirt over 3 s, and diagnose (procfs schedstat) over a 3 s window inside it.
    let a = read();
    let t = std::time::Instant::now();
    let out = std::process::Command::new(bin())
        .args(["diagnose", "--json", "--interval", "3s", "--smoothing", "1ms", "--no-memory"])
        .output()
        .unwrap();
    let b = read();
    #[allow(clippy::cast_precision_loss)]
    let wall = t.elapsed().as_nanos() as f64;
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = doc["domains"].as_array().unwrap().iter().find(|d| d["name"] == g.name.as_str()).unwrap();
    for v in 0..2usize {
        #[allow(clippy::cast_precision_loss)]
        let lib_usage = (b[2 * v] - a[2 * v]) as f64 / wall;
        #[allow(clippy::cast_precision_loss)]
        let lib_delay = (b[2 * v + 1] - a[2 * v + 1]) as f64 / wall;
        let ours = &d["vcpus"][v];
        let (u, dl) = (ours["usage"].as_f64().unwrap(), ours["delay"].as_f64().unwrap());
        // Two burners share one core: about half each, waiting the other half.
        assert!((u - lib_usage).abs() < 0.12, "vCPU {v}: usage {u:.3} vs libvirt {lib_usage:.3}");
        assert!((dl - lib_delay).abs() < 0.12, "vCPU {v}: delay {dl:.3} vs libvirt {lib_delay:.3}");
        assert!(u > 0.3 && dl > 0.3, "vCPU {v}: usage {u:.3}, delay {dl:.3}");
    }
}

#[test]
fn survives_libvirtd_restart_and_resumes() {
    let _lab = lab();
    let g = Guest::start("restart", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    // -v: a failure shows the loads the agent saw.
    let mut args = FAST.to_vec();
    args.push("-v");
    let mut agent = Agent::start(&args);
    g.pin(0, "0");
    g.pin(1, "0");
    assert!(wait_for(Duration::from_secs(20), || distinct(&g.pins())), "first spread\n{}", agent.log());

    // libvirtd goes away for several quanta, then comes back.
    let st = std::process::Command::new("pkill").args(["-x", "libvirtd"]).status().unwrap();
    assert!(st.success());
    assert!(wait_for(Duration::from_secs(10), || virsh(&["version"]).is_err()));
    std::thread::sleep(Duration::from_secs(4));
    assert!(agent.alive(), "agent died without libvirtd:\n{}", agent.log());
    let st = std::process::Command::new("libvirtd").arg("-d").status().unwrap();
    assert!(st.success());
    assert!(wait_for(Duration::from_secs(30), || virsh(&["version"]).is_ok()), "libvirtd came back");
    assert!(wait_for(Duration::from_secs(10), || virsh(&["domstate", &g.name]).is_ok_and(|s| s.contains("running"))));

    // Pile up again: the agent must see it through its new connection.
    g.pin(0, "0");
    g.pin(1, "0");
    let ok = wait_for(Duration::from_secs(30), || distinct(&g.pins()));
    let log = agent.log();
    assert!(ok, "not rebalanced after the restart: {:?}\n{log}", g.pins());
    assert!(log.contains("connection is back"), "{log}");
    // One outage, logged once (the loss and the first failed reconnect), not once per quantum.
    let warns = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(warns <= 3, "outage logged {warns} times:\n{log}");
    // The new connection has its domain events again: a live opt-out is seen well before the
    // safety cadence (150 s at this quantum) would read the definition again.
    opt_out_live(&g.name);
    let seen = wait_for(Duration::from_secs(10), || agent.log().contains("opt-outs changed"));
    assert!(seen, "no event after the reconnect?\n{}", agent.log());
    let (st, _) = agent.terminate();
    assert!(st.success());
}

#[test]
fn vanishing_domain_is_skipped_and_sigterm_exits_cleanly() {
    let _lab = lab();
    let keep = Guest::start("keep", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    let mut agent = Agent::start(&["--quantum", "300ms", "--no-memory", "--cooldown", "1s", "-v"]);
    // Guests that vanish at every stage: during discovery, between two samples, after a plan.
    for ms in [150, 400, 900, 1500, 2500] {
        let gone = Guest::create("gone", &GuestSpec { vcpus: 2, burn: 1, ..GuestSpec::default() });
        std::thread::sleep(Duration::from_millis(ms));
        drop(gone);
    }
    assert!(agent.alive(), "agent died:\n{}", agent.log());
    keep.pin(0, "0");
    keep.pin(1, "0");
    assert!(wait_for(Duration::from_secs(20), || distinct(&keep.pins())), "{}", agent.log());
    let (st, took) = agent.terminate();
    assert!(st.success(), "exit status {st:?}");
    // Within one quantum plus process teardown: generous bound, the point is "not hanging".
    assert!(took < Duration::from_secs(3), "SIGTERM took {took:?}");
    assert!(!agent.log().contains("panicked"));
}

#[test]
fn dry_run_changes_nothing_and_diagnose_apply_applies_once() {
    let _lab = lab();
    let g = Guest::start("dry", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    g.pin(0, "0");
    g.pin(1, "0");
    let mut args = FAST.to_vec();
    args.extend(["--dry-run", "-v"]);
    let mut agent = Agent::start(&args);
    // Wait for the plan rather than a fixed time: on a busy CI machine the first quanta may
    // see the other cpu loaded too (the debug log then shows the loads it saw).
    let planned = wait_for(Duration::from_secs(20), || agent.log().contains("dry run, would pin"));
    assert!(planned, "no plan logged:\n{}", agent.log());
    // Several more quanta of the same plan, still nothing applied.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(g.pins(), vec!["0", "0"], "dry run changed a pin:\n{}", agent.log());
    assert!(agent.log().matches("dry run, would pin").count() >= 2, "{}", agent.log());
    let (st, _) = agent.terminate();
    assert!(st.success());

    // One diagnose --apply spreads the pile-up; a second sample interval if the first one saw
    // nothing to do (the planner only moves when a cpu is over its threshold). Its reader gone
    // (`diagnose --apply | true`), it applies all the same.
    let mut outputs = Vec::new();
    for _ in 0..3 {
        let mut child = std::process::Command::new(bin())
            .args(["diagnose", "--apply", "--interval", "1s", "--no-memory", "-v"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        outputs.push(String::from_utf8_lossy(&out.stderr).into_owned());
        if distinct(&g.pins()) {
            break;
        }
    }
    assert!(distinct(&g.pins()), "diagnose --apply did not spread: {:?}\n{}", g.pins(), outputs.join("\n"));
}

#[test]
fn persistent_pins_chosen_by_an_administrator_are_kept() {
    let _lab = lab();
    let pins = "<vcpupin vcpu='0' cpuset='0'/><vcpupin vcpu='1' cpuset='0'/>";
    let g =
        Guest::start("adminpin", &GuestSpec { vcpus: 2, burn: 2, cputune: Some(pins.into()), ..GuestSpec::default() });
    assert_eq!(g.pins(), vec!["0", "0"]);
    let doc = diagnose_json(&["--no-memory"]);
    let d = doc["domains"].as_array().unwrap().iter().find(|d| d["name"] == g.name.as_str()).unwrap();
    assert_eq!(d["excluded"], true, "{d:#}");
    assert!(d["excluded_why"].as_str().unwrap().contains("persistent definition"), "{d:#}");
    let mut agent = Agent::start(FAST);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(g.pins(), vec!["0", "0"], "an administrator's pins were moved:\n{}", agent.log());
    assert!(agent.alive());
}

#[test]
fn a_transient_guests_vcpu_cpuset_is_an_administrators_choice_too() {
    // `virsh create` (oVirt's VDSM starts every guest so): no persistent definition to read
    // the choice from; the live one says it.
    let _lab = lab();
    let spec = GuestSpec { vcpus: 2, burn: 2, vcpu_attrs: " cpuset='0'".into(), ..GuestSpec::default() };
    let g = Guest::start("transcpuset", &spec);
    assert_eq!(g.pins(), vec!["0", "0"]);
    let doc = diagnose_json(&["--no-memory"]);
    let d = doc["domains"].as_array().unwrap().iter().find(|d| d["name"] == g.name.as_str()).unwrap();
    assert_eq!(d["excluded"], true, "{d:#}");
    assert_eq!(d["excluded_why"], "transient definition sets <vcpu cpuset>", "{d:#}");
    let mut agent = Agent::start(FAST);
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(g.pins(), vec!["0", "0"], "an administrator's cpuset was left:\n{}", agent.log());
    assert!(agent.alive());
}

/// The lab's cpus sharing cpu `c`'s last-level cache, as `virsh vcpupin` prints a set (`0-1`):
/// its sysfs `cache/index3`, or the whole package where no level-3 cache is described.
fn llc_of(c: u32) -> String {
    let read = |f: &str| std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{c}/{f}"));
    let list = read("cache/index3/shared_cpu_list").or_else(|_| read("topology/package_cpus_list"));
    list.map(|s| s.trim().to_string()).unwrap_or_else(|_| "0-1".into())
}

/// A JSON cpu list (`[0, 1]`) as `virsh` prints it (`0-1`).
fn json_cpu_list(cpus: &[serde_json::Value]) -> String {
    let ids: Vec<u32> = cpus.iter().map(|c| u32::try_from(c.as_u64().unwrap()).unwrap()).collect();
    vm_balancer::cpulist::format(&ids)
}

#[test]
fn at_llc_granularity_vcpus_are_pinned_to_their_cache_domain_and_given_back_after_a_crash() {
    let _lab = lab();
    // The lab's two cpus share one L3 here (one group, `0-1`); on a machine where they do not,
    // each is a group of its own and the two busy vCPUs go one to each.
    let (llc0, llc1) = (llc_of(0), llc_of(1));
    let g = Guest::start("llc", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    g.pin(0, "0");
    g.pin(1, "0");
    // diagnose shows the groups the vCPUs would be pinned to.
    let doc = diagnose_json(&["--pin-granularity", "llc"]);
    assert_eq!(doc["host"]["pin_granularity"], "llc");
    let groups: Vec<String> =
        doc["host"]["pin_groups"].as_array().unwrap().iter().map(|g| json_cpu_list(g.as_array().unwrap())).collect();
    let mut want_groups = vec![llc0.clone(), llc1.clone()];
    want_groups.dedup();
    assert_eq!(groups, want_groups, "{doc:#}");
    let mut agent = Agent::start(&[FAST, &["--pin-granularity", "llc"]].concat());
    let want = |pins: &[String]| {
        if llc0 == llc1 {
            pins == [llc0.clone(), llc0.clone()]
        } else {
            distinct(pins) && pins.iter().all(|p| *p == llc0 || *p == llc1)
        }
    };
    // vCPUs on one cpu: placed again, on whole LLC domains.
    let grouped = wait_for(Duration::from_secs(20), || want(&g.pins()));
    assert!(grouped, "pins {:?}, LLCs {llc0} and {llc1}:\n{}", g.pins(), agent.log());
    if llc0 == llc1 {
        assert!(agent.log().contains(&format!("cpus {llc0}")), "the reason names the group:\n{}", agent.log());
    }
    // Steady: nothing moves again.
    let placed = g.pins();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(g.pins(), placed);
    // The record says at which granularity the pins were made.
    let rec = virsh(&["metadata", &g.name, "https://vm-balancer.org/xmlns/1/pins", "--live"]).unwrap();
    assert_eq!(rec.matches("granularity=\"llc\"").count(), 2, "{rec}");
    // A crash, then `release` with the settings back at `cpu`: it gives back what the vCPUs
    // had before all the same (the record says a set inside one LLC is the agent's).
    agent.kill9();
    let out = std::process::Command::new(bin())
        .args(["release", "--pin-granularity", "cpu"])
        .env_remove("VM_BALANCER_PIN_GRANULARITY")
        .env_remove("VM_BALANCER_KEEP_PINS_ON_EXIT")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(g.pins(), vec!["0", "0"], "{}", String::from_utf8_lossy(&out.stderr));
}
