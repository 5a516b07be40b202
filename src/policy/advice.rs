//! Capacity advice for the cluster: when this host cannot meet its guests' demand, which guest
//! a cluster engine should migrate away, and how much this host could still take.
//!
//! The agent balances inside one host; when the host as a whole is short, no pin or balloon
//! helps, and only moving a guest elsewhere does. The agent never migrates anything: it names
//! the guest (diagnose, log, metrics) and a cluster engine decides.
//!
//! **Overloaded** means either:
//! - *cpu*: the load on the allowed cpus (the CPU planner's fixed load plus the demand of every
//!   vCPU it counts) is above what `--high` allows there, `high × cpus`;
//! - *memory*: starving guests that the host refused for its own sake (its reserve, its
//!   pressure, or a spent budget; not a guest at its own maximum) want more than the memory
//!   grants may still use. What is needed is their unmet want plus how far `MemAvailable` is
//!   below the reserve, less the memory still free above it.
//!
//! **Which guest** (as the Proxmox balancer chooses): not the busiest guest (its cache is the
//! warmest and it is the most expensive to move), but among the guests whose removal alone
//! brings the host back under its thresholds (cpu and memory both), the one with the least
//! memory to move. When no single guest suffices, the one that relieves the largest share of
//! the overload per GiB moved. A guest relieving less than [`MIN_SHARE`] of the overload is
//! never named; nor is a guest the agent leaves alone (`--exclude`, the opt-out, a persistent
//! pin: someone chose where it runs). A guest named last time is kept while it is still as
//! good a choice (same class, within [`ABOUT_EQUAL`] of the best): the advice does not flap
//! between two near-equal guests.
//!
//! Removing a guest frees its demand on the allowed cpus and its balloon size (the memory a
//! migration moves), and ends its own unmet want.
//!
//! **Spare**: cores of demand the host could still take under `--high`, and memory grants may
//! still use less what starving guests already want; never negative.
//!
//! **Sustained**: [`Sustain`] turns the per-quantum condition into advice only after it held
//! for `--overload-window` without a break. Pure: no I/O, no clock; the caller feeds the time.

use serde::Serialize;

use crate::units::mib;

const EPS: f64 = 1e-9;
/// Smallest share of the overload a named guest must relieve.
pub const MIN_SHARE: f64 = 0.05;
/// A guest named last time stays named while its relief per GiB is within this fraction of
/// the best one's.
pub const ABOUT_EQUAL: f64 = 0.1;

/// The memory side of the host, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemSide {
    /// Memory grants may still use: `MemAvailable − --host-reserve − grants on credit`; 0 while
    /// the host is below its reserve or under memory pressure.
    pub free_kib: u64,
    /// How far `MemAvailable` is below the reserve.
    pub short_kib: u64,
    /// What the starving guests the host refused want, together.
    pub unmet_kib: u64,
}

/// One guest as the advice sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Guest {
    pub name: String,
    /// Demand of its vCPUs on the allowed cpus, cores.
    pub cpu_cores: f64,
    /// Memory a migration moves (its balloon size), KiB.
    pub mem_kib: u64,
    /// Its own unmet want, when it is a starving guest the host refused, KiB.
    pub unmet_kib: u64,
    /// The agent leaves it alone (excluded, opted out, pinned by its definition): never named.
    pub left_alone: bool,
}

/// Everything the advice is decided from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AdviceInput {
    /// Allowed cpus.
    pub cpus: usize,
    /// `--high`: load per cpu above which a cpu is overloaded, cores.
    pub high: f64,
    /// Load on the allowed cpus: fixed load plus the demand of every vCPU counted, cores.
    pub load_cores: f64,
    pub mem: MemSide,
    pub guests: Vec<Guest>,
}

/// One piece of advice, in `diagnose --json` as `{"action": "migrate", "domain", "reason"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Advice {
    /// Migrate this guest to another host.
    Migrate { domain: String, reason: String },
}

impl Advice {
    pub fn domain(&self) -> &str {
        match self {
            Advice::Migrate { domain, .. } => domain,
        }
    }
}

impl std::fmt::Display for Advice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Advice::Migrate { domain, reason } => write!(f, "migrate {domain}: {reason}"),
        }
    }
}

