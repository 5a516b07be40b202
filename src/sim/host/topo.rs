//! The simulated host's topology and what it costs: SMT sharing and remote NUMA memory.
//!
//! Kept apart from the CPU model in `host.rs`, which decides *how much* time each vCPU gets;
//! this file decides *where* floating work runs and what that time is worth:
//!
//! - **Layout**: `smt` (2 sockets = 2 NUMA nodes = 2 LLCs, 2 threads a core, Linux numbering:
//!   cpu `i` and `i + n/2` are siblings) or `flat` (one node, one thread a core, no costs).
//! - **SMT**: a physical core whose two threads are both busy delivers at most `smt_yield`
//!   cores of work. When the busy time of its threads adds up to `w > smt_yield`, each thread
//!   does `smt_yield / w` of a core of work per core of time; the rest is *SMT loss*.
//! - **Floating work** goes, like Linux's idle-core search, first to physical cores with room
//!   left under one core of work (no sharing), then to the spare sibling threads; at each step
//!   the guest's home node first.
//! - **NUMA**: a guest's home node is where its memory is: the node most of its pinned vCPUs
//!   were on when first pinned (first touch), or, while it never was pinned, guest index mod
//!   nodes. Time a vCPU runs off its home node is *remote*; it does `1 - remote_penalty` of
//!   the work there.
//!
//! Neither loss changes a vCPU's scheduler counters (a thread slowed by its sibling or by
//! remote memory still shows as running, as on a real host): they are reported beside delay.

use crate::host::{CpuTopo, Topology};

/// Work of a physical core with both threads busy, in cores. Intel's first Hyper-Threading
/// paper (Marr et al., Intel Technology Journal 6(1), 2002) reports up to 30% more throughput
/// from the second thread; 1.25 is inside the usual measured range of 1.1 to 1.3.
pub const DEFAULT_SMT_YIELD: f64 = 1.25;
/// Fraction of work lost by a vCPU running off its guest's home node (docs/simulator.md says
/// where the figure comes from).
pub const DEFAULT_REMOTE_PENALTY: f64 = 0.2;

/// The simulated host's layout (`simulate --topology`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TopologyKind {
    /// 2 sockets (NUMA nodes, LLCs) when the cpu count allows, 2 SMT threads a core.
    #[default]
    Smt,
    /// One node, one thread a core: no SMT or NUMA cost.
    Flat,
}

/// Topology of `n` cpus of the given kind.
pub fn topology_of(n: u32, kind: TopologyKind) -> Topology {
    match kind {
        TopologyKind::Smt => smt_topology(n),
        TopologyKind::Flat => Topology::flat(n),
    }
}

/// 2 sockets (= NUMA nodes = LLC domains) when `n ≥ 4` and even, 2 SMT threads per core when
/// each socket has an even count. Numbered like Linux: the first threads of all cores come
/// first, their siblings after (cpu `i` and `i + n/2` share a core).
pub fn smt_topology(n: u32) -> Topology {
    let sockets = if n >= 4 && n.is_multiple_of(2) { 2 } else { 1 };
    let smt = if n.is_multiple_of(2 * sockets) && n >= 2 * sockets { 2 } else { 1 };
    let cores = n / smt;
    let per_socket = (cores / sockets).max(1);
    let cpus = (0..n)
        .map(|cpu| {
            let core_index = cpu % cores;
            let package = (core_index / per_socket).min(sockets - 1);
            CpuTopo { cpu, node: package, package, core: core_index % per_socket, llc: package * per_socket }
        })
        .collect();
    Topology { cpus }
}

/// Per cpu index: its SMT sibling and its node, for the cost model.
#[derive(Debug, Clone)]
pub struct Layout {
    pub sibling: Vec<Option<usize>>,
    pub node: Vec<u32>,
    pub nodes: u32,
}

impl Layout {
    pub fn new(t: &Topology, n: usize) -> Self {
        let mut sibling = vec![None; n];
        let mut node = vec![0; n];
        for c in &t.cpus {
            let i = c.cpu as usize;
            if i >= n {
                continue;
            }
            node[i] = c.node;
            sibling[i] = t.siblings(c.cpu).into_iter().map(|s| s as usize).find(|&s| s != i && s < n);
        }
        let nodes = node.iter().copied().max().map_or(1, |m| m + 1);
        Layout { sibling, node, nodes }
    }
}

