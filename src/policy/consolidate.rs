//! Consolidation (`--consolidate`): packs low-demand vCPUs onto as few host cpus as keep every
//! cpu under `--high` and its peaks under `--peak-limit`, so that whole cores (both SMT
//! siblings where the host has them) are left with no vCPU: for deep C-states, room for a
//! large guest, or host work. The CPU balancer ([`crate::policy::cpu`]) reacts to overload;
//! this planner runs after it, on its input, and only on a quantum in which it planned
//! nothing, so the balancer always wins and unpacks as soon as demand rises.
//!
//! Rules:
//! - **The unit is a core.** A core is drained only when every vCPU on its allowed cpus can
//!   go elsewhere: moving half of a core's vCPUs frees nothing. With `--max-repins` smaller
//!   than its vCPUs, a drain goes on over the next quanta.
//! - **Sources**: cores whose vCPUs are all movable (no cooldown, not excluded, no failing pin)
//!   and *low-demand* (demand at most [`BUSY_DEMAND`]), whose cpus are not settling after a
//!   repin and are within both limits (a cpu over a limit is the balancer's).
//! - **Targets**: cpus that already hold a vCPU, none of them busy (never pack onto a cpu a
//!   busy vCPU needs), not settling, in another core that holds at least as many vCPUs as the
//!   source core (counted as the plan goes). A target takes a vCPU only while its load stays
//!   at most `--high` less `--min-gain` (the same hysteresis as the balancer's: a packed cpu
//!   has that much room before the balancer would unload it) and its peaks at most
//!   `--peak-limit`, and its core's summed load at most one core (the balancer's SMT relief
//!   unpacks a core above its yield). Among targets that fit: the same NUMA node first, then the fullest (best
//!   fit), then the lowest id.
//! - **No ping-pong, by construction.** No move leaves a cpu over `--high` or its peaks over
//!   `--peak-limit`, so on a host at rest the balancer has nothing to undo (a property test).
//!   Every move goes from a core with no more vCPUs than its target's, so the sum over cores of
//!   (vCPUs on the core)² rises with each move; it is bounded, so on a steady load the moves
//!   stop. The cooldown, settling and `--max-repins` of the balancer apply unchanged.
//!
//! Pure: no I/O, no clock. The daemon builds the core of each cpu with [`core_groups`] and
//! counts the cpus left free with [`free_cpus`].

use std::collections::{HashMap, HashSet};

use crate::host::{CpuSet, Topology};
use crate::model::Snapshot;
use crate::policy::cpu::{CORE_LIMIT, CpuInput, CpuPolicy, CpuSlot};
use crate::policy::{Action, PinKind};

const EPS: f64 = 1e-9;

/// A vCPU whose demand is above this many cores is *busy*: consolidation never moves it and
/// never packs onto its cpu. A quarter core: up to two such vCPUs share a cpu under the default
/// `--high` less `--min-gain` (0.65) with room to spare.
pub const BUSY_DEMAND: f64 = 0.25;

/// Tunables of consolidation, all but one taken from the CPU balancer's.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsolidatePolicy {
    /// `--high`: no cpu is packed above `high - headroom`.
    pub high: f64,
    /// `--min-gain`: room left on a packed cpu below `high`, so a small rise in demand does not
    /// make the balancer unpack at once.
    pub headroom: f64,
    /// `--peak-limit`: no cpu is packed above this sum of peaks (plus fixed load).
    pub peak_limit: f64,
    /// `--max-repins`: most pins changed per quantum.
    pub max_repins: usize,
    /// Demand above which a vCPU is busy (cores).
    pub busy: f64,
}

impl ConsolidatePolicy {
    /// Consolidation with the balancer's own limits: one set of settings for both.
    pub fn from_cpu(p: &CpuPolicy) -> Self {
        ConsolidatePolicy {
            high: p.high,
            headroom: p.min_gain,
            peak_limit: p.peak_limit,
            max_repins: p.max_repins,
            busy: BUSY_DEMAND,
        }
    }
}

impl Default for ConsolidatePolicy {
    fn default() -> Self {
        ConsolidatePolicy::from_cpu(&CpuPolicy::default())
    }
}

/// The core of each cpu of `cpus` (an index; cpus sharing a physical core share it), from the
/// topology: node, package and core id. A cpu the topology does not know is a core of its own.
pub fn core_groups(cpus: &[CpuSlot], topo: &Topology) -> Vec<usize> {
    #[derive(PartialEq, Eq, Hash)]
    enum Key {
        Core((u32, u32, u32)),
        Cpu(u32),
    }
    let mut index: HashMap<Key, usize> = HashMap::new();
    cpus.iter()
        .map(|c| {
            let key = topo.get(c.id).map_or(Key::Cpu(c.id), |t| Key::Core(t.core_key()));
            let next = index.len();
            *index.entry(key).or_insert(next)
        })
        .collect()
}

