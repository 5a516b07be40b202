//! End-to-end: the Debian package, built once per run by the README's command
//! (`bash lab/package.sh`), holds what an operator needs and goes through dpkg's life cycle
//! on this machine: install (without a running systemd), reinstall over an edited settings
//! file, remove, purge, leaving nothing behind.
//!
//! Installing puts the settings file at /etc/default/vm-balancer, which every agent on the
//! machine reads: the life-cycle test holds the lab (so no other lab test runs meanwhile) and
//! purges the package when it ends, also when it fails.

mod common;

use std::borrow::BorrowMut;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use clap::CommandFactory as _;

const PKG: &str = "vm-balancer";
const SETTINGS: &str = "/etc/default/vm-balancer";
const MAN: &str = "/usr/share/man/man8/vm-balancer.8.gz";
const BASH: &str = "/usr/share/bash-completion/completions/vm-balancer";
const DOC: &str = "/usr/share/doc/vm-balancer";
/// Debian 12 has one /usr: cargo-deb installs into /usr/lib/systemd/system, which is also
/// /lib/systemd/system.
const UNIT: &str = "/lib/systemd/system/vm-balancer.service";
const WANTS: &str = "/etc/systemd/system/multi-user.target.wants/vm-balancer.service";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn run(mut cmd: impl BorrowMut<Command>) -> Output {
    let cmd = cmd.borrow_mut();
    cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// Runs the command, asserts it succeeded, returns its stdout.
fn ok(mut cmd: impl BorrowMut<Command>) -> String {
    let cmd = cmd.borrow_mut();
    let out = run(&mut *cmd);
    assert!(
        out.status.success(),
        "{cmd:?}: {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sh(cmd: &str, args: &[&str]) -> Command {
    let mut c = Command::new(cmd);
    c.args(args);
    c
}

/// The .deb, built once per test run by the README's command.
fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let stdout = ok(Command::new("bash").arg(repo("lab/package.sh")).current_dir(repo("")));
        let deb = PathBuf::from(stdout.lines().last().unwrap_or_default());
        assert!(deb.extension().is_some_and(|e| e == "deb") && deb.is_file(), "package.sh printed {stdout:?}");
        deb
    })
}

/// Every long flag of every subcommand an operator sees, from the clap definition itself: a
/// flag added later is checked without touching this test.
fn every_subcommand_and_flag() -> (Vec<String>, Vec<String>) {
    let mut cmd = vm_balancer::cli::Cli::command();
    cmd.build();
    let subs: Vec<&clap::Command> =
        cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help").collect();
    let mut flags: Vec<String> = subs
        .iter()
        .flat_map(|s| s.get_arguments().filter(|a| !a.is_hide_set()).filter_map(|a| a.get_long()))
        .filter(|l| *l != "help")
        .map(|l| format!("--{l}"))
        .collect();
    flags.sort();
    flags.dedup();
    (subs.iter().map(|s| s.get_name().to_string()).collect(), flags)
}

fn source_unit() -> String {
    std::fs::read_to_string(repo("systemd/vm-balancer.service")).unwrap()
}

