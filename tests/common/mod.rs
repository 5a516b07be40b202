//! The lab harness of the end-to-end tests: transient QEMU guests under the real libvirtd that
//! `lab/setup.sh` started, destroyed when their guard drops (also when a test fails), and the
//! agent binary run as a child process.
//!
//! The host has few cpus and every test loads them, so lab tests take a global lock and run one
//! at a time whatever the test harness's thread count.

#![allow(dead_code)]

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub const URI: &str = "qemu:///system";
static LAB: Mutex<()> = Mutex::new(());

pub fn lab_dir() -> PathBuf {
    std::env::var_os("VMB_LAB_DIR").map_or_else(|| PathBuf::from("/var/lib/vm-balancer-lab"), PathBuf::from)
}

/// Holds the lab: the in-process lock and an exclusive `flock` that keeps other test
/// processes (another checkout's run) off the same libvirtd meanwhile.
pub struct LabGuard {
    _g: MutexGuard<'static, ()>,
    _f: nix::fcntl::Flock<std::fs::File>,
}

/// Takes the lab for one test; fails loudly when the lab is not set up.
pub fn lab() -> LabGuard {
    let g = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let f =
        std::fs::OpenOptions::new().create(true).write(true).truncate(false).open("/run/vm-balancer-lab.lock").unwrap();
    let f = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| e).unwrap();
    assert!(
        lab_dir().join("vmlinuz").exists(),
        "the lab is not set up: run `lab/setup.sh` (the README's test command does) before the end-to-end tests"
    );
    let out = virsh(&["version"]);
    assert!(out.is_ok(), "libvirtd is not answering on {URI}: {out:?}; run lab/setup.sh");
    LabGuard { _g: g, _f: f }
}

/// Runs virsh, returns stdout or the error text.
pub fn virsh(args: &[&str]) -> Result<String, String> {
    let out = Command::new("virsh").arg("-c").arg(URI).args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("virsh {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// Opts a running guest out with the README's own command (`virsh metadata ... --live`).
pub fn opt_out_live(name: &str) {
    let set = virsh(&[
        "metadata",
        name,
        "https://vm-balancer.org/xmlns/1",
        "--key",
        "vmb",
        "--set",
        r#"<balancer manage="no"/>"#,
        "--live",
    ]);
    assert!(set.is_ok(), "{set:?}");
}

pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("vmbt-{prefix}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A guest to start.
#[derive(Clone)]
pub struct GuestSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub current_mib: u64,
    /// Busy loops started in the guest.
    pub burn: u32,
    /// MiB of tmpfs filled at boot (and per second with `fill_step`).
    pub fill_mib: u64,
    pub fill_step_mib: u64,
    pub stats_period: Option<u32>,
    /// Raw XML put in `<metadata>`.
    pub metadata: Option<String>,
    /// Raw XML put in `<cputune>`; with it the guest is defined (persistent), then started.
    pub cputune: Option<String>,
    /// Attributes of `<vcpu>` (` cpuset='0'`); the guest stays transient.
    pub vcpu_attrs: String,
}

impl Default for GuestSpec {
    fn default() -> Self {
        GuestSpec {
            vcpus: 1,
            memory_mib: 256,
            current_mib: 256,
            burn: 0,
            fill_mib: 0,
            fill_step_mib: 0,
            stats_period: Some(1),
            metadata: None,
            cputune: None,
            vcpu_attrs: String::new(),
        }
    }
}

/// A running transient guest; destroyed on drop.
pub struct Guest {
    pub name: String,
    pub console: PathBuf,
    persistent: bool,
}

impl Guest {
    pub fn start(prefix: &str, spec: &GuestSpec) -> Guest {
        let g = Guest::create(prefix, spec);
        g.wait_ready(Duration::from_secs(60));
        g
    }

    /// Creates the guest and returns at once, without waiting for it to boot.
    pub fn create(prefix: &str, spec: &GuestSpec) -> Guest {
        let name = unique(prefix);
        let dir = std::env::temp_dir().join("vmb-tests");
        std::fs::create_dir_all(&dir).unwrap();
        let console = dir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&console);
        let lab = lab_dir();
        let stats = spec.stats_period.map_or(String::new(), |p| format!("<stats period='{p}'/>"));
        let xml = format!(
            "<domain type='qemu'>
  <name>{name}</name>
  {meta}
  <memory unit='MiB'>{mem}</memory>
  <currentMemory unit='MiB'>{cur}</currentMemory>
  <vcpu{attrs}>{vcpus}</vcpu>
  {cputune}
  <os><type arch='x86_64'>hvm</type><kernel>{k}</kernel><initrd>{i}</initrd>
    <cmdline>console=ttyS0 quiet vmb.burn={burn} vmb.fill={fill} vmb.fillstep={step}</cmdline></os>
  <features><acpi/><apic/></features>
  <devices>
    <serial type='file'><source path='{console}'/></serial>
    <memballoon model='virtio'>{stats}</memballoon>
  </devices>
</domain>",
            meta = spec.metadata.as_ref().map_or(String::new(), |m| format!("<metadata>{m}</metadata>")),
            cputune = spec.cputune.as_ref().map_or(String::new(), |t| format!("<cputune>{t}</cputune>")),
            mem = spec.memory_mib,
            cur = spec.current_mib,
            vcpus = spec.vcpus,
            attrs = spec.vcpu_attrs,
            k = lab.join("vmlinuz").display(),
            i = lab.join("initrd.img").display(),
            burn = spec.burn,
            fill = spec.fill_mib,
            step = spec.fill_step_mib,
            console = console.display(),
        );
        let path = dir.join(format!("{name}.xml"));
        std::fs::write(&path, xml).unwrap();
        if spec.cputune.is_some() {
            virsh(&["define", path.to_str().unwrap()]).expect("guest defined");
            let g = Guest { name, console, persistent: true };
            virsh(&["start", &g.name]).expect("guest starts");
            return g;
        }
        virsh(&["create", path.to_str().unwrap()]).expect("guest starts");
        Guest { name, console, persistent: false }
    }

    fn wait_ready(&self, timeout: Duration) {
        let ok =
            wait_for(timeout, || std::fs::read_to_string(&self.console).is_ok_and(|s| s.contains("vmb-guest-ready")));
        assert!(ok, "guest {} did not boot within {timeout:?}", self.name);
    }

    pub fn pin(&self, vcpu: u32, cpus: &str) {
        virsh(&["vcpupin", &self.name, &vcpu.to_string(), cpus, "--live"]).expect("vcpupin");
    }

    /// Current affinity of each vCPU, as virsh prints it.
    pub fn pins(&self) -> Vec<String> {
        let out = virsh(&["vcpupin", &self.name]).unwrap_or_default();
        out.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                let n = it.next()?;
                n.parse::<u32>().ok()?;
                Some(it.next()?.to_string())
            })
            .collect()
    }

    /// `virsh domstats` fields of the given groups.
    pub fn domstats(&self, groups: &[&str]) -> Vec<(String, String)> {
        let mut args = vec!["domstats"];
        args.extend_from_slice(groups);
        args.push(&self.name);
        let out = virsh(&args).unwrap_or_default();
        out.lines().filter_map(|l| l.trim().split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect()
    }

    pub fn stat_u64(&self, groups: &[&str], key: &str) -> Option<u64> {
        self.domstats(groups).into_iter().find(|(k, _)| k == key).and_then(|(_, v)| v.parse().ok())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.name]);
        if self.persistent {
            let _ = virsh(&["undefine", &self.name]);
        }
    }
}