/// The allowed cpus that no vCPU's affinity includes: left free of vCPUs. `pins` is every
/// vCPU's affinity (a floating vCPU covers all its cpus).
pub fn free_cpus<'a>(allowed: &[u32], pins: impl IntoIterator<Item = &'a CpuSet>) -> Vec<u32> {
    let used: HashSet<u32> = pins.into_iter().flat_map(|s| s.0.iter().copied()).collect();
    allowed.iter().copied().filter(|c| !used.contains(c)).collect()
}

/// The allowed cpus of `snap` that no vCPU is pinned to once `changes` (pins) are applied.
pub fn free_cpus_after<'a>(snap: &Snapshot, changes: impl Iterator<Item = &'a Action>) -> Vec<u32> {
    let mut pins: HashMap<(&str, u32), &CpuSet> = HashMap::new();
    for d in &snap.domains {
        for v in &d.vcpus {
            pins.insert((d.dom.name.as_str(), v.id), &v.pinned_to);
        }
    }
    for a in changes {
        if let Action::Pin { domain, vcpu, to, .. } = a
            && let Some(p) = pins.get_mut(&(domain.as_str(), *vcpu))
        {
            *p = to;
        }
    }
    free_cpus(&snap.host.cpus, pins.into_values())
}

/// The plan's working state.
struct Work {
    load: Vec<f64>,
    peak: Vec<f64>,
    /// vCPUs on each cpu.
    on: Vec<Vec<usize>>,
    /// vCPUs on each core.
    count: Vec<usize>,
}

impl Work {
    fn new(input: &CpuInput, core: &[usize], cores: usize) -> Work {
        let load: Vec<f64> = input.cpus.iter().map(|c| c.fixed).collect();
        let mut w = Work { peak: load.clone(), load, on: vec![Vec::new(); input.cpus.len()], count: vec![0; cores] };
        for (i, v) in input.vcpus.iter().enumerate() {
            if let Some(c) = v.cpu {
                w.add(input, core, i, c);
            }
        }
        w
    }

    fn add(&mut self, input: &CpuInput, core: &[usize], i: usize, c: usize) {
        let v = &input.vcpus[i];
        self.load[c] += v.demand;
        self.peak[c] += v.peak;
        self.on[c].push(i);
        self.count[core[c]] += 1;
    }

