//! SMT awareness of the CPU planner, kept in its own file: a physical core whose two threads
//! are both busy does less than two cores of work (about [`SMT_YIELD`]), so a busy vCPU should
//! go to an idle core before the idle sibling thread of a busy one, and a cpu's load counts
//! its sibling's. The planner reads each cpu's SMT sibling (`CpuSlot::sibling`, from the host
//! topology). Here:
//!
//! - a core's *SMT excess*: how far its two threads' loads add up above one core
//!   ([`CORE_LIMIT`]); 0 for a cpu without sibling, so hosts without SMT plan as before;
//! - *SMT relief* ([`smt_relief`]): a vCPU on a core above its yield moves to a thread of a
//!   core that stays at most one core, when that lowers the summed SMT excess by `min_gain`;
//! - what keeps the other rules from undoing it: a preventive balancing change and a
//!   peak-safety move may not raise the SMT excess ([`smt_excess_removed`]), consolidation
//!   packs no core above one core;
//! - the tie-breaks: a target or a placement on an idle core first ([`on_busy_core`]).

use super::{CAPACITY, CpuInput, CpuPolicy, EPS, Work, excess_removed, peaks::preventive_change_keeps_peaks};

/// Most summed load (cores) of a physical core's two threads the planner aims for: one core,
/// so that a busy vCPU has a core to itself where the host has the room. A core does up to
/// [`SMT_YIELD`] with both threads busy, but the loads are smoothed means, and the busy bursts
/// of two threads overlap well before their means add up to that yield: in the simulator over
/// the 2013-7 traces (2 seeds) relief moves that filled target cores up to 1.25 left 685 core-s
/// of SMT loss, up to one core 423.
pub const CORE_LIMIT: f64 = CAPACITY;

/// Work of a physical core with both threads busy, in cores (Intel reports up to 30% more
/// than one core from the second thread). SMT relief starts once a core's load is above it:
/// work is lost there now. Starting at `CORE_LIMIT + min_gain` instead moved vCPUs off cores
/// at 1.1 that were not losing work (2013-7, seed 1: 0.15 repins per vCPU-hour, not 0.08).
pub const SMT_YIELD: f64 = 1.25;

/// A sibling thread at or under this load (cores) leaves its core idle for the planner.
pub const IDLE_SIBLING: f64 = 0.1;

/// The load of `c`'s SMT sibling (0 when it has none, or the sibling is not allowed).
pub fn sibling_load(input: &CpuInput, load: &[f64], c: usize) -> f64 {
    input.cpus.get(c).and_then(|s| s.sibling).and_then(|s| load.get(s).copied()).unwrap_or(0.0)
}

/// True when `c` shares its physical core with a busy sibling thread.
pub fn on_busy_core(input: &CpuInput, load: &[f64], c: usize) -> bool {
    sibling_load(input, load, c) > IDLE_SIBLING + EPS
}

/// How far the summed load of `c`'s physical core is above [`CORE_LIMIT`], in cores, with
/// `own` as `c`'s load (0 without a sibling).
fn core_excess(input: &CpuInput, load: &[f64], c: usize, own: f64) -> f64 {
    input.cpus[c].sibling.map_or(0.0, |s| (own + load[s] - CORE_LIMIT).max(0.0))
}

/// How much moving `delta` cores from cpu `b` to cpu `t` lowers the SMT excess of their cores
/// (negative when it raises it). 0 between the two threads of one core, and on a host
/// without SMT.
pub fn smt_excess_removed(input: &CpuInput, load: &[f64], b: usize, t: usize, delta: f64) -> f64 {
    if input.cpus[b].sibling == Some(t) {
        return 0.0;
    }
    let before = core_excess(input, load, b, load[b]) + core_excess(input, load, t, load[t]);
    let after = core_excess(input, load, b, load[b] - delta) + core_excess(input, load, t, load[t] + delta);
    before - after
}

