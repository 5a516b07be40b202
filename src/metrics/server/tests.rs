//! The endpoint against clients that misbehave: each must leave it answering the next scrape,
//! with its memory and threads bounded by construction (one thread; a head of at most
//! `HEAD_LIMIT` per connection; at most `MAX_CONNECTIONS` connections).

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use super::*;

/// A registry with one counter, served on a loopback port of the kernel's choosing.
fn endpoint() -> SocketAddr {
    let mut r = Registry::default();
    let c: Counter = Counter::default();
    c.inc();
    r.register("probe", "A counter to find in the answer", c);
    serve("127.0.0.1:0".parse().unwrap(), Arc::new(Mutex::new(r))).unwrap()
}

/// Sends `request` on a new connection and reads the answer to its end.
fn ask(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn scrape(addr: SocketAddr) -> String {
    ask(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
}

#[test]
fn a_scrape_gets_the_registry_and_other_requests_a_plain_refusal() {
    let addr = endpoint();
    let ok = scrape(addr);
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.contains("Content-Type: text/plain; version=0.0.4"), "{ok}");
    assert!(ok.contains("\r\n\r\n# HELP probe_total A counter"), "{ok}");
    assert!(ok.contains("Connection: close"), "{ok}");
    let om = ask(addr, b"GET /metrics?x=1 HTTP/1.1\r\naccept: application/openmetrics-text; version=1.0.0\r\n\r\n");
    assert!(om.contains(&format!("Content-Type: {OPENMETRICS}")) && om.ends_with("# EOF\n"), "{om}");
    let head = ask(addr, b"HEAD /metrics HTTP/1.0\r\n\r\n");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"), "no body: {head}");
    assert!(ask(addr, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
    let post = ask(addr, b"POST /metrics HTTP/1.1\r\n\r\n");
    assert!(post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET, HEAD"), "{post}");
    assert!(ask(addr, b"hello\r\n\r\n").starts_with("HTTP/1.1 400 "));
}

#[test]
fn an_endless_header_is_cut_off_and_the_endpoint_answers_on() {
    let addr = endpoint();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nX-A: ").unwrap();
    // 64 MiB with no line end, as long as the endpoint takes it: it stops reading after
    // HEAD_LIMIT and answers 431, so a write soon fails (reset) or the answer is there.
    let chunk = vec![b'A'; 1 << 20];
    let mut sent = 0usize;
    for _ in 0..64 {
        if s.write_all(&chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    assert!(sent < 64 << 20, "the endpoint took all 64 MiB of one header");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 431 "), "{out}");
    assert!(scrape(addr).starts_with("HTTP/1.1 200 OK"));
}

#[test]
fn idle_connections_neither_block_a_scrape_nor_stay_open() {
    let addr = endpoint();
    // More than MAX_CONNECTIONS, sending nothing: the oldest are closed to make room.
    let idle: Vec<TcpStream> = (0..MAX_CONNECTIONS + 8).map(|_| TcpStream::connect(addr).unwrap()).collect();
    assert!(scrape(addr).starts_with("HTTP/1.1 200 OK"), "a scrape behind idle connections");
    // Each is closed by its deadline at the latest: the endpoint holds nothing for them.
    for mut s in idle {
        s.set_read_timeout(Some(CONNECTION_DEADLINE * 4)).unwrap();
        let mut b = [0u8; 1];
        // Closed: end of file (or a reset); a read timing out means it was kept open.
        let r = s.read(&mut b);
        assert!(
            matches!(&r, Ok(0)) || r.as_ref().is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "an idle connection was kept open: {r:?}"
        );
    }
    assert!(scrape(addr).starts_with("HTTP/1.1 200 OK"));
}

#[test]
fn a_client_that_does_not_read_does_not_hold_up_other_scrapes() {
    let addr = endpoint();
    // Thousands of pipelined requests, never reading an answer.
    let mut greedy = TcpStream::connect(addr).unwrap();
    let many = b"GET /metrics HTTP/1.1\r\n\r\n".repeat(3000);
    greedy.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = greedy.write_all(&many);
    assert!(scrape(addr).starts_with("HTTP/1.1 200 OK"), "a scrape beside a client that does not read");
    drop(greedy);
}

#[test]
fn a_head_is_complete_at_its_blank_line() {
    assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
    assert_eq!(head_end(b"GET / HTTP/1.0\n\n"), Some(16));
    assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
}

#[test]
fn only_what_no_retry_mends_is_a_configuration_error() {
    let bind = |errno: Errno| MetricsError::Bind {
        addr: "127.0.0.1:9848".parse().unwrap(),
        source: Box::new(std::io::Error::from_raw_os_error(errno as i32)),
    };
    // The unit's sandbox forbids it: exit 2, not restarted.
    assert!(bind(Errno::EAFNOSUPPORT).is_configuration());
    assert!(bind(Errno::EACCES).is_configuration());
    // Another process holds the port, or the address is not up yet (boot): exit 1, retried.
    assert!(!bind(Errno::EADDRINUSE).is_configuration());
    assert!(!bind(Errno::EADDRNOTAVAIL).is_configuration());
}
