//! The CPU planner's input from a snapshot, kept in its own file: which vCPUs are the
//! balancer's to place and move, what the rest leave as fixed load, and what a planner *slot*
//! is. A slot is one allowed cpu (`--pin-granularity cpu`, the default), or a group of them
//! the vCPUs are pinned to as a whole: the two threads of a physical core (`core`) or a
//! last-level-cache domain (`llc`). Inside a group the kernel stays work-conserving; the
//! planner balances the groups, each counted at its capacity (a core with both threads busy
//! does about [`topo::SMT_YIELD`] cores of work), so its rules, written for a cpu of one core,
//! read every load as a share of the largest group's capacity (a smaller group carrying what
//! it lacks as fixed load).

use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use crate::host::{CpuSet, Topology};
use crate::model::Snapshot;

use super::{CpuInput, CpuPolicy, CpuSlot, MovedAt, VcpuSlot, topo};

/// Which group of a granularity a cpu is in ([`Granularity::group_key`]): equal keys, one group.
pub type GroupKey = (u8, u32, u32, u32);

/// What a vCPU is pinned to (`--pin-granularity`), finest first: a coarser group holds finer
/// ones (an LLC its cores, a core its threads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Granularity {
    /// One cpu.
    #[default]
    Cpu,
    /// Every allowed thread of one physical core.
    Core,
    /// Every allowed cpu of one last-level-cache domain.
    Llc,
}

impl Granularity {
    pub const NAMES: [&'static str; 3] = ["cpu", "core", "llc"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "cpu" => Some(Granularity::Cpu),
            "core" => Some(Granularity::Core),
            "llc" => Some(Granularity::Llc),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Granularity::Cpu => "cpu",
            Granularity::Core => "core",
            Granularity::Llc => "llc",
        }
    }

    /// The group `cpu` belongs to at this granularity: the
    /// cpu itself (also one the topology does not describe), its physical core, or its LLC
    /// domain (named by its lowest cpu, unique on the host).
    pub fn group_key(self, cpu: u32, topology: &Topology) -> GroupKey {
        match (self, topology.get(cpu)) {
            (Granularity::Cpu, _) | (_, None) => (0, 0, 0, cpu),
            (Granularity::Core, Some(t)) => {
                let (node, package, core) = t.core_key();
                (1, node, package, core)
            }
            (Granularity::Llc, Some(t)) => (2, 0, 0, t.llc),
        }
    }
}

/// The groups of the allowed cpus `cpus` (sorted) at `granularity`, each sorted, in the order
/// of their lowest cpu, with each group's capacity in cores: 1 per physical core with one
/// allowed thread, [`topo::SMT_YIELD`] per core with two or more. At `cpu` granularity every
/// cpu is its own group. A cpu the topology does not describe is a group of its own.
pub fn groups(cpus: &[u32], topology: &Topology, granularity: Granularity) -> Vec<(CpuSet, f64)> {
    let mut by_group: Vec<(GroupKey, Vec<u32>)> = Vec::new();
    let mut at: HashMap<GroupKey, usize> = HashMap::new();
    for &c in cpus {
        let g = granularity.group_key(c, topology);
        let i = *at.entry(g).or_insert_with(|| {
            by_group.push((g, Vec::new()));
            by_group.len() - 1
        });
        by_group[i].1.push(c);
    }
    by_group
        .into_iter()
        .map(|(_, members)| {
            // Allowed threads per physical core.
            let mut cores: Vec<(GroupKey, usize)> = Vec::new();
            for &c in &members {
                let k = Granularity::Core.group_key(c, topology);
                match cores.iter_mut().find(|(x, _)| *x == k) {
                    Some((_, n)) => *n += 1,
                    None => cores.push((k, 1)),
                }
            }
            let capacity = cores.iter().map(|&(_, n)| if n > 1 { topo::SMT_YIELD } else { 1.0 }).sum();
            (CpuSet(members), capacity)
        })
        .collect()
}

/// True when a multi-cpu affinity was chosen by someone: it neither covers every allowed cpu
/// (a vCPU nobody pinned floats over all of them) nor equals the guest's default affinity
/// (its QEMU main thread's, which a host may narrow for all guests).
pub fn chosen_set(affinity: &CpuSet, allowed: &[u32], default: Option<&CpuSet>) -> bool {
    let covers = allowed.iter().all(|c| affinity.0.binary_search(c).is_ok());
    !covers && default != Some(affinity)
}