    fn remove(&mut self, input: &CpuInput, core: &[usize], i: usize, c: usize) {
        let v = &input.vcpus[i];
        self.load[c] -= v.demand;
        self.peak[c] -= v.peak;
        self.on[c].retain(|&x| x != i);
        self.count[core[c]] -= 1;
    }
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// Plans the consolidation moves of one quantum; `core_of` gives each cpu of `input.cpus` its
/// core (see [`core_groups`]; of another length, each cpu counts as a core of its own). Plans
/// nothing while a vCPU floats (the balancer places it first).
pub fn plan(input: &CpuInput, core_of: &[usize], policy: &ConsolidatePolicy) -> Vec<Action> {
    let n = input.cpus.len();
    let mut actions = Vec::new();
    if n < 2 || policy.max_repins == 0 || input.vcpus.iter().any(|v| v.cpu.is_none()) {
        return actions;
    }
    let core: Vec<usize> =
        if core_of.len() == n && core_of.iter().all(|&k| k < n) { core_of.to_vec() } else { (0..n).collect() };
    let cores = core.iter().max().map_or(0, |&k| k + 1);
    let mut w = Work::new(input, &core, cores);
    let pack_high = policy.high - policy.headroom;
    let busy = |i: usize| input.vcpus[i].demand > policy.busy + EPS;
    let at_rest = |w: &Work, c: usize| {
        !input.cpus[c].settling && w.load[c] <= policy.high + EPS && w.peak[c] <= policy.peak_limit + EPS
    };
    let has_busy: Vec<bool> = w.on.iter().map(|vs| vs.iter().any(|&i| busy(i))).collect();
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); cores];
    for (c, &k) in core.iter().enumerate() {
        members[k].push(c);
    }

    // Drainable cores, the cheapest first: fewest vCPUs, then least demand.
    let mut sources: Vec<usize> = (0..cores)
        .filter(|&k| {
            w.count[k] > 0
                && members[k]
                    .iter()
                    .all(|&c| at_rest(&w, c) && w.on[c].iter().all(|&i| input.vcpus[i].movable && !busy(i)))
        })
        .collect();
    let demand_of =
        |w: &Work, k: usize| -> f64 { members[k].iter().flat_map(|&c| &w.on[c]).map(|&i| input.vcpus[i].demand).sum() };
    sources.sort_by(|&a, &b| {
        w.count[a].cmp(&w.count[b]).then(demand_of(&w, a).total_cmp(&demand_of(&w, b))).then(a.cmp(&b))
    });

    // Cores that received a vCPU in this plan (never drained in it) and cores drained in it
    // (never targets).
    let mut receiving = vec![false; cores];
    let mut drained = vec![false; cores];
    let mut repins = 0;
    for s in sources {
        if repins >= policy.max_repins {
            break;
        }
        if receiving[s] {
            continue;
        }
        // Largest peaks first: they are the hardest to fit.
        let mut movers: Vec<(usize, usize)> =
            members[s].iter().flat_map(|&c| w.on[c].iter().map(move |&i| (i, c))).collect();
        movers.sort_by(|&(a, _), &(b, _)| {
            let (x, y) = (&input.vcpus[a], &input.vcpus[b]);
            y.peak.total_cmp(&x.peak).then(y.demand.total_cmp(&x.demand)).then(a.cmp(&b))
        });
        let Some(moves) = drain(input, &core, &has_busy, &drained, &w, s, &movers, pack_high, policy) else {
            continue;
        };
        let all = moves.len();
        let ids: Vec<u32> = members[s].iter().map(|&c| input.cpus[c].id).collect();
        let freed = format!("{} {}", if ids.len() > 1 { "cpus" } else { "cpu" }, crate::cpulist::format(&ids));
        for (k, &(i, from, t)) in moves.iter().take(policy.max_repins - repins).enumerate() {
            let v = &input.vcpus[i];
            let (l0, p0) = (w.load[t], w.peak[t]);
            let reason = format!(
                "consolidate: vCPU (demand {}, peak {}) joins cpu {} (load {} -> {}, peaks {} -> {}) to leave {} with no vCPU{}",
                pct(v.demand),
                pct(v.peak),
                input.cpus[t].id,
                pct(l0),
                pct(l0 + v.demand),
                pct(p0),
                pct(p0 + v.peak),
                freed,
                if all > 1 { format!(" (move {} of {all})", k + 1) } else { String::new() }
            );
            w.remove(input, &core, i, from);
            w.add(input, &core, i, t);
            receiving[core[t]] = true;
            actions.push(Action::Pin {
                domain: v.domain.to_string(),
                vcpu: v.vcpu,
                from: v.current.clone(),
                to: CpuSet::single(input.cpus[t].id),
                kind: PinKind::Consolidate,
                reason,
            });
            repins += 1;
        }
        drained[s] = true;
    }
    actions
}

/// Where each vCPU of core `s` goes, `(vCPU, from, to)`, when all of them fit elsewhere;
/// `None` when one does not (then the core is left as it is).
#[allow(clippy::too_many_arguments)]
fn drain(
    input: &CpuInput,
    core: &[usize],
    has_busy: &[bool],
    drained: &[bool],
    w: &Work,
    s: usize,
    movers: &[(usize, usize)],
    pack_high: f64,
    policy: &ConsolidatePolicy,
) -> Option<Vec<(usize, usize, usize)>> {
    let (mut load, mut peak, mut count) = (w.load.clone(), w.peak.clone(), w.count.clone());
    let mut occupied: Vec<bool> = w.on.iter().map(|vs| !vs.is_empty()).collect();
    // Each core's summed load: a packed core stays at most one core, `min_gain` under what
    // the balancer's SMT relief unpacks (`crate::policy::cpu::CORE_LIMIT`).
    let mut core_load = vec![0.0; count.len()];
    for (c, &k) in core.iter().enumerate() {
        core_load[k] += load[c];
    }
    let mut moves = Vec::with_capacity(movers.len());
    for &(i, from) in movers {
        let v = &input.vcpus[i];
        let node = input.cpus[from].node;
        let fits = |t: usize| {
            core[t] != s
                && !drained[core[t]]
                && occupied[t]
                && !has_busy[t]
                && !input.cpus[t].settling
                && count[core[t]] >= count[s]
                && load[t] + v.demand <= pack_high
                && peak[t] + v.peak <= policy.peak_limit
                && core_load[core[t]] + v.demand <= CORE_LIMIT + EPS
        };
        let t = (0..load.len()).filter(|&t| fits(t)).min_by(|&a, &b| {
            let other = |t: usize| input.cpus[t].node != node;
            other(a).cmp(&other(b)).then(load[b].total_cmp(&load[a])).then(a.cmp(&b))
        })?;
        load[from] -= v.demand;
        peak[from] -= v.peak;
        count[s] -= 1;
        load[t] += v.demand;
        peak[t] += v.peak;
        count[core[t]] += 1;
        core_load[core[from]] -= v.demand;
        core_load[core[t]] += v.demand;
        occupied[t] = true;
        moves.push((i, from, t));
    }
    Some(moves)
}

#[cfg(test)]
mod tests;
