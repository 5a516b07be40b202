//! One-shot diagnosis: the same agent, stepped twice, printed as tables or one JSON document.
//!
//! The capacity advice here is the condition over diagnose's own sampling interval: diagnose
//! has two samples, not the `--overload-window` the daemon waits (main sets the window to 0),
//! and each advice's reason says so.

use std::fmt::Write as _;

use serde::Serialize;

use crate::capacity::CapacityReport;
use crate::host::CpuSet;
use crate::model::Snapshot;
use crate::policy::Action;
use crate::policy::advice::Advice;
use crate::policy::consolidate::free_cpus_after;

#[derive(Debug, Serialize)]
pub struct Report {
    pub host: HostOut,
    pub domains: Vec<DomainOut>,
    pub plan: Vec<Action>,
    /// Capacity advice for a cluster engine: `{"action": "migrate", "domain", "reason"}`.
    pub advice: Vec<crate::policy::advice::Advice>,
    /// What this host could still take: `cpu_cores`, `mem_kib`.
    pub spare: crate::policy::advice::Spare,
    /// With `--repack`: the re-pack planned now (`plan` then holds its pins when it applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repack: Option<RepackOut>,
    /// Allowed cpus no vCPU is pinned to (nor floats over) now.
    pub free_cpus: Vec<u32>,
    /// The same once the plan is applied (`--consolidate` plans to free cpus).
    pub free_cpus_after_plan: Vec<u32>,
}

/// The re-pack of `diagnose --repack`.
#[derive(Debug, Serialize)]
pub struct RepackOut {
    /// Load above --high plus peaks above --peak-limit, summed over cpus, now (cores).
    pub cost_before: f64,
    /// The same after the re-pack.
    pub cost_after: f64,
    pub gain: f64,
    pub min_gain: f64,
    /// True when the gain reaches --repack-min-gain: the pins are in `plan`.
    pub applies: bool,
    /// Quanta the daemon would spread the pins over (--max-repins per quantum).
    pub steps: usize,
    /// Every pin of the re-pack, in order (kind `repack`), also when it does not apply.
    pub moves: Vec<Action>,
}

impl RepackOut {
    pub fn new(p: &crate::policy::repack::RepackPlan) -> Self {
        RepackOut {
            cost_before: p.cost_before,
            cost_after: p.cost_after,
            gain: p.gain,
            min_gain: p.min_gain,
            applies: p.worth_it,
            steps: p.steps.len(),
            moves: p.steps.concat(),
        }
    }

    /// What `--apply` applies: the pins when the re-pack pays off, else nothing.
    pub fn plan(&self) -> Vec<Action> {
        if self.applies { self.moves.clone() } else { Vec::new() }
    }
}

#[derive(Debug, Serialize)]
pub struct HostOut {
    /// Cpus the balancer may use.
    pub cpus: Vec<u32>,
    /// Smoothed busy fraction of each of `cpus`.
    pub cpu_busy: Vec<f64>,
    pub topology: crate::host::Topology,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub mem_pressure_some_avg10: Option<f64>,
    /// `--pin-granularity`: what the balancer pins a vCPU to (`cpu`, `core`, `llc`).
    pub pin_granularity: &'static str,
    /// At `core` or `llc`: the groups of the allowed cpus the vCPUs are pinned to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pin_groups: Vec<CpuSet>,
}

#[derive(Debug, Serialize)]
pub struct DomainOut {
    pub name: String,
    /// True when the CPU balancer leaves the domain alone.
    pub excluded: bool,
    /// Why, when excluded.
    pub excluded_why: Option<String>,
    pub vcpus: Vec<VcpuOut>,
    /// Balloon figures, or null when the guest reports none.
    pub memory: Option<MemoryOut>,
    /// The memory balancer's verdict: state (reclaim, grant, steady, starving, hold) and why.
    pub memory_verdict: Option<crate::policy::mem::Verdict>,
}

