//! Flags: bad values give one clear line naming the flag and exit code 2; environment variables
//! are read. No hypervisor needed.

mod common;

use std::process::Command;

fn vmb(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vm-balancer"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

#[test]
fn bad_flags_exit_2_with_the_flag_named() {
    for (args, flag) in [
        (vec!["run", "--quantum", "5ms"], "--quantum"),
        (vec!["run", "--quantum", "soon"], "--quantum"),
        (vec!["run", "--cpus", "3-1"], "--cpus"),
        (vec!["run", "--high", "1.5"], "--high"),
        (vec!["run", "--delay-margin", "2"], "--delay-margin"),
        (vec!["run", "--max-repins=-1"], "--max-repins"),
        (vec!["run", "--max-repins", "99999"], "--max-repins"),
        (vec!["diagnose", "--guest-floor", "12"], "--guest-floor"),
        (vec!["run", "--host-reserve", "lots"], "--host-reserve"),
        (vec!["run", "--metrics-listen", "nowhere:9848"], "--metrics-listen"),
        (vec!["run", "--metrics-listen", "127.0.0.1:0"], "--metrics-listen"),
        // Only the daemon serves metrics; a one-shot command does not pretend to.
        (vec!["diagnose", "--metrics-listen", "127.0.0.1:9848"], "--metrics-listen"),
        (vec!["simulate", "--metrics-listen", "127.0.0.1:9848"], "--metrics-listen"),
        (vec!["run", "--overload-window", "25h"], "--overload-window"),
        (vec!["diagnose", "--overload-window", "soon"], "--overload-window"),
        (vec!["run", "--bogus"], "--bogus"),
        (vec!["run", "--emulator-cpus", "none"], "--emulator-cpus"),
        // Not a cpu of this host (nor of a simulated 4-cpu one).
        (vec!["run", "--emulator-cpus", "0,4095"], "--emulator-cpus"),
        (vec!["diagnose", "--emulator-cpus", "4095"], "--emulator-cpus"),
        (vec!["simulate", "--host-cpus", "4", "--emulator-cpus", "2-4"], "--emulator-cpus"),
        (vec!["run", "--repack-schedule", "0 3 * *"], "--repack-schedule"),
        (vec!["run", "--repack-schedule", "0 25 * * *"], "--repack-schedule"),
        (vec!["diagnose", "--repack-schedule", "TZ=Mars/Olympus 0 3 * * *"], "--repack-schedule"),
        (vec!["run", "--repack-schedule", "0 0 30 2 *"], "--repack-schedule"),
        (vec!["run", "--repack-min-gain", "65"], "--repack-min-gain"),
        (vec!["run", "--pin-granularity", "thread"], "--pin-granularity"),
        (vec!["run", "--pin-granularity", "core", "--consolidate"], "--pin-granularity"),
        (vec!["diagnose", "--pin-granularity", "llc", "--repack"], "--pin-granularity"),
        (vec!["simulate", "--pin-granularity", "llc", "--repack-schedule", "0 3 * * *"], "--pin-granularity"),
    ] {
        let out = vmb(&args, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} should name {flag}: {err}");
    }
}

#[test]
fn out_of_range_message_gives_the_range() {
    let out = vmb(&["run", "--quantum", "2h"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("allowed 100ms to 1h"), "{err}");
}

#[test]
fn environment_variables_are_read() {
    let out = vmb(&["run"], &[("VM_BALANCER_QUANTUM", "1ms")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--quantum"));
    let out = vmb(&["run"], &[("VM_BALANCER_STARVE_BELOW", "0.5"), ("VM_BALANCER_RECLAIM_ABOVE", "0.2")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--starve-below"));
    let out = vmb(&["run"], &[("VM_BALANCER_REPACK_SCHEDULE", "every night")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--repack-schedule") && err.contains("not a cron expression"), "{err}");
    let out = vmb(&["run"], &[("VM_BALANCER_OVERLOAD_WINDOW", "-5m")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--overload-window"));
    let out = vmb(&["run"], &[("VM_BALANCER_EMULATOR_CPUS", "4095")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--emulator-cpus 4095: 4095 not among the host's cpus"));
    let out = vmb(&["run"], &[("VM_BALANCER_DELAY_MARGIN", "-0.1")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--delay-margin"));
}

#[test]
fn unreachable_hypervisor_is_a_clear_error_for_diagnose() {
    let out =
        vmb(&["diagnose", "--connect", "qemu+unix:///system?socket=/nonexistent/sock", "--interval", "100ms"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}

#[test]
fn a_good_repack_schedule_is_accepted() {
    // Parsed (no exit 2); then diagnose --repack fails only on the missing hypervisor.
    let uri = "qemu+unix:///system?socket=/nonexistent/sock";
    for sched in ["0 3 * * *", "TZ=Europe/Amsterdam 0 3 * * 1-5", "*/15 * * * MON-FRI"] {
        let out = vmb(
            &["diagnose", "--repack", "--repack-schedule", sched, "--connect", uri, "--interval", "100ms"],
            &[("VM_BALANCER_REPACK_MIN_GAIN", "0.5")],
        );
        assert_eq!(out.status.code(), Some(1), "{sched}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn cpus_flag_and_variable_parse_without_panicking() {
    // `--cpus` used to panic at start (clap type mismatch), exit 101, for every value.
    let uri = "qemu+unix:///system?socket=/nonexistent/sock";
    for (args, env) in [
        (vec!["diagnose", "--cpus", "0", "--connect", uri, "--interval", "100ms"], vec![]),
        (vec!["diagnose", "--cpus", "0-3,8", "--connect", uri, "--interval", "100ms"], vec![]),
        (vec!["diagnose", "--connect", uri, "--interval", "100ms"], vec![("VM_BALANCER_CPUS", "2-63")]),
    ] {
        let out = vmb(&args, &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} {env:?}: {err}");
        assert!(err.contains("cannot connect") && !err.contains("panicked"), "{err}");
    }
}

#[test]
fn an_error_is_printed_once() {
    let out =
        vmb(&["diagnose", "--connect", "qemu+unix:///system?socket=/nonexistent/sock", "--interval", "100ms"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("cannot connect").count(), 1, "{err}");
}

#[test]
fn remote_uris_are_refused() {
    let out = vmb(&["run", "--connect", "qemu+ssh://other/system"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--connect") && err.contains("remote host"), "{err}");
}

#[test]
fn a_closed_stdout_ends_the_program_quietly() {
    // `simulate | head -c 0`: the reader is gone before the program writes.
    common::assert_quiet_into_closed_pipe(&["simulate", "--duration", "60s", "--host-cpus", "4", "--json"]);
}

#[test]
fn the_settings_file_is_read_and_a_bad_line_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm-balancer");
    std::fs::write(&path, "# settings\nVM_BALANCER_HIGH=0.8\nVM_BALANCER_QUANTUM=5ms\n").unwrap();
    let p = path.to_str().unwrap();
    for (args, env) in [(vec!["diagnose", "--config", p], vec![]), (vec!["run"], vec![("VM_BALANCER_CONFIG", p)])] {
        let out = vmb(&args, &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(&format!("{p}:3: VM_BALANCER_QUANTUM:")) && err.contains("allowed 100ms to 1h"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    // A named file that does not exist is an error; the default one may be missing.
    let out = vmb(&["run", "--config", "/nonexistent/vm-balancer"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the settings file /nonexistent/vm-balancer"));
    // Which URI diagnose fails to reach shows where the setting came from.
    let sock = |w: &str| format!("qemu+unix:///system?socket=/nonexistent/{w}");
    std::fs::write(&path, format!("VM_BALANCER_CONNECT={}\n", sock("file"))).unwrap();
    let flag = sock("flag");
    let cases = [
        (vec!["diagnose", "--config", p, "--interval", "100ms"], vec![], "file"),
        (vec!["diagnose", "--config", p, "--interval", "100ms"], vec![("VM_BALANCER_CONNECT", sock("env"))], "env"),
        (
            vec!["diagnose", "--config", p, "--interval", "100ms", "--connect", &flag],
            vec![("VM_BALANCER_CONNECT", sock("env"))],
            "flag",
        ),
    ];
    for (args, env, winner) in &cases {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let out = vmb(args, &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(&format!("cannot connect to {}", sock(winner))), "{winner} should win: {err}");
    }
}

/// Runs `vm-balancer run` against a socket that does not exist for about a second, stderr to a
/// file; `journal`: tell it the file is the journal's stream.
fn run_briefly_to_file(journal: bool) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stderr");
    let f = std::fs::File::create(&path).unwrap();
    let meta = f.metadata().unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_vm-balancer"));
    c.args(["run", "--quantum", "100ms", "--connect", "qemu+unix:///system?socket=/nonexistent/sock"]);
    c.stderr(f).env_remove("JOURNAL_STREAM");
    if journal {
        c.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    }
    let mut child = c.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1200));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&path).unwrap()
}

#[test]
fn under_the_journal_lines_carry_a_priority_and_no_timestamp() {
    let text = run_briefly_to_file(true);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.iter().all(|l| l.starts_with('<') && !l.contains("Z ")), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("<6>vm-balancer") && l.contains("starting")), "{text}");
    assert!(lines.iter().any(|l| l.starts_with("<4>cannot reach the hypervisor")), "{text}");
    // On a terminal or a plain file: timestamps and level names.
    let text = run_briefly_to_file(false);
    assert!(text.lines().all(|l| l.starts_with("[20")), "{text}");
    assert!(text.contains("WARN ] cannot reach the hypervisor"), "{text}");
}

#[test]
fn the_configuration_document_names_every_flag() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/configuration.md")).unwrap();
    for sub in ["run", "diagnose", "release"] {
        let help = vmb(&[sub, "--help"], &[]);
        let help = String::from_utf8_lossy(&help.stdout);
        let flags = help
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("--"))
            .map(|w| w.trim_end_matches([',', '.', ')', '=', ':', ';']).split(['=', '<', '[']).next().unwrap_or(""))
            .filter(|f| !f.is_empty() && !["help", "version"].contains(f));
        for f in flags {
            let named = doc.match_indices(&format!("--{f}")).any(|(i, m)| {
                !doc[i + m.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
                    && doc[..i].ends_with(['`', ' '])
            });
            assert!(named, "docs/configuration.md does not describe --{f} of {sub}");
        }
    }
}

#[test]
fn release_gives_back_despite_a_bad_settings_line() {
    // The unit runs `release` after every stop: a line mis-edited since the start (even one
    // release does not use) is a warning, and it goes on (libvirt's in-process test driver
    // stands in for the hypervisor: nothing of its domains was pinned by the agent).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings");
    std::fs::write(&path, "VM_BALANCER_HIGH=0.85 # busier\nVM_BALANCER_STARVE_BELOW=0.4\n").unwrap();
    let keep = dir.path().join("keep");
    // Errors of the file itself (a key set twice, a line that is no setting): the good lines
    // are still read, the first of a key set twice kept.
    std::fs::write(&keep, "VM_BALANCER_KEEP_PINS_ON_EXIT=true\nVM_BALANCER_KEEP_PINS_ON_EXIT=false\noops\n").unwrap();
    let out = vmb(&["release", "--config", keep.to_str().unwrap(), "--connect", "test:///default"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains(":2: VM_BALANCER_KEEP_PINS_ON_EXIT is already set") && err.contains(":3: expected"), "{err}");
    assert!(err.contains("--keep-pins-on-exit is set: leaving the vCPU pins as they are"), "{err}");
    let p = path.to_str().unwrap();
    let out = vmb(&["release", "--config", p, "--connect", "test:///default"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("warning: ") && err.contains(":1: VM_BALANCER_HIGH"), "{err}");
    assert!(err.contains("--starve-below (0.4) must be below --reclaim-above"), "{err}");
    // The daemon itself still refuses the file.
    let out = vmb(&["diagnose", "--config", p, "--connect", "test:///default"], &[]);
    assert_eq!(out.status.code(), Some(2));
}
