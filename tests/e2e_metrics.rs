//! End-to-end: the `/metrics` endpoint of a running agent, judged by the Prometheus project's
//! own tools rather than by our parser: `promtool check metrics` lints what the agent serves,
//! and a real Prometheus server (Debian's `prometheus` package, installed here when missing)
//! scrapes it while the agent spreads a pile-up on a real QEMU guest; PromQL over what it
//! stored must show the repin and the delay falling. Loopback only; every wait is bounded.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const FAST: &[&str] = &["--quantum", "500ms", "--cooldown", "2s", "--smoothing", "1s", "--no-memory"];

/// A port nobody listens on now (the kernel's pick; released at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.0 GET on loopback: (status, content type, body).
fn get(port: u16, path: &str, accept: Option<&str>) -> Result<(u16, String, String), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{accept}\r\n").map_err(|e| e.to_string())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).map_err(|e| e.to_string())?;
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no header end")?;
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or("no status")?;
    let ctype = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-type")))
        .map_or(String::new(), |(_, v)| v.trim().to_string());
    Ok((status, ctype, body.to_string()))
}

/// `promtool` and `prometheus`, from Debian's package (lab/setup.sh installs it too).
fn ensure_prometheus() {
    if Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return;
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends", "prometheus"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .expect("apt-get runs");
    assert!(st.success(), "cannot install Debian's prometheus package: {st:?}");
}