#[derive(Debug, Serialize)]
pub struct VcpuOut {
    pub id: u32,
    pub pcpu: Option<u32>,
    pub pinned_to: CpuSet,
    pub usage: Option<f64>,
    pub delay: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct MemoryOut {
    pub current_kib: u64,
    pub max_kib: u64,
    pub unused_kib: Option<u64>,
    pub available_kib: Option<u64>,
    pub usable_kib: Option<u64>,
}

/// Builds the report from a snapshot, its plan, the memory verdicts and the capacity advice;
/// `advice_note` is appended to each advice's reason (what the advice was measured over).
pub fn report(
    snap: &Snapshot,
    plan: &[Action],
    verdicts: &[crate::policy::mem::Verdict],
    capacity: &CapacityReport,
    advice_note: &str,
) -> Report {
    let domains = snap
        .domains
        .iter()
        .map(|d| DomainOut {
            name: d.dom.name.clone(),
            excluded: d.cpu_excluded.is_some(),
            excluded_why: d.cpu_excluded.clone(),
            vcpus: d
                .vcpus
                .iter()
                .map(|v| VcpuOut {
                    id: v.id,
                    pcpu: v.pcpu,
                    pinned_to: v.pinned_to.clone(),
                    usage: v.rates.map(|r| r.usage),
                    delay: v.rates.map(|r| r.delay),
                })
                .collect(),
            memory: d.balloon.as_ref().map(|(b, _)| MemoryOut {
                current_kib: b.current_kib,
                max_kib: crate::memctl::max_kib(d.desc.max_kib, b.maximum_kib),
                unused_kib: b.unused_kib,
                available_kib: b.available_kib,
                usable_kib: b.usable_kib,
            }),
            memory_verdict: verdicts.iter().find(|v| v.name == d.dom.name).cloned(),
        })
        .collect();
    Report {
        host: HostOut {
            cpus: snap.host.cpus.clone(),
            cpu_busy: snap.host.cpu_busy.clone(),
            topology: snap.host.topology.clone(),
            mem_total_kib: snap.host.mem_total_kib,
            mem_available_kib: snap.host.mem_available_kib,
            mem_pressure_some_avg10: snap.host.mem_pressure_some_avg10,
            pin_granularity: "cpu",
            pin_groups: Vec::new(),
        },
        domains,
        plan: plan.to_vec(),
        advice: capacity
            .advice
            .iter()
            .map(|a| match a {
                Advice::Migrate { domain, reason } => {
                    Advice::Migrate { domain: domain.clone(), reason: format!("{reason}{advice_note}") }
                }
            })
            .collect(),
        spare: capacity.spare,
        repack: None,
        free_cpus: free_cpus_after(snap, std::iter::empty()),
        free_cpus_after_plan: free_cpus_after(snap, plan.iter()),
    }
}

fn pct(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{:.0}%", v * 100.0))
}

/// Human tables.
pub fn render_table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "host: {} cpus usable ({}), memory {} total, {} available",
        r.host.cpus.len(),
        crate::cpulist::format(&r.host.cpus),
        crate::units::mib(r.host.mem_total_kib),
        crate::units::mib(r.host.mem_available_kib)
    );
    if !r.host.pin_groups.is_empty() {
        let groups: Vec<String> = r.host.pin_groups.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "vCPUs pinned by {}: {}", r.host.pin_granularity, groups.join("; "));
    }
    let _ = writeln!(s, "\n{:>5} {:>5} {:>5} {:>7} {:>5}", "cpu", "node", "core", "pkg", "busy");
    for (i, c) in r.host.cpus.iter().enumerate() {
        let t = r.host.topology.get(*c);
        let _ = writeln!(
            s,
            "{:>5} {:>5} {:>5} {:>7} {:>5}",
            c,
            t.map_or(0, |t| t.node),
            t.map_or(0, |t| t.core),
            t.map_or(0, |t| t.package),
            pct(r.host.cpu_busy.get(i).copied())
        );
    }
    let _ = writeln!(
        s,
        "\n{:<24} {:>4} {:>5} {:>9} {:>6} {:>6}  note",
        "domain", "vcpu", "pcpu", "pinned", "usage", "delay"
    );
    for d in &r.domains {
        let note = d.excluded_why.clone().unwrap_or_default();
        if d.vcpus.is_empty() {
            let _ = writeln!(s, "{:<24} {:>4} {:>5} {:>9} {:>6} {:>6}  {note}", d.name, "-", "-", "-", "-", "-");
        }
        for (i, v) in d.vcpus.iter().enumerate() {
            let _ = writeln!(
                s,
                "{:<24} {:>4} {:>5} {:>9} {:>6} {:>6}  {}",
                if i == 0 { d.name.as_str() } else { "" },
                v.id,
                v.pcpu.map_or_else(|| "-".into(), |c| c.to_string()),
                v.pinned_to.to_string(),
                pct(v.usage),
                pct(v.delay),
                if i == 0 { note.as_str() } else { "" }
            );
        }
        if let Some(m) = &d.memory {
            let _ = writeln!(
                s,
                "{:<24} memory: current {}, max {}, usable {}",
                "",
                crate::units::mib(m.current_kib),
                crate::units::mib(m.max_kib),
                m.usable_kib.map_or_else(|| "-".into(), crate::units::mib)
            );
        }
        if let Some(v) = &d.memory_verdict {
            let _ = writeln!(s, "{:<24} memory balancer: {}: {}", "", v.state, v.why);
        }
    }
    let list = |v: &[u32]| if v.is_empty() { "none".to_string() } else { crate::cpulist::format(v) };
    let _ = writeln!(
        s,
        "\nfree cpus (no vCPU pinned there): {} ({}); after the plan: {} ({})",
        r.free_cpus.len(),
        list(&r.free_cpus),
        r.free_cpus_after_plan.len(),
        list(&r.free_cpus_after_plan)
    );
    let _ = writeln!(s, "\nplan ({} actions):", r.plan.len());
    for a in &r.plan {
        let _ = writeln!(s, "  {a}");
    }
    if let Some(p) = &r.repack {
        let _ = writeln!(
            s,
            "\nre-pack: cost (load above --high + peaks above --peak-limit) {:.2} -> {:.2} cores, gain {:.2}: {} (--repack-min-gain {:.2}); {} pins in {} step(s):",
            p.cost_before,
            p.cost_after,
            p.gain,
            if p.applies { "applies" } else { "below the threshold, nothing to apply" },
            p.min_gain,
            p.moves.len(),
            p.steps
        );
        for a in &p.moves {
            let _ = writeln!(s, "  {a}");
        }
    }
    let _ = writeln!(s, "\nadvice ({}):", r.advice.len());
    for a in &r.advice {
        let _ = writeln!(s, "  {a}");
    }
    let _ = writeln!(
        s,
        "spare: {:.2} cores of demand, {} of memory",
        r.spare.cpu_cores,
        crate::units::mib(r.spare.mem_kib)
    );
    s
}