/// One SMT-relief move `(source, vCPU, target)`: from a thread of a core whose two threads'
/// loads add up above [`SMT_YIELD`], the vCPU whose move lowers the summed excess (SMT excess
/// of both cores plus the excess over one core of both cpus) the most, by at least
/// `min_gain`, to a thread of a core that stays at most [`CORE_LIMIT`]. The target cpu stays
/// under `high`, or held next to nothing (a full-core vCPU gets an idle core): balancing has
/// nothing to gain there either way. The move adds no excess over one core to either cpu and
/// keeps the two cpus' recent peaks as `peaks` wants, so neither balancing nor peak safety
/// sends it back. None on a host loaded above one core per physical core: there, aiming at
/// the mean core load instead (a core above it by `min_gain` sheds to one that stays under it)
/// took the mixed scenario from 8.9 to 10.4 repins per vCPU-hour for 0.5% less SMT loss.
/// Among moves within `about_equal` of the best: the same NUMA node, then the
/// lighter vCPU, then the emptier target core.
pub fn smt_relief(input: &CpuInput, policy: &CpuPolicy, w: &Work) -> Option<(usize, usize, usize)> {
    let Work { load, peak_load, on, free, settling } = w;
    let n = load.len();
    // A host loaded above one core per physical core must share cores: moves would mostly
    // shift the sharing from core to core, one repin each.
    let cores = input.cpus.iter().enumerate().filter(|(i, c)| c.sibling.is_none_or(|s| s > *i)).count();
    if load.iter().sum::<f64>() > cores as f64 * CORE_LIMIT + EPS {
        return None;
    }
    let mut best: Vec<(f64, usize, usize, usize)> = Vec::new();
    let mut top = f64::NEG_INFINITY;
    let takes = |t: usize, d: f64| {
        load[t] + d <= policy.high + EPS || (load[t] < policy.min_gain - EPS && load[t] + d <= CAPACITY + EPS)
    };
    for b in 0..n {
        if settling[b] || core_excess(input, load, b, load[b]) < SMT_YIELD - CORE_LIMIT - EPS {
            continue;
        }
        for &v in on[b].iter().filter(|&&v| free[v]) {
            let (d, p) = (input.vcpus[v].demand, input.vcpus[v].peak);
            for t in 0..n {
                if t == b || settling[t] || input.cpus[b].sibling == Some(t) || !takes(t, d) {
                    continue;
                }
                let cpu_gain = excess_removed(load[b], load[t], d);
                let gain = smt_excess_removed(input, load, b, t, d) + cpu_gain;
                if cpu_gain < -EPS
                    || core_excess(input, load, t, load[t] + d) > EPS
                    || gain < policy.min_gain - EPS
                    || gain < top - policy.about_equal - EPS
                    || !preventive_change_keeps_peaks(policy, peak_load[b], peak_load[t], p)
                {
                    continue;
                }
                top = top.max(gain);
                best.push((gain, b, v, t));
            }
        }
    }
    let core_after = |t: usize, d: f64| load[t] + d + sibling_load(input, load, t);
    best.into_iter()
        .filter(|&(g, ..)| g >= top - policy.about_equal - EPS)
        .min_by(|&(_, b1, v1, t1), &(_, b2, v2, t2)| {
            let (d1, d2) = (input.vcpus[v1].demand, input.vcpus[v2].demand);
            let other = |b: usize, t: usize| input.cpus[b].node != input.cpus[t].node;
            other(b1, t1)
                .cmp(&other(b2, t2))
                .then(d1.total_cmp(&d2))
                .then(core_after(t1, d1).total_cmp(&core_after(t2, d2)))
                .then((b1, v1, t1).cmp(&(b2, v2, t2)))
        })
        .map(|(_, b, v, t)| (b, v, t))
}

/// Index (into `cpus`) of each cpu's SMT sibling among the allowed cpus: `sib_of(id)` gives
/// a cpu's sibling ids, `index_of(id)` its index.
pub fn sibling_indices(
    ids: &[u32],
    sib_of: impl Fn(u32) -> Vec<u32>,
    index_of: impl Fn(u32) -> Option<usize>,
) -> Vec<Option<usize>> {
    ids.iter().map(|&id| sib_of(id).into_iter().filter(|&s| s != id).find_map(&index_of)).collect()
}