#[test]
fn the_package_holds_the_files_an_operator_needs() {
    let deb = package();
    let listing = ok(sh("dpkg-deb", &["-c"]).arg(deb));
    let paths: Vec<&str> = listing.lines().filter_map(|l| l.split_whitespace().last()).collect();
    for want in [
        "./usr/sbin/vm-balancer",
        "./usr/lib/systemd/system/vm-balancer.service",
        "./etc/default/vm-balancer",
        "./usr/share/man/man8/vm-balancer.8.gz",
        "./usr/share/bash-completion/completions/vm-balancer",
        "./usr/share/zsh/vendor-completions/_vm-balancer",
        "./usr/share/fish/vendor_completions.d/vm-balancer.fish",
        "./usr/share/doc/vm-balancer/README.md",
        "./usr/share/doc/vm-balancer/docs/design.md",
        "./usr/share/doc/vm-balancer/docs/simulator.md",
        "./usr/share/doc/vm-balancer/docs/testing.md",
        "./usr/share/doc/vm-balancer/copyright",
    ] {
        assert!(paths.contains(&want), "{want} missing:\n{listing}");
    }
    assert!(!paths.iter().any(|p| p.contains("/usr/local/")), "{listing}");

    let depends = ok(sh("dpkg-deb", &["-f"]).arg(deb).arg("Depends"));
    assert!(depends.contains("libvirt0") && depends.contains("libc6"), "Depends: {depends}");
    let conffiles = ok(sh("dpkg-deb", &["-I"]).arg(deb).arg("conffiles"));
    assert_eq!(conffiles.trim(), SETTINGS);

    // Enabled on install, never started by the package: only an upgrade restarts a running
    // agent (try-restart), and only under systemd.
    let postinst = ok(sh("dpkg-deb", &["-I"]).arg(deb).arg("postinst"));
    assert!(postinst.contains("deb-systemd-helper enable vm-balancer.service"), "{postinst}");
    let invokes: Vec<&str> = postinst.lines().filter(|l| l.contains("deb-systemd-invoke")).collect();
    assert_eq!(invokes.len(), 1, "{postinst}");
    assert!(invokes[0].contains("deb-systemd-invoke try-restart vm-balancer.service"), "{postinst}");
    assert!(postinst.contains("if [ -n \"$2\" ]; then"), "try-restart on upgrades only:\n{postinst}");

    let dir = tempfile::tempdir().unwrap();
    ok(sh("dpkg-deb", &["-x"]).arg(deb).arg(dir.path()));
    let root = dir.path();

    // The packaged unit is the source unit with its binary moved: that one substitution.
    let source = source_unit();
    assert!(source.matches("/usr/local/bin/vm-balancer").count() >= 2, "ExecStart and ExecStopPost");
    let packaged = std::fs::read_to_string(root.join("usr/lib/systemd/system/vm-balancer.service")).unwrap();
    assert_eq!(packaged, source.replace("/usr/local/bin/", "/usr/sbin/"));
    assert!(packaged.contains("\nExecStart=/usr/sbin/vm-balancer run\n"), "{packaged}");
    assert!(packaged.contains("\nExecStopPost=-/usr/sbin/vm-balancer release\n"), "{packaged}");

    let settings = std::fs::read(root.join("etc/default/vm-balancer")).unwrap();
    assert_eq!(settings, std::fs::read(repo("systemd/vm-balancer.default")).unwrap());
    let readme = std::fs::read(root.join("usr/share/doc/vm-balancer/README.md")).unwrap();
    assert_eq!(readme, std::fs::read(repo("README.md")).unwrap());

    // Stripped: no DWARF and no symbol table (the release profile keeps debug info).
    let bin = root.join("usr/sbin/vm-balancer");
    let sections = ok(sh("readelf", &["-S", "-W"]).arg(&bin));
    assert!(!sections.contains(".debug_info") && !sections.contains(".symtab"), "{sections}");
    let (packed, built) = (bin.metadata().unwrap().len(), std::fs::metadata(common::bin()).unwrap().len());
    eprintln!("binary: {packed} bytes packaged, {built} built");
}

/// Purges the package when dropped, so that a failed test leaves no settings file behind.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-P", PKG]).output();
    }
}