/// vCPUs whose pin keeps failing, per domain: left where they are (see `crate::failures`).
pub type BlockedPins = HashMap<String, HashSet<u32>>;

/// The planner's input from a snapshot and the loop's history: cooldowns (`moved_at`), cpus
/// recently touched (`touched_at`, the time each host cpu was last the source or target of a
/// repin), pins that keep failing (`blocked`), and cpus that were allowed earlier in the run
/// but are not now (`retired`): vCPUs pinned there are placed again.
///
/// At `core` or `llc` granularity a slot is a group ([`groups`]): a vCPU pinned to exactly a
/// group's cpus is on that slot; one pinned to a single allowed cpu, or to a set inside one
/// group (a group that lost or gained a cpu), is placed again (onto a group); every load
/// (fixed, demand, peak) is a share of the largest group's capacity, a smaller group carrying
/// what it lacks as fixed load.
pub fn input_from(
    snap: &Snapshot,
    moved_at: &MovedAt,
    touched_at: &HashMap<u32, u64>,
    blocked: &BlockedPins,
    retired: &HashSet<u32>,
    policy: &CpuPolicy,
) -> CpuInput {
    let grouped = policy.granularity != Granularity::Cpu;
    let groups = if grouped { groups(&snap.host.cpus, &snap.host.topology, policy.granularity) } else { Vec::new() };
    // Cpu id -> slot index, as a table: looked up once or twice per vCPU.
    let mut index: Vec<Option<usize>> = Vec::new();
    let mut put = |c: u32, slot: usize| {
        let c = c as usize;
        if index.len() <= c {
            index.resize(c + 1, None);
        }
        index[c] = Some(slot);
    };
    if grouped {
        for (g, (set, _)) in groups.iter().enumerate() {
            for &c in &set.0 {
                put(c, g);
            }
        }
    } else {
        for (i, &c) in snap.host.cpus.iter().enumerate() {
            put(c, i);
        }
    }
    let index_of = |c: u32| index.get(c as usize).copied().flatten();
    let settling = |id: &u32| touched_at.get(id).is_some_and(|&t| snap.t_ns < t.saturating_add(policy.settle_ns));
    // Busy fraction by cpu id, for summing a group's (only at a group granularity).
    let mut busy_by_id: Vec<f64> = Vec::new();
    if grouped {
        for (&c, &b) in snap.host.cpus.iter().zip(&snap.host.cpu_busy) {
            let c = c as usize;
            if busy_by_id.len() <= c {
                busy_by_id.resize(c + 1, 0.0);
            }
            busy_by_id[c] = b;
        }
    }
    let busy_of = |c: u32| busy_by_id.get(c as usize).copied();
    // At a group granularity every load is a share of the largest group's capacity (`unit`,
    // cores), the same for every slot, so a vCPU weighs the same wherever it goes; a smaller
    // group (`--cpus` taking one thread of a core, a cpu offline) carries the capacity it lacks
    // as fixed load.
    let unit = groups.iter().map(|(_, c)| *c).fold(1.0, f64::max);
    let mut cpus: Vec<CpuSlot> = if grouped {
        groups
            .iter()
            .map(|(set, capacity)| {
                let first = set.0[0];
                let busy: f64 = set.0.iter().filter_map(|&c| busy_of(c)).sum();
                CpuSlot {
                    id: first,
                    node: snap.host.topology.get(first).map_or(0, |t| t.node),
                    fixed: busy / unit + (unit - capacity) / unit,
                    settling: set.0.iter().any(settling),
                    sibling: None,
                    group: Some(set.clone()),
                    capacity: *capacity,
                }
            })
            .collect()
    } else {
        let mut cpus: Vec<CpuSlot> = snap
            .host
            .cpus
            .iter()
            .zip(&snap.host.cpu_busy)
            .map(|(&id, &busy)| CpuSlot {
                id,
                node: snap.host.topology.get(id).map_or(0, |t| t.node),
                fixed: busy,
                settling: settling(&id),
                sibling: None,
                group: None,
                capacity: 1.0,
            })
            .collect();
        let ids: Vec<u32> = cpus.iter().map(|c| c.id).collect();
        for (c, s) in cpus.iter_mut().zip(topo::sibling_indices(&ids, |id| snap.host.topology.siblings(id), index_of)) {
            c.sibling = s;
        }
        cpus
    };
    let k = 1.0 / unit;
    // The group whose cpus are exactly `set`: the one of its first cpu, if that is all of it.
    let group_of = |set: &CpuSet| set.0.first().and_then(|&c| index_of(c)).filter(|&g| groups[g].0 == *set);
    let mut vcpus = Vec::with_capacity(snap.domains.iter().map(|d| d.vcpus.len()).sum());
    for d in &snap.domains {
        let moved = moved_at.get(&d.dom.name);
        let stuck = blocked.get(&d.dom.name);
        let name: Rc<str> = Rc::from(d.dom.name.as_str());
        for v in &d.vcpus {
            let Some(rates) = v.rates else { continue };
            let single = v.pinned_to.as_single();
            // Its slot: the allowed cpu it is pinned to, or the group whose cpus it is pinned to.
            // (A group pin the host's cpuset narrowed, e.g. a machine slice allowing fewer cpus
            // than `--cpus`, reads back as the group within the guest's default affinity.)
            let narrowed = |g: usize| {
                d.desc.default_affinity.as_ref().is_some_and(|def| {
                    let within: Vec<u32> =
                        groups[g].0.0.iter().copied().filter(|c| def.0.binary_search(c).is_ok()).collect();
                    within == v.pinned_to.0
                })
            };
            let cpu = if grouped {
                group_of(&v.pinned_to)
                    .or_else(|| v.pinned_to.0.first().and_then(|&c| index_of(c)).filter(|&g| narrowed(g)))
            } else {
                single.and_then(index_of)
            };
            let cooling =
                moved.and_then(|m| m.get(&v.id)).is_some_and(|&t| snap.t_ns < t.saturating_add(policy.cooldown_ns));
            let movable = d.cpu_excluded.is_none() && !cooling && !stuck.is_some_and(|s| s.contains(&v.id));
            // Pinned to one cpu outside the allowed set: someone chose it; leave it in the fixed
            // load. Unless that cpu was allowed earlier in this run and no longer is (`--cpus`
            // narrowed by a reload): then the vCPU is placed again, like a floating one. (At a
            // group granularity, a vCPU pinned to one allowed cpu is placed again too.)
            let retired_pin = single.is_some_and(|c| retired.contains(&c));
            if cpu.is_none()
                && single.is_some_and(|c| index_of(c).is_none())
                && !(retired_pin && d.cpu_excluded.is_none())
            {
                continue;
            }
            // Floating and not ours to place: its load stays in the fixed load.
            if cpu.is_none() && !movable {
                continue;
            }
            // Floating over a set someone chose (`virsh vcpupin web 0 2-3 --live`): left there.
            // At a group granularity a set inside one group is the agent's, as one allowed cpu
            // is at `cpu` granularity: a group that lost a cpu (offline, `--cpus` narrowed: the
            // rest was allowed earlier in the run), lost all of them, or gained one (back
            // online, `--cpus` widened) is placed again.
            let in_one_group = grouped && single.is_none() && !v.pinned_to.0.is_empty() && {
                let mut slots = v.pinned_to.0.iter().filter_map(|&c| index_of(c));
                let first = slots.next();
                slots.all(|g| Some(g) == first)
                    && v.pinned_to.0.iter().all(|&c| index_of(c).is_some() || retired.contains(&c))
            };
            if cpu.is_none()
                && single.is_none()
                && !in_one_group
                && chosen_set(&v.pinned_to, &snap.host.cpus, d.desc.default_affinity.as_ref())
            {
                continue;
            }
            // Take what it ran out of the fixed load of the slot it ran on (none for a retired cpu).
            if let Some(i) = cpu.or_else(|| v.pcpu.and_then(index_of)) {
                cpus[i].fixed -= rates.usage * k;
            }
            let demand = rates.demand.clamp(0.0, 1.0);
            vcpus.push(VcpuSlot {
                domain: Rc::clone(&name),
                vcpu: v.id,
                demand: demand * k,
                peak: rates.peak.clamp(demand, 1.0) * k,
                current: v.pinned_to.clone(),
                cpu,
                movable,
            });
        }
    }
    // A smaller group never looks roomier than what it lacks of the largest one.
    for c in &mut cpus {
        c.fixed = c.fixed.max((unit - c.capacity) / unit);
    }
    CpuInput { cpus, vcpus }
}

#[cfg(test)]
mod tests;