#[cfg(test)]
mod tests {
    use super::super::{CpuPolicy, CpuSlot, VcpuSlot, plan};
    use super::*;
    use crate::host::{CpuSet, Topology};
    use crate::policy::Action;

    fn fixture(name: &str) -> Topology {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sysfs").join(name);
        crate::host::procfs::topology(&root).unwrap()
    }

    /// Every cpu of `t` with `fixed` load 0.9 except `idle`, and its SMT sibling.
    fn slots(t: &Topology, idle: &[u32]) -> Vec<CpuSlot> {
        let ids: Vec<u32> = t.cpus.iter().map(|c| c.cpu).collect();
        let sib = sibling_indices(&ids, |id| t.siblings(id), |id| ids.iter().position(|&x| x == id));
        t.cpus
            .iter()
            .zip(sib)
            .map(|(c, s)| CpuSlot {
                id: c.cpu,
                node: c.node,
                fixed: if idle.contains(&c.cpu) { 0.0 } else { 0.9 },
                settling: false,
                sibling: s,
                group: None,
                capacity: 1.0,
            })
            .collect()
    }

    fn vcpu(n: u32, demand: f64, cpu: Option<usize>, all: &CpuSet) -> VcpuSlot {
        VcpuSlot {
            domain: "a".into(),
            vcpu: n,
            demand,
            peak: demand,
            current: cpu.map_or_else(|| all.clone(), |c| CpuSet::single(u32::try_from(c).unwrap())),
            cpu,
            movable: true,
        }
    }

    fn target(plan: &[Action]) -> u32 {
        match plan {
            [Action::Pin { to, .. }] => to.as_single().unwrap(),
            other => panic!("one pin expected: {other:#?}"),
        }
    }

    #[test]
    fn a_floating_vcpu_is_placed_on_an_idle_core_before_the_idle_thread_of_a_busy_one() {
        for name in ["xeon-2s16c2t", "epyc-1s4ccx"] {
            let t = fixture(name);
            let last = t.cpus.last().unwrap().cpu;
            // cpu 0 is idle but its sibling is busy; the last cpu's core is idle on both threads.
            let idle_core = t.siblings(last);
            let mut idle = vec![0];
            idle.extend(&idle_core);
            let all = CpuSet(t.cpus.iter().map(|c| c.cpu).collect());
            let input = super::super::CpuInput { cpus: slots(&t, &idle), vcpus: vec![vcpu(0, 0.9, None, &all)] };
            let to = target(&plan(&input, &CpuPolicy::default()));
            assert!(idle_core.contains(&to), "{name}: placed on cpu {to}, not on the idle core {idle_core:?}");
        }
    }

    #[test]
    fn a_move_off_an_overloaded_cpu_prefers_a_target_on_an_idle_core() {
        let t = fixture("xeon-2s16c2t");
        // cpu 0 holds two busy vCPUs; cpu 1 is idle beside a busy sibling (33), cpus 2 and 34
        // form an idle core; all on node 0.
        let idle = [0, 1, 2, 34];
        let all = CpuSet(t.cpus.iter().map(|c| c.cpu).collect());
        let input = super::super::CpuInput {
            cpus: slots(&t, &idle),
            vcpus: vec![vcpu(0, 0.9, Some(0), &all), vcpu(1, 0.9, Some(0), &all)],
        };
        let to = target(&plan(&input, &CpuPolicy::default()));
        assert!([2, 34].contains(&to), "moved to cpu {to}, not to the idle core (2, 34)");
    }

    #[test]
    fn sibling_load_reads_the_other_thread_and_none_without_smt() {
        let t = fixture("xeon-2s16c2t");
        let input = super::super::CpuInput { cpus: slots(&t, &[]), vcpus: vec![] };
        let mut load = vec![0.0; 64];
        load[40] = 0.7;
        assert!((sibling_load(&input, &load, 8) - 0.7).abs() < 1e-12);
        assert!(on_busy_core(&input, &load, 8) && !on_busy_core(&input, &load, 40));
        let flat = super::super::CpuInput { cpus: slots(&Topology::flat(4), &[]), vcpus: vec![] };
        assert_eq!(sibling_load(&flat, &[1.0; 4], 0), 0.0);
    }

