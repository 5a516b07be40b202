//! The `/metrics` endpoint: a small HTTP server on a thread of its own, so the agent needs no
//! async runtime and a slow scraper never holds up a quantum.
//!
//! It is written out here, bounded, because the endpoint must never be able to take the agent
//! down: one thread serves every connection (non-blocking sockets and `poll`), each connection
//! gets at most [`HEAD_LIMIT`] bytes of request and [`CONNECTION_DEADLINE`] to send it and take
//! the answer, and at most [`MAX_CONNECTIONS`] are open at once (a new one closes the oldest).
//! One request per connection (`Connection: close`). The `tiny_http` it replaced read a header
//! line into memory without bound (one endless line got the agent OOM-killed under the unit's
//! `MemoryMax=`), started a thread per waiting connection (past the unit's `TasksMax=` its
//! pool panicked and the endpoint was gone until a restart), ended its accept loop on the first
//! failed `accept` (too many open files), and answered one connection at a time without a write
//! timeout (a client that did not read held every scrape up).
//!
//! Content negotiation: a scraper that accepts OpenMetrics (a Prometheus server does) gets
//! OpenMetrics text; anyone else (`curl`, `promtool check metrics`) gets the Prometheus text
//! format 0.0.4. Both come from the same registry; they differ in how a counter's family is
//! named (`# TYPE x counter` + `x_total` in OpenMetrics, `# TYPE x_total counter` in 0.0.4),
//! and promtool's linter reads the 0.0.4 form only.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use prometheus_client::registry::Registry;

/// Most bytes of a request's head (its request line and headers); a longer one is answered 431.
pub const HEAD_LIMIT: usize = 8 << 10;
/// How long a connection has to send its request and take the answer; then it is closed.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(5);
/// Most connections open at once; a new one beyond it closes the oldest.
pub const MAX_CONNECTIONS: usize = 32;
/// How long the loop rests after a failed `accept` (too many open files: give the others time
/// to close), and how often such a failure is logged at most.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(60);

/// The OpenMetrics text format's content type (what `prometheus_client::encoding::text` writes).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Why the endpoint cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address cannot be bound (in use, not local, not permitted).
    #[error("cannot listen for metrics on {addr} (--metrics-listen)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

impl MetricsError {
    /// A bind failure no retry mends (an address family or a port the agent may not use: the
    /// unit's sandbox): the caller exits 2, which the unit does not restart after. A port in
    /// use (another process may let it go) or an address not (yet) on an interface (at boot,
    /// before DHCP or IPv6 address checks are done) exits 1 and is retried.
    pub fn is_configuration(&self) -> bool {
        let MetricsError::Bind { source, .. } = self else { return false };
        let errno = source.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error);
        errno.is_some_and(|e| [Errno::EAFNOSUPPORT, Errno::EACCES, Errno::EPERM].contains(&Errno::from_raw(e)))
    }
}

/// A text format of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text format 0.0.4.
    Text,
    /// OpenMetrics text 1.0.0.
    OpenMetrics,
}

impl Format {
    /// The format a request's `Accept` header asks for.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => OPENMETRICS,
        }
    }
}

/// The registry encoded in `format`, while no quantum is being folded in.
pub fn encode(registry: &Mutex<Registry>, format: Format) -> String {
    let r = registry.lock().unwrap_or_else(PoisonError::into_inner);
    let mut out = String::with_capacity(16 << 10);
    // Writing into a String cannot fail; an encoder error would leave a truncated text.
    let done = match format {
        Format::Text => prometheus_client::encoding::prometheus_text::encode(&mut out, &r),
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &r),
    };
    if let Err(e) = done {
        debug!("encoding the metrics failed: {e}");
    }
    out
}

/// Binds `addr` now (so a bad address fails the start) and serves `registry` from a thread;
/// returns the address bound (the port the kernel chose for port 0).
pub fn serve(addr: SocketAddr, registry: Arc<Mutex<Registry>>) -> Result<SocketAddr, MetricsError> {
    let bind = |e: std::io::Error| MetricsError::Bind { addr, source: Box::new(e) };
    let listener = TcpListener::bind(addr).map_err(bind)?;
    listener.set_nonblocking(true).map_err(bind)?;
    let bound = listener.local_addr().map_err(bind)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || serve_loop(&listener, &registry))
        .map_err(MetricsError::Thread)?;
    info!("serving metrics at http://{bound}/metrics");
    Ok(bound)
}

/// One open connection: the request read so far, then the answer being written.
struct Conn {
    stream: TcpStream,
    head: Vec<u8>,
    answer: Vec<u8>,
    sent: usize,
    deadline: Instant,
}

