//! `Metrics` over the reports of an agent driving the simulated host in virtual time: counters
//! follow applied actions, gone domains leave no series, and both text formats parse.

use std::collections::HashMap;
use std::time::Duration;

use super::*;
use crate::cli::Common;
use crate::daemon::{Agent, AgentConfig};
use crate::host::Host;
use crate::sim::faulty::Faulty;

const GIB: u64 = 1 << 20;
const Q: u64 = 500_000_000;

fn host(cpus: u32, guests: &[(&str, u32)]) -> Faulty {
    Faulty::new(cpus, guests)
}

fn piled() -> Faulty {
    Faulty::piled()
}

fn flags(memory: bool) -> Common {
    let mut c = Common::defaults().unwrap();
    c.quantum = Duration::from_nanos(Q);
    c.smoothing = Duration::from_millis(500);
    c.no_memory = !memory;
    c.min_age = Duration::ZERO;
    c
}

/// Runs `quanta` quanta, each folded into `m`; returns the reports.
fn run(a: &mut Agent<Faulty>, m: &mut Metrics, quanta: usize) -> Vec<StepReport> {
    (0..quanta)
        .map(|_| {
            a.host.sim.advance(Q);
            let r = a.step();
            m.observe(&r, a.connected(), Duration::from_millis(3));
            r
        })
        .collect()
}

/// One sample line: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// Parses a sample line `name{k="v",...} value`, or says what is wrong with it.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let (head, value) = line.rsplit_once(' ').ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse::<f64>().map_err(|e| format!("value {v:?}: {e}"))?,
    };
    let (name, labels) = match head.split_once('{') {
        None => (head, Vec::new()),
        Some((name, rest)) => {
            let body = rest.strip_suffix('}').ok_or("labels not closed")?;
            let mut labels = Vec::new();
            let mut it = body.chars().peekable();
            while it.peek().is_some() {
                let k: String = it.by_ref().take_while(|&c| c != '=').collect();
                if !is_name(&k) || it.next() != Some('"') {
                    return Err(format!("label {k:?}"));
                }
                let mut v = String::new();
                loop {
                    match it.next().ok_or("label value not closed")? {
                        '"' => break,
                        '\\' => v.push(it.next().ok_or("escape at end")?),
                        c => v.push(c),
                    }
                }
                labels.push((k, v));
                match it.next() {
                    None | Some(',') => {}
                    Some(c) => return Err(format!("{c:?} after a label")),
                }
            }
            (name, labels)
        }
    };
    if !is_name(name) {
        return Err(format!("name {name:?}"));
    }
    Ok(Sample { name: name.into(), labels, value })
}

/// Every sample of a text exposition; fails on any line that is neither a sample nor a
/// HELP/TYPE/UNIT/EOF comment, and on a sample whose family has no TYPE line before it.
fn parse(text: &str) -> Vec<Sample> {
    let mut typed: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(c) = line.strip_prefix("# ") {
            let mut w = c.split(' ');
            match (w.next(), w.next()) {
                (Some("TYPE"), Some(n)) => typed.push(n.to_string()),
                (Some("HELP" | "UNIT"), Some(_)) | (Some("EOF"), None) => {}
                _ => panic!("unexpected comment {line:?}"),
            }
            continue;
        }
        let s = parse_sample(line).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        assert!(s.name.starts_with("vm_balancer_"), "{line}");
        assert!(typed.iter().any(|t| s.name.starts_with(t.as_str())), "no TYPE before {line:?}");
        out.push(s);
    }
    out
}

/// The value of the sample `name` whose labels include all of `with`.
fn value(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| s.name == name && with.iter().all(|(k, v)| s.labels.iter().any(|(a, b)| a == k && b == v)))
        .map(|s| s.value)
}

fn applied_pins(reports: &[StepReport]) -> usize {
    reports
        .iter()
        .flat_map(|r| r.plan.iter().zip(&r.was_applied))
        .filter(|(a, ok)| **ok && matches!(a, Action::Pin { .. }))
        .count()
}