/// What this host could still take.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Spare {
    /// Cores of demand under `--high` on the allowed cpus.
    pub cpu_cores: f64,
    /// Memory within the host reserve, KiB.
    pub mem_kib: u64,
}

/// How far the host is over its thresholds now; zero when it is not.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Overload {
    /// Load above `high × cpus`, cores.
    pub cpu_cores: f64,
    /// Memory needed to serve the refused starving guests, KiB.
    pub mem_kib: u64,
}

impl Overload {
    pub fn any(&self) -> bool {
        self.cpu_cores > EPS || self.mem_kib > 0
    }
}

/// The condition of one quantum.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Assessment {
    pub overload: Overload,
    /// The guest to migrate, when overloaded and one is worth naming.
    pub migrate: Option<Advice>,
    pub spare: Spare,
}

fn finite(x: f64) -> f64 {
    if x.is_finite() { x.max(0.0) } else { 0.0 }
}

#[allow(clippy::cast_precision_loss)]
fn capacity(input: &AdviceInput) -> f64 {
    finite(input.high) * input.cpus as f64
}

/// How far the host is over its thresholds.
pub fn overload(input: &AdviceInput) -> Overload {
    let cpu = (finite(input.load_cores) - capacity(input)).max(0.0);
    let m = &input.mem;
    let mem = if m.unmet_kib > m.free_kib { (m.unmet_kib + m.short_kib).saturating_sub(m.free_kib) } else { 0 };
    Overload { cpu_cores: if cpu > EPS { cpu } else { 0.0 }, mem_kib: mem }
}

/// What the host could still take.
pub fn spare(input: &AdviceInput) -> Spare {
    Spare {
        cpu_cores: (capacity(input) - finite(input.load_cores)).max(0.0),
        mem_kib: input.mem.free_kib.saturating_sub(input.mem.unmet_kib),
    }
}

/// The host as it would be without guest `g`: its demand leaves the cpus, its memory first
/// fills the shortfall below the reserve and then adds to the free memory, and its own unmet
/// want goes with it.
pub fn without(input: &AdviceInput, g: &Guest) -> AdviceInput {
    let m = &input.mem;
    let to_short = m.short_kib.min(g.mem_kib);
    AdviceInput {
        cpus: input.cpus,
        high: input.high,
        load_cores: (finite(input.load_cores) - finite(g.cpu_cores)).max(0.0),
        mem: MemSide {
            free_kib: m.free_kib.saturating_add(g.mem_kib - to_short),
            short_kib: m.short_kib - to_short,
            unmet_kib: m.unmet_kib.saturating_sub(g.unmet_kib),
        },
        guests: Vec::new(),
    }
}

/// One guest's relief of the overload.
#[derive(Debug, Clone, Copy)]
struct Relief {
    i: usize,
    /// Its removal alone brings the host under every threshold.
    suffices: bool,
    /// Share of the overload it relieves, 0 to 1 (mean over the overloaded resources).
    share: f64,
    /// `share` per GiB moved.
    per_gib: f64,
}

#[allow(clippy::cast_precision_loss)]
fn relief(input: &AdviceInput, o: &Overload, i: usize, g: &Guest) -> Relief {
    let cpu = finite(g.cpu_cores);
    let mem = g.mem_kib.saturating_add(g.unmet_kib);
    let (mut share, mut n) = (0.0, 0.0);
    if o.cpu_cores > EPS {
        share += (cpu / o.cpu_cores).min(1.0);
        n += 1.0;
    }
    if o.mem_kib > 0 {
        share += (mem as f64 / o.mem_kib as f64).min(1.0);
        n += 1.0;
    }
    let share = if n > 0.0 { share / n } else { 0.0 };
    let suffices = !overload(&without(input, g)).any();
    let gib = (g.mem_kib.max(1024) as f64) / f64::from(1u32 << 20);
    Relief { i, suffices, share, per_gib: share / gib }
}