    /// `n` idle cpus of one node, cpu `i` and `i + n/2` the two threads of a core when `smt`.
    fn smt_cpus(n: usize, smt: bool) -> Vec<CpuSlot> {
        let mut c = crate::policy::cpu::fixtures::cpus(u32::try_from(n).unwrap());
        if smt {
            for (i, s) in c.iter_mut().enumerate() {
                s.sibling = Some((i + n / 2) % n);
            }
        }
        c
    }

    fn pinned(n: u32, demand: f64, cpu: usize) -> VcpuSlot {
        crate::policy::cpu::fixtures::vcpu("a", n, demand, Some(cpu))
    }

    #[test]
    fn two_busy_vcpus_on_the_threads_of_one_core_split_onto_an_idle_core() {
        // cpus 0 and 2 share a core, so do 1 and 3; each busy vCPU has a cpu to itself.
        let input = |smt| CpuInput { cpus: smt_cpus(4, smt), vcpus: vec![pinned(0, 0.9, 0), pinned(1, 0.9, 2)] };
        let to = target(&plan(&input(true), &CpuPolicy::default()));
        assert!([1, 3].contains(&to), "moved to cpu {to}, not to the idle core (1, 3)");
        // Without SMT each cpu is a core: nothing to do, as before.
        assert!(plan(&input(false), &CpuPolicy::default()).is_empty());
    }

    #[test]
    fn a_core_over_its_yield_sheds_a_vcpu_to_a_core_with_room() {
        // Core (0, 2) at 0.65 + 0.65 = 1.3, over the yield; core (1, 3) at 0.3. No cpu is over
        // `high`: balancing alone does nothing.
        let mut vcpus = vec![pinned(0, 0.35, 0), pinned(1, 0.3, 0), pinned(2, 0.65, 2), pinned(3, 0.3, 1)];
        let p = plan(&CpuInput { cpus: smt_cpus(4, true), vcpus: vcpus.clone() }, &CpuPolicy::default());
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(p[0].to_string().contains("SMT relief"), "{}", p[0]);
        let to = target(&p);
        assert!([1, 3].contains(&to), "moved to cpu {to}");
        // Under the yield (1.2): left alone, a core that shares a little loses no work.
        vcpus[0].demand = 0.25;
        vcpus[0].peak = 0.25;
        assert!(plan(&CpuInput { cpus: smt_cpus(4, true), vcpus }, &CpuPolicy::default()).is_empty());
    }

    #[test]
    fn a_preventive_move_does_not_fill_the_idle_thread_of_a_busy_core() {
        // cpu 0 at 0.8 (over high); cpu 1 idle beside cpu 3 at 0.7. Moving 0.4 to cpu 1 would
        // put core (1, 3) at 1.1: not made, while cpu 2, the idle sibling of cpu 0 itself,
        // takes it (no core gets busier). Counted per cpu, both targets were equal.
        let vcpus = vec![pinned(0, 0.4, 0), pinned(1, 0.4, 0), pinned(2, 0.7, 3)];
        let input = CpuInput { cpus: smt_cpus(4, true), vcpus };
        assert_eq!(target(&plan(&input, &CpuPolicy::default())), 2);
    }

    #[test]
    fn a_host_loaded_above_one_core_per_core_leaves_the_sharing_as_it_is() {
        // Three cores: (0, 3) holds two full vCPUs, (1, 4) two of `b`, (2, 5) is idle.
        let input = |b: f64| CpuInput {
            cpus: smt_cpus(6, true),
            vcpus: vec![pinned(0, 0.9, 0), pinned(1, 0.9, 3), pinned(2, b, 1), pinned(3, b, 4)],
        };
        // 2.8 cores of load on 3 cores: one full vCPU gets the idle core.
        let to = target(&plan(&input(0.5), &CpuPolicy::default()));
        assert!([2, 5].contains(&to), "moved to cpu {to}");
        // 3.2 cores on 3: some core has to share; SMT relief makes no move.
        assert!(plan(&input(0.7), &CpuPolicy::default()).is_empty());
    }
}