/// Polls `f` every 200 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vm-balancer")
}

/// The agent as a child process; killed on drop, its log kept for the assertion messages.
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    pub fn start(args: &[&str]) -> Agent {
        Agent::start_with_env(args, &[])
    }

    /// Starts `vm-balancer run ARGS` with these environment variables set.
    pub fn start_with_env(args: &[&str], env: &[(String, String)]) -> Agent {
        let log = std::env::temp_dir().join("vmb-tests").join(format!("{}.agent.log", unique("agent")));
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin())
            .arg("run")
            .args(args)
            .env_remove("RUST_LOG")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("agent starts");
        Agent { child: Some(child), log }
    }

    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Resident memory of the agent, KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// Sends SIGHUP (what `systemctl reload` does): the settings file is read again.
    pub fn reload(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.pid()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    /// Sends SIGTERM and waits; returns the exit status and how long the exit took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let mut c = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).unwrap());
        let t = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let st = c.wait().unwrap();
        (st, t.elapsed())
    }

    /// Sends SIGKILL (a crash: no clean stop) and waits.
    pub fn kill9(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        c.kill().unwrap();
        c.wait().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `vm-balancer diagnose --json` and parses its output.
pub fn diagnose_json(extra: &[&str]) -> serde_json::Value {
    let out = Command::new(bin()).args(["diagnose", "--json", "--interval", "1s"]).args(extra).output().unwrap();
    assert!(out.status.success(), "diagnose failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("diagnose prints JSON")
}

/// Runs `vm-balancer ARGS` with its stdout a pipe whose reader is gone before it writes (as
/// `| head -c 0`), and checks that it ends quietly: exit 0 or 1, no panic.
pub fn assert_quiet_into_closed_pipe(args: &[&str]) {
    let mut child = Command::new(bin()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{args:?}: exit {:?}: {err}", out.status);
    assert!(!err.contains("panicked"), "{err}");
}

/// Plays systemd's notification socket for an agent: bound in its own directory, with the
/// environment that points an agent at it and asks for a watchdog of `watchdog_usec`.
pub struct NotifySocket {
    _dir: tempfile::TempDir,
    sock: std::os::unix::net::UnixDatagram,
    pub env: Vec<(String, String)>,
}

impl NotifySocket {
    pub fn new(watchdog_usec: u64) -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let env = vec![
            ("NOTIFY_SOCKET".to_string(), path.display().to_string()),
            ("WATCHDOG_USEC".to_string(), watchdog_usec.to_string()),
        ];
        NotifySocket { _dir: dir, sock, env }
    }

    /// The messages received for `span`, each with when it came (from the call).
    pub fn receive_for(&self, span: Duration) -> Vec<(Duration, String)> {
        let (mut msgs, t0, mut buf) = (Vec::new(), Instant::now(), [0u8; 4096]);
        while t0.elapsed() < span {
            if let Ok(n) = self.sock.recv(&mut buf) {
                msgs.push((t0.elapsed(), String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        }
        msgs
    }
}