/// `promtool check metrics` over `text`: its exit status and what it said.
fn promtool_check(text: &str) -> (std::process::ExitStatus, String) {
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    (out.status, format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A Prometheus server on loopback scraping the agent every second; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: vmb\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let p = Prometheus { child, port, dir };
        let ready = wait_for(Duration::from_secs(60), || get(p.port, "/-/ready", None).is_ok_and(|r| r.0 == 200));
        assert!(ready, "prometheus not ready within 60 s:\n{}", p.log());
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The value of an instant PromQL query that returns one series (or a scalar), if any.
    fn query(&self, promql: &str) -> Option<f64> {
        let q: String = promql
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let (status, _, body) = get(self.port, &format!("/api/v1/query?query={q}"), None).ok()?;
        assert_eq!(status, 200, "{promql}: {body}");
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        let data = &doc["data"];
        let value = match data["resultType"].as_str()? {
            "scalar" => &data["result"],
            _ => &data["result"].as_array()?.first()?["value"],
        };
        value[1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_bind_failure_is_a_clear_error_at_start() {
    // Someone already listens there.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut child = Command::new(bin())
        .args(["run", "--metrics-listen", &addr, "--connect", "qemu+unix:///system?socket=/nonexistent/sock"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("the agent ran on although it cannot listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("cannot listen for metrics on {addr}")) && err.contains("in use"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // An address of no interface of this host (TEST-NET-1): it may come up later (at boot,
    // DHCP), so exit 1, which the unit retries.
    let out = Command::new(bin())
        .args([
            "run",
            "--metrics-listen",
            "192.0.2.1:9848",
            "--connect",
            "qemu+unix:///system?socket=/nonexistent/sock",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot listen for metrics on 192.0.2.1:9848 (--metrics-listen)"), "{err}");
}

#[test]
fn prometheus_sees_a_pile_up_spread() {
    ensure_prometheus();
    let _lab = lab();
    let g = Guest::start("metrics", &GuestSpec { vcpus: 2, burn: 2, ..GuestSpec::default() });
    let port = free_port();
    let prom = Prometheus::start(port);
    let listen = format!("127.0.0.1:{port}");
    let mut args = FAST.to_vec();
    // -v: the debug log shows each cpu's load as the planner saw it, for a failure's message.
    args.extend(["--metrics-listen", &listen, "-v"]);
    let mut agent = Agent::start(&args);

    // The endpoint, as promtool and curl see it: the Prometheus text format 0.0.4. (The same
    // registry in OpenMetrics, which a Prometheus server asks for, names a counter's family
    // without `_total`; promtool's linter reads that as a counter without the suffix.)
    let served = wait_for(Duration::from_secs(20), || {
        get(port, "/metrics", None).is_ok_and(|(_, _, b)| b.contains(&format!("domain=\"{}\"", g.name)))
    });
    assert!(served, "no metrics of the guest at {listen}:\n{}", agent.log());
    let (status, ctype, text) = get(port, "/metrics", None).unwrap();
    assert_eq!((status, ctype.as_str()), (200, "text/plain; version=0.0.4; charset=utf-8"));
    let (st, said) = promtool_check(&text);
    assert!(st.success(), "promtool check metrics: {st:?}\n{said}\n{text}");
    let (status, ctype, om) = get(port, "/metrics", Some("application/openmetrics-text;version=1.0.0")).unwrap();
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/openmetrics-text") && om.ends_with("# EOF\n"), "{ctype}\n{om}");
    assert_eq!(get(port, "/", None).unwrap().0, 404);

    // Prometheus scrapes the agent (in OpenMetrics) before the pile-up, so what it stores
    // shows the pile-up itself and not only its end.
    let vcpu = |v: u32| format!("{{domain=\"{}\",vcpu=\"{v}\"}}", g.name);
    let scraped = wait_for(Duration::from_secs(30), || {
        prom.query("up{job=\"vmb\"}") == Some(1.0)
            && prom.query(&format!("count_over_time(vm_balancer_vcpu_delay_seconds_total{}[1m])", vcpu(1))) >= Some(3.0)
    });
    assert!(scraped, "prometheus does not scrape the agent:\n{}", prom.log());
    g.pin(0, "0");
    g.pin(1, "0");
    // Up to a minute: while other work fills cpu 1 (this host's 2 cpus are shared), moving a
    // busy vCPU there would flip the imbalance, and the planner rightly waits (its debug log
    // then shows cpu 1's fixed load near 1.00).
    let spread = wait_for(Duration::from_secs(60), || {
        let p = g.pins();
        p.len() == 2 && p[0] != p[1]
    });
    assert!(spread, "not spread: {:?}\n{}", g.pins(), agent.log());

    // The repin was counted: a balancing repin (not the start's placement) within the last minute.
    let rose = wait_for(Duration::from_secs(10), || {
        prom.query("sum(increase(vm_balancer_repins_total{kind=~\"move|swap|peak_safety\"}[1m]))")
            .is_some_and(|x| x > 0.0)
    });
    assert!(rose, "no repin counted:\n{}", get(port, "/metrics", None).unwrap().2);
    // The piled-up vCPUs' delay fell: its rate over a 3 s window peaked during the pile-up
    // (counter: no scrape can miss it), and the smoothed gauge now is below its recent
    // maximum. Bounded retries: other work on this 2-cpu host also makes vCPUs wait.
    for v in 0..2 {
        let rate = format!("rate(vm_balancer_vcpu_delay_seconds_total{}[3s])", vcpu(v));
        let gauge = format!("vm_balancer_vcpu_delay_cores{}", vcpu(v));
        let mut seen = (None, None, None, None);
        let fell = wait_for(Duration::from_secs(20), || {
            seen = (
                prom.query(&format!("max_over_time({rate}[1m:1s])")),
                prom.query(&rate),
                prom.query(&format!("max_over_time({gauge}[1m])")),
                prom.query(&gauge),
            );
            match seen {
                (Some(peak), Some(now), Some(gpeak), Some(gnow)) => {
                    peak >= 0.05 && now < peak * 0.75 && gnow < gpeak * 0.75
                }
                _ => false,
            }
        });
        assert!(
            fell,
            "vCPU {v}: delay (rate peak, now; gauge peak, now) {seen:?}\n{}",
            get(port, "/metrics", None).unwrap().2
        );
        eprintln!(
            "vCPU {v}: delay rate peak {:?}, now {:?}; gauge peak {:?}, now {:?}",
            seen.0, seen.1, seen.2, seen.3
        );
    }
    let (st, _) = agent.terminate();
    assert!(st.success(), "{st:?}\n{}", agent.log());
}
