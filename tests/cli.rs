//! Flags: bad values give one clear line naming the flag and exit code 2; environment variables
//! are read. No hypervisor needed.

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
        (vec!["run", "--max-repins=-1"], "--max-repins"),
        (vec!["run", "--max-repins", "99999"], "--max-repins"),
        (vec!["diagnose", "--guest-floor", "12"], "--guest-floor"),
        (vec!["run", "--host-reserve", "lots"], "--host-reserve"),
        (vec!["run", "--bogus"], "--bogus"),
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
}

#[test]
fn unreachable_hypervisor_is_a_clear_error_for_diagnose() {
    let out =
        vmb(&["diagnose", "--connect", "qemu+unix:///system?socket=/nonexistent/sock", "--interval", "100ms"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
}