#[test]
fn a_pile_up_raises_the_repin_counter() {
    let mut a = Agent::new(piled(), AgentConfig::from_flags(&flags(false), false));
    let mut m = Metrics::new();
    let first = run(&mut a, &mut m, 1);
    assert!(first[0].snapshot.is_none(), "one sample: no rates yet");
    let before = parse(&m.encode_text());
    assert_eq!(value(&before, "vm_balancer_repins_total", &[("kind", "move")]), Some(0.0));
    assert_eq!(value(&before, "vm_balancer_vcpu_delay_seconds_total", &[("domain", "web"), ("vcpu", "0")]), None);

    // The quantum with the move still shows the pile-up: both vCPUs' demand on cpu 0, waiting.
    let second = run(&mut a, &mut m, 1);
    assert_eq!(applied_pins(&second), 1, "{second:?}");
    let piled = parse(&m.encode_text());
    let load0 = value(&piled, "vm_balancer_cpu_load_cores", &[("cpu", "0")]).unwrap();
    assert!(load0 > 1.5, "both vCPUs' demand on cpu 0: {load0}");
    let delay = |s: &[Sample]| value(s, "vm_balancer_vcpu_delay_seconds_total", &[("domain", "web"), ("vcpu", "0")]);
    let waited = delay(&piled).unwrap();
    assert!(waited > 0.0, "two vCPUs on one cpu wait");

    let later = run(&mut a, &mut m, 20);
    let after = parse(&m.encode_text());
    let moves = value(&after, "vm_balancer_repins_total", &[("kind", "move")]).unwrap();
    assert!(moves >= 1.0, "the pile-up was spread by a move");
    let total: f64 =
        PinKind::ALL.iter().map(|k| value(&after, "vm_balancer_repins_total", &[("kind", k.as_str())]).unwrap()).sum();
    #[allow(clippy::cast_precision_loss)]
    let applied = (applied_pins(&second) + applied_pins(&later)) as f64;
    assert_eq!(total, applied, "one count per applied pin");
    assert_ne!(a.host.sim.affinity(0, 0), a.host.sim.affinity(0, 1));
    assert!(delay(&after).unwrap() >= waited, "a counter never falls");
    let now = value(&after, "vm_balancer_vcpu_delay_cores", &[("domain", "web"), ("vcpu", "0")]).unwrap();
    assert!(now < 0.1, "spread: no more waiting ({now})");
    assert_eq!(value(&after, "vm_balancer_libvirt_up", &[]), Some(1.0));
    assert_eq!(value(&after, "vm_balancer_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), Some(1.0));
    assert_eq!(value(&after, "vm_balancer_step_duration_seconds_count", &[]), Some(22.0));
    let t = value(&after, "vm_balancer_last_sample_timestamp_seconds", &[]).unwrap();
    #[allow(clippy::cast_precision_loss)]
    let epoch = a.host.epoch_s() as f64;
    assert!((t - epoch).abs() <= 1.0, "the last sample's time: {t} vs {epoch}");
}

#[test]
fn a_dry_run_counts_no_pin() {
    let mut a = Agent::new(piled(), AgentConfig::from_flags(&flags(false), true));
    let mut m = Metrics::new();
    let reports = run(&mut a, &mut m, 10);
    assert!(reports.iter().any(|r| !r.plan.is_empty()), "moves are planned");
    let s = parse(&m.encode_text());
    for k in PinKind::ALL {
        assert_eq!(value(&s, "vm_balancer_repins_total", &[("kind", k.as_str())]), Some(0.0), "{k}");
    }
}

#[test]
fn a_vanished_domains_series_are_gone() {
    let mut a = Agent::new(host(2, &[("stays", 1), ("leaves", 2)]), AgentConfig::from_flags(&flags(true), false));
    let mut m = Metrics::new();
    run(&mut a, &mut m, 14);
    let text = m.encode_text();
    for family in [
        "vm_balancer_vcpu_usage_cores",
        "vm_balancer_vcpu_delay_seconds_total",
        "vm_balancer_balloon_current_bytes",
        "vm_balancer_memory_state",
    ] {
        assert!(text.contains(&format!("{family}{{domain=\"leaves\"")), "{family} of both guests first:\n{text}");
    }
    let series_before = parse(&text).len();
    a.host.gone.push("leaves".into());
    run(&mut a, &mut m, 12);
    let text = m.encode_text();
    assert!(!text.contains("\"leaves\""), "no series of the gone domain:\n{text}");
    assert!(text.contains("vm_balancer_vcpu_usage_cores{domain=\"stays\",vcpu=\"0\"}"), "{text}");
    assert!(text.contains("vm_balancer_memory_state{domain=\"stays\""), "{text}");
    // 2 vCPUs x 5 series, 3 balloon series and 5 states went away.
    assert_eq!(parse(&text).len(), series_before - 18, "{text}");
}

#[test]
fn a_lost_connection_leaves_no_stale_domain_series() {
    let mut a = Agent::new(piled(), AgentConfig::from_flags(&flags(false), false));
    let mut m = Metrics::new();
    run(&mut a, &mut m, 4);
    assert!(m.encode_text().contains("domain=\"web\""));
    let report = StepReport::default();
    m.observe(&report, false, Duration::from_millis(1));
    let s = parse(&m.encode_text());
    assert_eq!(value(&s, "vm_balancer_libvirt_up", &[]), Some(0.0));
    assert!(s.iter().all(|x| x.labels.iter().all(|(k, _)| k != "domain" && k != "cpu")), "{s:?}");
}

#[test]
fn applied_balloon_changes_and_refused_grants_are_counted() {
    let mut h = host(2, &[("idle", 1), ("hungry", 1)]);
    h.sim.set_mem_need(0, 100 << 10);
    h.sim.set_mem_need(1, GIB);
    let mut c = flags(true);
    c.host_reserve = 1 << 40; // 1 PiB: the host is always below its reserve
    let mut a = Agent::new(h, AgentConfig::from_flags(&c, false));
    let mut m = Metrics::new();
    let reports = run(&mut a, &mut m, 30);
    let s = parse(&m.encode_text());
    let shrinks: usize = reports
        .iter()
        .flat_map(|r| r.plan.iter().zip(&r.was_applied))
        .filter(|(x, ok)| **ok && matches!(x, Action::Balloon { from_kib, to_kib, .. } if to_kib < from_kib))
        .count();
    assert!(shrinks >= 1, "the idle guest gives memory back: {reports:?}");
    #[allow(clippy::cast_precision_loss)]
    let shrinks = shrinks as f64;
    assert_eq!(value(&s, "vm_balancer_balloon_changes_total", &[("direction", "shrink")]), Some(shrinks));
    assert_eq!(value(&s, "vm_balancer_balloon_changes_total", &[("direction", "grow")]), Some(0.0));
    // Balloon statistics read (none carried forward: neither guest is left steady).
    let (read, carried) =
        reports.iter().fold((0, 0), |(r, c), x| (r + x.balloon_reads.read, c + x.balloon_reads.carried));
    assert!(read >= 4, "read {read}, carried {carried}");
    #[allow(clippy::cast_precision_loss)]
    let (read, carried) = (read as f64, carried as f64);
    assert_eq!(value(&s, "vm_balancer_balloon_reads_total", &[("how", "read")]), Some(read));
    assert_eq!(value(&s, "vm_balancer_balloon_reads_total", &[("how", "carried")]), Some(carried));
    let refused =
        reports.iter().flat_map(|r| &r.mem_verdicts).filter(|v| v.not_granted == Some(NotGranted::HostReserve)).count();
    assert!(refused >= 2, "the starving guest is refused at each memory plan: {reports:?}");
    #[allow(clippy::cast_precision_loss)]
    let refused = refused as f64;
    assert_eq!(value(&s, "vm_balancer_memory_grants_refused_total", &[("reason", "host_reserve")]), Some(refused));
    assert_eq!(value(&s, "vm_balancer_memory_grants_refused_total", &[("reason", "budget")]), Some(0.0));
    assert_eq!(value(&s, "vm_balancer_memory_state", &[("domain", "hungry"), ("state", "starving")]), Some(1.0));
    assert_eq!(value(&s, "vm_balancer_memory_state", &[("domain", "hungry"), ("state", "grant")]), Some(0.0));
    let current = value(&s, "vm_balancer_balloon_current_bytes", &[("domain", "idle")]).unwrap();
    let max = value(&s, "vm_balancer_balloon_max_bytes", &[("domain", "idle")]).unwrap();
    #[allow(clippy::cast_precision_loss)]
    let gib = (GIB * 1024) as f64;
    assert!(current < max && max == gib, "{current} < {max}");
}

#[test]
fn both_text_formats_parse_and_agree() {
    let mut a = Agent::new(piled(), AgentConfig::from_flags(&flags(true), false));
    let mut m = Metrics::new();
    run(&mut a, &mut m, 12);
    let text = m.encode_text();
    let om = m.encode_openmetrics();
    assert!(om.ends_with("# EOF\n") && !text.contains("# EOF"));
    // 0.0.4 names a counter's family with its `_total` sample name; OpenMetrics without it.
    assert!(text.contains("# TYPE vm_balancer_repins_total counter\n"), "{text}");
    assert!(om.contains("# TYPE vm_balancer_repins counter\n"), "{om}");
    // Bucket bounds are numbers: `le="1"` in one format is `le="1.0"` in the other.
    let key = |s: &Sample| {
        let labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| match (k.as_str(), v.parse::<f64>()) {
                ("le", Ok(x)) => (k.clone(), x.to_string()),
                _ => (k.clone(), v.clone()),
            })
            .collect();
        format!("{}{labels:?}", s.name)
    };
    let a: HashMap<String, f64> = parse(&text).iter().map(|s| (key(s), s.value)).collect();
    let b: HashMap<String, f64> = parse(&om).iter().map(|s| (key(s), s.value)).collect();
    assert_eq!(a, b);
    assert!(a.len() > 30, "{text}");
    assert_eq!(
        server::Format::from_accept(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5")),
        server::Format::OpenMetrics
    );
    assert_eq!(server::Format::from_accept(Some("*/*")), server::Format::Text);
    assert_eq!(server::Format::from_accept(None), server::Format::Text);
}

#[test]
fn the_sample_parser_rejects_what_is_not_a_sample() {
    for bad in ["x", "1abc 1", "a{b=\"c\" 1", "a{b=c} 1", "a{b=\"c\"} one", "a b c"] {
        assert!(parse_sample(bad).is_err(), "{bad}");
    }
    let s = parse_sample(r#"a_b{x="1",y="q\"z"} 2.5"#).unwrap();
    assert_eq!(s.labels, [("x".to_string(), "1".to_string()), ("y".to_string(), "q\"z".to_string())]);
    assert_eq!(s.value, 2.5);
}

#[test]
fn advice_has_a_series_while_it_lasts_and_spare_capacity_follows_the_load() {
    let mut h = host(2, &[("a", 1), ("b", 1), ("c", 1)]);
    for g in 0..3 {
        h.sim.set_demand(g, 0, 1.0);
    }
    let mut c = flags(false);
    c.overload_window = Duration::ZERO;
    let mut a = Agent::new(h, AgentConfig::from_flags(&c, false));
    let mut m = Metrics::new();
    let reports = run(&mut a, &mut m, 10);
    let named: Vec<String> =
        reports.last().unwrap().capacity.iter().flat_map(|c| &c.advice).map(|x| x.domain().to_string()).collect();
    assert_eq!(named.len(), 1, "three busy vCPUs on two cpus: one guest named");
    let s = parse(&m.encode_text());
    assert_eq!(value(&s, "vm_balancer_advice_migrate", &[("domain", named[0].as_str())]), Some(1.0));
    assert_eq!(s.iter().filter(|x| x.name == "vm_balancer_advice_migrate").count(), 1, "only the named guest");
    assert_eq!(value(&s, "vm_balancer_spare_cpu_cores", &[]), Some(0.0));
    let spare_mem = value(&s, "vm_balancer_spare_memory_bytes", &[]).unwrap();
    assert!(spare_mem > 0.0, "a 64 GiB host with three 1 GiB guests has memory to spare");

    for g in 0..3 {
        a.host.sim.set_demand(g, 0, 0.05);
    }
    run(&mut a, &mut m, 20);
    let s = parse(&m.encode_text());
    assert!(s.iter().all(|x| x.name != "vm_balancer_advice_migrate"), "the series goes with the advice");
    let spare_cpu = value(&s, "vm_balancer_spare_cpu_cores", &[]).unwrap();
    assert!(spare_cpu > 0.0, "an idle host has cpu to spare: {spare_cpu}");
    // Without a connection the host offers nothing.
    m.observe(&StepReport::default(), false, Duration::from_millis(1));
    let s = parse(&m.encode_text());
    assert_eq!(value(&s, "vm_balancer_spare_cpu_cores", &[]), Some(0.0));
    assert_eq!(value(&s, "vm_balancer_spare_memory_bytes", &[]), Some(0.0));
}

#[test]
fn consolidation_moves_have_their_own_kind_and_the_free_cpus_a_gauge() {
    let mut h = host(4, &[("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
    for g in 0..4 {
        h.sim.set_demand(g, 0, 0.05);
    }
    let mut c = flags(false);
    c.consolidate = true;
    let mut a = Agent::new(h, AgentConfig::from_flags(&c, false));
    let mut m = Metrics::new();
    let reports = run(&mut a, &mut m, 60);
    let s = parse(&m.encode_text());
    let applied = |kind: PinKind| {
        reports
            .iter()
            .flat_map(|r| r.plan.iter().zip(&r.was_applied))
            .filter(|(act, ok)| **ok && matches!(act, Action::Pin { kind: k, .. } if *k == kind))
            .count()
    };
    assert!(applied(PinKind::Consolidate) > 0, "{reports:?}");
    #[allow(clippy::cast_precision_loss)]
    let counted = applied(PinKind::Consolidate) as f64;
    assert_eq!(value(&s, "vm_balancer_repins_total", &[("kind", "consolidate")]), Some(counted));
    let free = reports.last().unwrap().free_cpus.len();
    assert!(free > 0, "idle vCPUs packed: {:?}", reports.last().unwrap().cpu_loads);
    #[allow(clippy::cast_precision_loss)]
    let free = free as f64;
    assert_eq!(value(&s, "vm_balancer_free_cpus", &[]), Some(free));
}

#[test]
fn memory_intervals_whose_statistics_went_unanswered_are_counted() {
    let mut h = host(2, &[("frozen", 1)]);
    h.balloon_stats_late = true;
    let mut a = Agent::new(h, AgentConfig::from_flags(&flags(true), false));
    let mut m = Metrics::new();
    let reports = run(&mut a, &mut m, 30);
    let unread: u64 = reports.iter().map(|r| r.balloon_reads.unread).sum();
    assert!(unread >= 2, "{unread} unread intervals");
    #[allow(clippy::cast_precision_loss)]
    let unread = unread as f64;
    let s = parse(&m.encode_text());
    assert_eq!(value(&s, "vm_balancer_balloon_intervals_unread_total", &[]), Some(unread));
    // Answered again: the counter stays where it was.
    a.host.balloon_stats_late = false;
    run(&mut a, &mut m, 6);
    let s = parse(&m.encode_text());
    assert_eq!(value(&s, "vm_balancer_balloon_intervals_unread_total", &[]), Some(unread));
}