fn serve_loop(listener: &TcpListener, registry: &Mutex<Registry>) {
    let mut conns: Vec<Conn> = Vec::new();
    let mut warned: Option<Instant> = None;
    loop {
        let now = Instant::now();
        // Past its deadline: closed (dropping the stream closes it).
        conns.retain(|c| c.deadline > now);
        let wait = conns.iter().map(|c| c.deadline - now).min().unwrap_or(Duration::from_secs(60));
        let timeout = PollTimeout::try_from(wait.as_millis().saturating_add(1).min(60_000)).unwrap_or(PollTimeout::MAX);
        let ready: Vec<PollFlags> = {
            let mut fds = Vec::with_capacity(conns.len() + 1);
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            for c in &conns {
                let want = if c.answer.is_empty() { PollFlags::POLLIN } else { PollFlags::POLLOUT };
                fds.push(PollFd::new(c.stream.as_fd(), want));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())).collect(),
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("metrics: poll failed: {e}");
                    std::thread::sleep(ACCEPT_PAUSE);
                    continue;
                }
            }
        };
        // From the last: `swap_remove` brings in one already done.
        for i in (0..conns.len()).rev() {
            if ready.get(i + 1).is_some_and(|r| !r.is_empty()) && !advance(&mut conns[i], registry) {
                conns.swap_remove(i);
            }
        }
        if ready.first().is_some_and(|r| !r.is_empty()) {
            accept_all(listener, &mut conns, &mut warned);
        }
    }
}

/// Takes every waiting connection. A failed `accept` (too many open files) leaves the listener
/// as it is: the loop rests a moment and tries again.
fn accept_all(listener: &TcpListener, conns: &mut Vec<Conn>, warned: &mut Option<Instant>) {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                if stream.set_nonblocking(true).is_err() {
                    continue;
                }
                if conns.len() >= MAX_CONNECTIONS
                    && let Some(oldest) = (0..conns.len()).min_by_key(|&k| conns[k].deadline)
                {
                    conns.swap_remove(oldest);
                }
                let deadline = Instant::now() + CONNECTION_DEADLINE;
                conns.push(Conn { stream, head: Vec::new(), answer: Vec::new(), sent: 0, deadline });
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                if warned.is_none_or(|t| t.elapsed() >= ACCEPT_WARN_EVERY) {
                    warn!("metrics: cannot accept a connection: {e}");
                    *warned = Some(Instant::now());
                }
                std::thread::sleep(ACCEPT_PAUSE);
                return;
            }
        }
    }
}

/// Reads or writes what the connection is ready for; false once it is done with (to close).
fn advance(c: &mut Conn, registry: &Mutex<Registry>) -> bool {
    if c.answer.is_empty() {
        let mut buf = [0u8; 2048];
        loop {
            match c.stream.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => {
                    c.head.extend_from_slice(&buf[..n]);
                    if let Some(end) = head_end(&c.head) {
                        c.answer = answer(&c.head[..end], registry);
                        break;
                    }
                    if c.head.len() > HEAD_LIMIT {
                        c.answer = reply(
                            431,
                            "Request Header Fields Too Large",
                            "text/plain",
                            "request head over 8 KiB\n",
                            true,
                        );
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
    while c.sent < c.answer.len() {
        match c.stream.write(&c.answer[c.sent..]) {
            Ok(0) => return false,
            Ok(n) => c.sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                debug!("metrics: the scraper went away: {e}");
                return false;
            }
        }
    }
    let _ = c.stream.shutdown(std::net::Shutdown::Write);
    false
}

/// Where the request's head ends (after its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The whole HTTP answer to a request head.
pub fn answer(head: &[u8], registry: &Mutex<Registry>) -> Vec<u8> {
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let request: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let [method, target, version] = request[..] else {
        return reply(400, "Bad Request", "text/plain", "bad request line\n", true);
    };
    if !version.starts_with("HTTP/") {
        return reply(400, "Bad Request", "text/plain", "bad request line\n", true);
    }
    let body = method != "HEAD";
    if target.split('?').next() != Some("/metrics") {
        return reply(404, "Not Found", "text/plain", "not found: the metrics are at /metrics\n", body);
    }
    if !matches!(method, "GET" | "HEAD") {
        return reply(405, "Method Not Allowed", "text/plain", "method not allowed\n", body);
    }
    let accept = lines.find_map(|l| {
        l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case("accept")).map(|(_, v)| v.trim())
    });
    let format = Format::from_accept(accept);
    reply(200, "OK", format.content_type(), &encode(registry, format), body)
}

fn reply(code: u16, reason: &str, content_type: &str, text: &str, body: bool) -> Vec<u8> {
    let allow = if code == 405 { "Allow: GET, HEAD\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        text.len()
    )
    .into_bytes();
    if body {
        out.extend_from_slice(text.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests;