fn status() -> String {
    let out = run(sh("dpkg-query", &["-W", "-f=${Status}", PKG]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Processes running the packaged binary.
fn packaged_agents() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    dir.filter_map(Result::ok)
        .filter(|e| std::fs::read_link(e.path().join("exe")).is_ok_and(|p| p == Path::new("/usr/sbin/vm-balancer")))
        .count()
}

#[test]
fn dpkg_installs_reinstalls_removes_and_purges_without_systemd() {
    let _lab = common::lab();
    assert_eq!(std::fs::metadata("/proc/self").unwrap().uid(), 0, "dpkg needs root");
    assert!(!Path::new("/run/systemd/system").exists(), "meant for the lab, where systemd does not run");
    let deb = package();
    // A package left by an interrupted run; then nothing of ours may be in /etc.
    let _ = run(sh("dpkg", &["-P", PKG]));
    assert!(!Path::new(SETTINGS).exists(), "{SETTINGS} exists and belongs to no package: not overwriting it");
    let _purge = Purge;

    let out = ok(sh("dpkg", &["-i"]).arg(deb));
    eprintln!("dpkg -i:\n{out}");
    assert_eq!(status(), "install ok installed");
    let version = ok(sh("/usr/sbin/vm-balancer", &["--version"]));
    assert_eq!(version.trim(), format!("vm-balancer {}", env!("CARGO_PKG_VERSION")));
    // The installed binary runs against libvirtd with the installed settings file.
    let json = ok(sh("/usr/sbin/vm-balancer", &["diagnose", "--json", "--interval", "200ms"]));
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(doc["host"]["cpus"].as_array().is_some_and(|c| !c.is_empty()), "{json}");

    // Enabled, not started.
    let link = std::fs::read_link(WANTS).unwrap_or_else(|e| panic!("{WANTS}: {e}"));
    assert!(link.ends_with("lib/systemd/system/vm-balancer.service"), "{}", link.display());
    assert_eq!(packaged_agents(), 0, "the package started the agent");
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert_eq!(unit, source_unit().replace("/usr/local/bin/", "/usr/sbin/"));
    let verify = run(sh("systemd-analyze", &["verify", UNIT]));
    let err = String::from_utf8_lossy(&verify.stderr);
    let real: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("libvirtd.service") && !l.contains("virtqemud"))
        .collect();
    assert!(verify.status.success() && real.is_empty(), "systemd-analyze verify {UNIT}:\n{err}");

    let listed = ok(sh("dpkg", &["-L", PKG]));
    for want in ["/usr/sbin/vm-balancer", "lib/systemd/system/vm-balancer.service", SETTINGS, MAN, BASH] {
        assert!(listed.lines().any(|l| l.ends_with(want)), "dpkg -L lacks {want}:\n{listed}");
    }
    for doc in ["README.md", "copyright"] {
        assert!(listed.lines().any(|l| l == format!("{DOC}/{doc}")), "dpkg -L lacks {doc}:\n{listed}");
    }
    let conffiles = ok(sh("dpkg-query", &["-W", "-f=${Conffiles}", PKG]));
    assert!(conffiles.trim_start().starts_with(&format!("{SETTINGS} ")), "{conffiles}");

    // The man page is found by name and renders without a warning; it names every subcommand
    // and every flag.
    assert_eq!(ok(sh("man", &["-w", "8", PKG])).trim(), MAN);
    let out = run(sh("man", &["-P", "cat", "-l", MAN]).env("MANWIDTH", "200").env("LC_ALL", "C"));
    let (page, warnings) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && warnings.trim().is_empty(), "man: {:?}\n{warnings}", out.status);
    let (subs, flags) = every_subcommand_and_flag();
    assert_eq!(subs, ["run", "diagnose", "simulate", "release"]);
    for s in &subs {
        assert!(page.contains(&format!("vm-balancer {s}")), "{s} not in the page:\n{page}");
    }
    assert!(flags.len() > 30 && flags.contains(&"--quantum".into()) && flags.contains(&"--cpus".into()));
    for f in &flags {
        assert!(page.contains(f.as_str()), "{f} not in the page");
    }
    let zcat = ok(sh("zcat", &[MAN]));
    assert!(zcat.contains(".TH VM-BALANCER 8"), "{}", &zcat[..zcat.len().min(300)]);

    // The installed bash completion registers and completes a subcommand's flag.
    let offered = ok(sh(
        "bash",
        &[
            "-c",
            &format!(
                "source {BASH}; f=$(complete -p vm-balancer | sed 's/.*-F \\([^ ]*\\).*/\\1/'); \
                 COMP_WORDS=(vm-balancer run --qu); COMP_CWORD=2; $f vm-balancer --qu run; echo \"${{COMPREPLY[@]}}\""
            ),
        ],
    ));
    assert_eq!(offered.trim(), "--quantum");

    // An operator's edit to the settings file survives a reinstall (an upgrade runs the same
    // scripts, with the old version as $2).
    let edited = std::fs::read_to_string(SETTINGS).unwrap() + "# edited by the operator\n";
    std::fs::write(SETTINGS, &edited).unwrap();
    ok(sh("dpkg", &["-i"]).arg(deb));
    assert_eq!(std::fs::read_to_string(SETTINGS).unwrap(), edited);
    assert_eq!(packaged_agents(), 0, "a reinstall started the agent");

    // Remove: the program goes, the settings file stays (a conffile), the unit is masked.
    ok(sh("dpkg", &["-r", PKG]));
    assert_eq!(status(), "deinstall ok config-files");
    for gone in ["/usr/sbin/vm-balancer", UNIT, MAN, BASH, DOC] {
        assert!(!Path::new(gone).exists(), "{gone} left after dpkg -r");
    }
    assert_eq!(std::fs::read_to_string(SETTINGS).unwrap(), edited);

    // Purge: nothing left, neither the settings file nor the enablement and mask links.
    ok(sh("dpkg", &["-P", PKG]));
    assert_eq!(status(), "");
    for gone in [SETTINGS, WANTS, "/etc/systemd/system/vm-balancer.service"] {
        assert!(std::fs::symlink_metadata(gone).is_err(), "{gone} left after dpkg -P");
    }
}