/// Spreads `amount` cores of floating work over the cpus `set` (indices), given each cpu's
/// `spare` time and the `busy` time already placed (updated). First up to one core of busy
/// time per physical core (a core's idle thread when its sibling is idle), then the spare
/// sibling threads; in each pass the `home` node's cpus first. Within a step, in proportion to
/// room. Returns what went on each member of `set`; never more than `amount` in total.
pub fn spread(
    amount: f64,
    set: &[usize],
    spare: &[f64],
    busy: &mut [f64],
    lay: &Layout,
    home: Option<u32>,
) -> Vec<f64> {
    let mut add = vec![0.0; set.len()];
    let mut in_set = vec![false; busy.len()];
    for &c in set {
        in_set[c] = true;
    }
    let mut left = amount;
    let steps: &[Option<bool>] = if home.is_some() { &[Some(true), Some(false)] } else { &[None] };
    for whole_core_first in [true, false] {
        for want_home in steps {
            if left <= 1e-12 {
                return add;
            }
            let rooms: Vec<f64> = set
                .iter()
                .enumerate()
                .map(|(k, &c)| {
                    if want_home.is_some_and(|h| (Some(lay.node[c]) == home) != h) {
                        return 0.0;
                    }
                    let own = (spare[c] - add[k]).max(0.0);
                    if whole_core_first {
                        let sib = lay.sibling[c].map_or(0.0, |s| busy[s]);
                        // Both threads in the set: the core's room goes to the lower cpu id
                        // only, so one core never gets two threads' worth in this pass.
                        let twin_first = lay.sibling[c].is_some_and(|s| s < c && in_set[s]);
                        if twin_first { 0.0 } else { own.min((1.0 - busy[c] - sib).max(0.0)) }
                    } else {
                        own
                    }
                })
                .collect();
            let room: f64 = rooms.iter().sum();
            if room <= 1e-12 {
                continue;
            }
            let f = (left / room).min(1.0);
            for (k, &c) in set.iter().enumerate() {
                let x = rooms[k] * f;
                add[k] += x;
                busy[c] += x;
            }
            left -= room * f;
        }
    }
    add
}

/// The SMT factor of each cpu: the work it does per core of busy time (1 when its core's
/// threads add up to at most `yield_cores`), and the core-work lost over all cores.
pub fn smt_factors(busy: &[f64], lay: &Layout, yield_cores: f64) -> (Vec<f64>, f64) {
    let mut f = vec![1.0; busy.len()];
    let mut lost = 0.0;
    for (c, s) in lay.sibling.iter().enumerate() {
        let Some(s) = *s else { continue };
        if s < c {
            continue;
        }
        let w = busy[c].min(1.0) + busy[s].min(1.0);
        if w > yield_cores {
            lost += w - yield_cores;
            f[c] = yield_cores / w;
            f[s] = yield_cores / w;
        }
    }
    (f, lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floating_work_takes_idle_cores_before_sibling_threads() {
        let t = smt_topology(8); // cores (0,4) (1,5) on node 0, (2,6) (3,7) on node 1
        let lay = Layout::new(&t, 8);
        let set: Vec<usize> = (0..8).collect();
        let spare = vec![1.0; 8];
        let mut busy = vec![0.0; 8];
        let add = spread(2.0, &set, &spare, &mut busy, &lay, None);
        let (_, lost) = smt_factors(&busy, &lay, 1.25);
        assert!((add.iter().sum::<f64>() - 2.0).abs() < 1e-9);
        assert!(lost < 1e-12, "two cores of work on four idle cores share none: {busy:?}");
        assert!(add[4..].iter().all(|&x| x < 1e-12), "no sibling thread used while cores are idle: {add:?}");
    }

    #[test]
    fn floating_work_stays_on_its_home_node_while_it_fits() {
        let t = smt_topology(8);
        let lay = Layout::new(&t, 8);
        let set: Vec<usize> = (0..8).collect();
        let mut busy = vec![0.0; 8];
        let add = spread(1.5, &set, &[1.0; 8], &mut busy, &lay, Some(1));
        let off: f64 = set.iter().filter(|&&c| lay.node[c] != 1).map(|&c| add[c]).sum();
        assert!(off < 1e-12, "{add:?}");
        // More than the home node's idle cores hold: the other node's cores before home siblings.
        let mut busy = vec![0.0; 8];
        let add = spread(3.0, &set, &[1.0; 8], &mut busy, &lay, Some(1));
        assert!((add[2] + add[3] - 2.0).abs() < 1e-9 && (add[0] + add[1] - 1.0).abs() < 1e-9, "{add:?}");
    }

    #[test]
    fn a_core_with_both_threads_busy_delivers_the_yield() {
        let lay = Layout::new(&smt_topology(4), 4); // cores (0,2) and (1,3)
        let (f, lost) = smt_factors(&[1.0, 0.5, 1.0, 0.5], &lay, 1.25);
        assert!((f[0] * 1.0 + f[2] * 1.0 - 1.25).abs() < 1e-9);
        assert_eq!((f[1], f[3]), (1.0, 1.0), "one core of work on a core shares nothing");
        assert!((lost - 0.75).abs() < 1e-9);
        let (f, lost) = smt_factors(&[1.0, 1.0, 1.0, 1.0], &Layout::new(&topology_of(4, TopologyKind::Flat), 4), 1.25);
        assert!(f.iter().all(|&x| x == 1.0) && lost == 0.0, "flat: no SMT");
    }
}
