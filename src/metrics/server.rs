//! The `/metrics` endpoint: a small synchronous HTTP server (`tiny_http`) on a thread of its
//! own, so the agent needs no async runtime and a slow scraper never holds up a quantum.
//!
//! Content negotiation: a scraper that accepts OpenMetrics (a Prometheus server does) gets
//! OpenMetrics text; anyone else (`curl`, `promtool check metrics`) gets the Prometheus text
//! format 0.0.4. Both come from the same registry; they differ in how a counter's family is
//! named (`# TYPE x counter` + `x_total` in OpenMetrics, `# TYPE x_total counter` in 0.0.4),
//! and promtool's linter reads the 0.0.4 form only.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use log::{debug, info};
use prometheus_client::registry::Registry;

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

/// Binds `addr` now (so a bad address fails the start) and serves `registry` from a thread.
pub fn serve(addr: SocketAddr, registry: Arc<Mutex<Registry>>) -> Result<(), MetricsError> {
    let server = tiny_http::Server::http(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                respond(req, &registry);
            }
        })
        .map_err(MetricsError::Thread)?;
    info!("serving metrics at http://{addr}/metrics");
    Ok(())
}

fn header(name: &str, value: &str) -> Option<tiny_http::Header> {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn respond(req: tiny_http::Request, registry: &Mutex<Registry>) {
    use tiny_http::{Method, Response};
    let path = req.url().split('?').next().unwrap_or("");
    let reply = if path != "/metrics" {
        Response::from_string("not found: the metrics are at /metrics\n").with_status_code(404)
    } else if !matches!(req.method(), Method::Get | Method::Head) {
        Response::from_string("method not allowed\n").with_status_code(405)
    } else {
        let accept = req.headers().iter().find(|h| h.field.equiv("Accept")).map(|h| h.value.as_str());
        let format = Format::from_accept(accept);
        let mut r = Response::from_string(encode(registry, format));
        if let Some(h) = header("Content-Type", format.content_type()) {
            r = r.with_header(h);
        }
        r
    };
    if let Err(e) = req.respond(reply) {
        debug!("metrics: the scraper went away: {e}");
    }
}