/// The condition of one quantum and the guest to name. `named_before`: the guest named in the
/// previous quantum, kept while it is as good a choice as the best.
pub fn assess(input: &AdviceInput, named_before: Option<&str>) -> Assessment {
    let o = overload(input);
    let spare = spare(input);
    if !o.any() {
        return Assessment { overload: o, migrate: None, spare };
    }
    let reliefs: Vec<Relief> = input
        .guests
        .iter()
        .enumerate()
        .filter(|(_, g)| !g.left_alone)
        .map(|(i, g)| relief(input, &o, i, g))
        .filter(|r| r.share >= MIN_SHARE)
        .collect();
    let name = |r: &Relief| input.guests[r.i].name.as_str();
    let mem_of = |r: &Relief| input.guests[r.i].mem_kib;
    let sufficing: Vec<&Relief> = reliefs.iter().filter(|r| r.suffices).collect();
    let best = if sufficing.is_empty() {
        reliefs.iter().max_by(|a, b| a.per_gib.total_cmp(&b.per_gib).then(name(b).cmp(name(a))))
    } else {
        sufficing
            .iter()
            .copied()
            .min_by(|a, b| mem_of(a).cmp(&mem_of(b)).then(b.share.total_cmp(&a.share)).then(name(a).cmp(name(b))))
    };
    let Some(best) = best else {
        return Assessment { overload: o, migrate: None, spare };
    };
    // The guest named before stays named while it is in the same class and about as good.
    let kept = named_before.and_then(|n| reliefs.iter().find(|r| name(r) == n)).filter(|r| {
        r.suffices == best.suffices
            && if best.suffices {
                mem_of(r) as f64 <= mem_of(best) as f64 * (1.0 + ABOUT_EQUAL)
            } else {
                r.per_gib >= best.per_gib * (1.0 - ABOUT_EQUAL)
            }
    });
    let chosen = kept.unwrap_or(best);
    let reason = explain(input, &o, chosen, sufficing.len());
    Assessment { overload: o, migrate: Some(Advice::Migrate { domain: name(chosen).to_string(), reason }), spare }
}

/// The reason an operator reads: the overload, the guest's relief, and which rule chose it.
fn explain(input: &AdviceInput, o: &Overload, r: &Relief, sufficing: usize) -> String {
    let g = &input.guests[r.i];
    let mut why = Vec::new();
    if o.cpu_cores > EPS {
        why.push(format!(
            "cpu demand {:.2} cores is above the {:.2} that --high {} allows on {} cpus",
            finite(input.load_cores),
            capacity(input),
            input.high,
            input.cpus
        ));
    }
    if o.mem_kib > 0 {
        why.push(format!(
            "starving guests want {} the host cannot give ({} free above the reserve{})",
            mib(input.mem.unmet_kib),
            mib(input.mem.free_kib),
            if input.mem.short_kib > 0 { format!(", {} below it", mib(input.mem.short_kib)) } else { String::new() }
        ));
    }
    let moves = format!("{:.2} cores, {} to move", finite(g.cpu_cores), mib(g.mem_kib));
    let choice = if r.suffices {
        format!(
            "moving {} ({moves}) brings the host under its thresholds with the least memory to move of the {sufficing} guest(s) that would",
            g.name
        )
    } else {
        format!(
            "no single guest brings the host under its thresholds: {} relieves the most per GiB moved ({:.0}% of the overload; {moves})",
            g.name,
            r.share * 100.0
        )
    };
    format!("{}; {choice}", why.join("; "))
}

/// Turns the per-quantum condition into a sustained one: advice only after the host has been
/// overloaded for the whole window without a break. A quantum under the thresholds starts the
/// window over, so advice appears and clears at most once per window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sustain {
    /// When (host clock, ns) the current unbroken overload began.
    since_ns: Option<u64>,
}

impl Sustain {
    /// Feeds one quantum at `now_ns`. Returns for how long (ns) the host has been overloaded
    /// when that reaches `window_ns`, else `None`.
    pub fn observe(&mut self, now_ns: u64, overloaded: bool, window_ns: u64) -> Option<u64> {
        if !overloaded {
            self.since_ns = None;
            return None;
        }
        let since = *self.since_ns.get_or_insert(now_ns);
        let lasted = now_ns.saturating_sub(since);
        (lasted >= window_ns).then_some(lasted)
    }

    /// Forgets the overload (no trustworthy data: a lost connection).
    pub fn reset(&mut self) {
        self.since_ns = None;
    }
}

#[cfg(test)]
mod tests;
