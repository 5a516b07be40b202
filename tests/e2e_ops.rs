//! End-to-end: what an operator does to a running agent, on real QEMU guests under a real
//! libvirtd: the shipped settings file with every line in force, `--cpus`, a live opt-out,
//! a closed pipe, the systemd notifications a `Type=notify` unit relies on, and the docs' cost
//! measurement script (`lab/cost.sh`).

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const FAST: &[&str] = &["--quantum", "500ms", "--cooldown", "2s", "--smoothing", "1s", "--no-memory"];

/// Every `VM_BALANCER_*` line of the shipped `/etc/default/vm-balancer`, uncommented.
fn shipped_settings() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/vm-balancer.default")).unwrap();
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches('#').split_once('='))
        .filter(|(k, _)| k.starts_with("VM_BALANCER_") && !k.contains(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn every_shipped_setting_runs() {
    let _lab = lab();
    let settings = shipped_settings();
    // The example lists every variable of `run --help`.
    let help = Command::new(bin()).args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    // (except the one naming the settings file itself).
    for var in help.split("[env: ").skip(1).filter_map(|s| s.split('=').next()).filter(|v| *v != "VM_BALANCER_CONFIG") {
        assert!(settings.iter().any(|(k, _)| k == var), "{var} is missing from systemd/vm-balancer.default");
    }
    assert!(settings.iter().any(|(k, v)| k == "VM_BALANCER_CPUS" && v == "2-63"), "{settings:?}");
    let g = Guest::start("settings", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    let mut agent = Agent::start_with_env(&[], &settings);
    // A few quanta of the shipped 2 s quantum.
    std::thread::sleep(Duration::from_secs(7));
    let log = agent.log();
    assert!(agent.alive(), "the agent died with the shipped settings:\n{log}");
    assert!(log.contains("dry run") && !log.contains("panicked"), "{log}");
    let (st, _) = agent.terminate();
    assert!(st.success(), "{st:?}\n{}", agent.log());
    assert!(g.pins().iter().all(|p| p.contains('-') || p.contains(',')), "dry run pinned nothing: {:?}", g.pins());
}

#[test]
fn cpus_restricts_placements_to_that_set() {
    let _lab = lab();
    let g = Guest::start("cpus", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    assert!(g.pins().iter().all(|p| p == "0-1"), "floating at first: {:?}", g.pins());
    let mut args = FAST.to_vec();
    args.extend(["--cpus", "1"]);
    let mut agent = Agent::start(&args);
    let placed = wait_for(Duration::from_secs(20), || g.pins() == ["1", "1"]);
    assert!(placed, "placed outside --cpus 1: {:?}\n{}", g.pins(), agent.log());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(g.pins(), ["1", "1"], "{}", agent.log());
    let (st, _) = agent.terminate();
    assert!(st.success());
}

#[test]
fn a_live_opt_out_is_honoured_without_a_restart() {
    let _lab = lab();
    let g = Guest::start("liveopt", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    let mut args = FAST.to_vec();
    args.push("-v");
    let mut agent = Agent::start(&args);
    g.pin(0, "0");
    g.pin(1, "0");
    let spread = wait_for(Duration::from_secs(20), || {
        let p = g.pins();
        p.len() == 2 && p[0] != p[1]
    });
    assert!(spread, "the agent balances the guest first: {:?}\n{}", g.pins(), agent.log());
    // The README's own command, on the running guest.
    opt_out_live(&g.name);
    // libvirt's metadata-change event has the agent read the definition again at once; without
    // it, the safety cadence (150 s at this quantum) would be too late for this wait.
    let seen = wait_for(Duration::from_secs(10), || agent.log().contains("opt-outs changed"));
    assert!(seen, "{}", agent.log());
    g.pin(0, "0");
    g.pin(1, "0");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(g.pins(), ["0", "0"], "an opted-out guest was moved:\n{}", agent.log());
    assert!(agent.alive());
}

#[test]
fn diagnose_into_a_closed_pipe_ends_quietly() {
    let _lab = lab();
    let _g = Guest::start("pipe", &GuestSpec::default());
    // `vm-balancer diagnose --json | head -c 0`: the reader is gone before diagnose writes.
    assert_quiet_into_closed_pipe(&["diagnose", "--json", "--interval", "500ms"]);
}

#[test]
fn systemd_gets_ready_watchdog_and_status() {
    let _lab = lab();
    let _g = Guest::start("notify", &GuestSpec::default());
    // Playing systemd: a 1 s watchdog, while the quantum is 2 s.
    let systemd = NotifySocket::new(1_000_000);
    let mut agent = Agent::start_with_env(&["--quantum", "2s", "--no-memory"], &systemd.env);
    let msgs = systemd.receive_for(Duration::from_secs(7));
    let (st, _) = agent.terminate();
    assert!(st.success());
    let all: Vec<&str> = msgs.iter().flat_map(|(_, m)| m.lines()).collect();
    assert_eq!(all.iter().filter(|l| **l == "READY=1").count(), 1, "{msgs:?}");
    assert!(all.iter().any(|l| l.starts_with("STATUS=") && l.contains("domains")), "{msgs:?}");
    // Pinged at least twice per watchdog period, though a quantum is twice as long.
    let pings: Vec<Duration> =
        msgs.iter().filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1")).map(|(t, _)| *t).collect();
    assert!(pings.len() >= 10, "{} pings in 7 s: {msgs:?}", pings.len());
    let gaps = pings.windows(2).map(|w| w[1] - w[0]);
    assert!(gaps.clone().all(|g| g < Duration::from_millis(1000)), "{:?}", gaps.collect::<Vec<_>>());
}

#[test]
fn the_agent_needs_no_capabilities() {
    let _lab = lab();
    let g = Guest::start("nocaps", &GuestSpec { vcpus: 2, burn: 1, ..GuestSpec::default() });
    // What the unit's empty CapabilityBoundingSet= gives the service: root without capabilities.
    let out = Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all", "--"])
        .arg(bin())
        .args(["diagnose", "--json", "--interval", "1s", "--no-memory"])
        .output()
        .expect("setpriv (util-linux)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = doc["domains"].as_array().unwrap().iter().find(|d| d["name"] == g.name.as_str()).expect("listed");
    let vcpus = d["vcpus"].as_array().unwrap();
    assert_eq!(vcpus.len(), 2, "{d:#}");
    // schedstat, affinity and the busy vCPU's usage were all read.
    assert!(vcpus.iter().all(|v| v["usage"].is_number() && v["pinned_to"].is_array()), "{d:#}");
    assert!(vcpus.iter().any(|v| v["usage"].as_f64().unwrap() > 0.3), "{d:#}");
}

/// The settings of the reload tests besides the line each changes: fast, CPU only.
const RELOAD_SETTINGS: &str = "VM_BALANCER_QUANTUM=500ms\nVM_BALANCER_NO_MEMORY=true\nVM_BALANCER_SMOOTHING=1s\n";

#[test]
fn sighup_applies_a_changed_settings_file() {
    let _lab = lab();
    let g = Guest::start("hup", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm-balancer");
    let settings = RELOAD_SETTINGS;
    std::fs::write(&path, format!("{settings}VM_BALANCER_CPUS=0-1\n")).unwrap();
    let mut agent = Agent::start(&["--config", path.to_str().unwrap()]);
    let placed = wait_for(Duration::from_secs(20), || g.pins().iter().all(|p| p == "0" || p == "1"));
    assert!(placed, "{:?}\n{}", g.pins(), agent.log());
    // cpu 0 is taken away: its vCPUs are placed again, on cpu 1, without a restart.
    std::fs::write(&path, format!("{settings}VM_BALANCER_CPUS=1\n")).unwrap();
    agent.reload();
    let moved = wait_for(Duration::from_secs(20), || g.pins() == ["1", "1"]);
    assert!(moved, "{:?}\n{}", g.pins(), agent.log());
    assert!(agent.log().contains("settings reloaded: cpus"), "{}", agent.log());
    // A bad file keeps the settings in force.
    std::fs::write(&path, "VM_BALANCER_QUANTUM=soon\n").unwrap();
    agent.reload();
    let kept = wait_for(Duration::from_secs(10), || agent.log().contains("keeping the current settings"));
    assert!(kept, "{}", agent.log());
    assert!(agent.log().contains(":1: VM_BALANCER_QUANTUM"), "the bad line is named: {}", agent.log());
    // So does a file caught empty while being rewritten: not "every default" (cpus 0-1 again).
    std::fs::write(&path, "").unwrap();
    agent.reload();
    let kept = wait_for(Duration::from_secs(10), || agent.log().contains("is empty (being written?)"));
    assert!(kept, "{}", agent.log());
    std::thread::sleep(Duration::from_secs(2));
    assert!(agent.alive());
    assert_eq!(g.pins(), ["1", "1"], "{}", agent.log());
}

/// The environment the shipped unit starts the agent with: the `Environment=` lines and the
/// entries of each `EnvironmentFile=` (the settings file read from `settings` instead).
fn unit_environment(settings: &std::path::Path) -> Vec<(String, String)> {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/vm-balancer.service")).unwrap();
    let pairs = |text: &str| -> Vec<(String, String)> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect()
    };
    let mut env = Vec::new();
    for line in unit.lines().map(str::trim) {
        if let Some(file) = line.strip_prefix("EnvironmentFile=") {
            let file = file.trim_start_matches('-');
            let path = if file == "/etc/default/vm-balancer" { settings.to_path_buf() } else { file.into() };
            env.extend(pairs(&std::fs::read_to_string(path).unwrap_or_default()));
        } else if let Some(kv) = line.strip_prefix("Environment=") {
            env.extend(pairs(kv));
        }
    }
    env
}

#[test]
fn going_live_as_the_readme_says_takes_a_changed_file_and_a_reload() {
    let _lab = lab();
    let g = Guest::start("live", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm-balancer");
    let settings = RELOAD_SETTINGS;
    // Installed: the shipped file says dry run. Started the way the unit starts it.
    std::fs::write(&path, format!("{settings}VM_BALANCER_DRY_RUN=true\n")).unwrap();
    let before = g.pins();
    let agent = Agent::start_with_env(&["--config", path.to_str().unwrap()], &unit_environment(&path));
    let planned = wait_for(Duration::from_secs(20), || agent.log().contains("dry run, would"));
    assert!(planned, "{}", agent.log());
    assert_eq!(g.pins(), before, "nothing pinned in dry run\n{}", agent.log());
    // The README's go-live step: VM_BALANCER_DRY_RUN=false in the file, `systemctl reload`.
    std::fs::write(&path, format!("{settings}VM_BALANCER_DRY_RUN=false\n")).unwrap();
    agent.reload();
    let pinned = wait_for(Duration::from_secs(20), || g.pins().iter().all(|p| !p.contains(['-', ','])));
    assert!(pinned, "still not pinned after the reload: {:?}\n{}", g.pins(), agent.log());
    assert!(agent.log().contains("settings reloaded: dry_run"), "{}", agent.log());
}

#[test]
fn the_cost_script_of_the_docs_measures_and_cleans_up() {
    let _lab = lab();
    // docs/design.md's figures come from `bash lab/cost.sh`; here with 3 guests and short
    // windows: it prints its one line and leaves no guest behind.
    let out = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/lab/cost.sh"))
        .arg("--no-memory")
        .envs([("N", "3"), ("SETTLE", "3"), ("MEASURE", "4"), ("IDLE", "1")])
        .env("BIN", bin())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line = stdout.lines().last().unwrap_or_default();
    let ms = line
        .strip_prefix("3 guests, args [--no-memory]: agent ")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|x| x.parse::<f64>().ok());
    assert!(ms.is_some_and(|ms| ms >= 0.0), "{line}");
    let left = virsh(&["list", "--all", "--name"]).unwrap();
    assert!(!left.contains("vmbt-cost-"), "{left}");
}
