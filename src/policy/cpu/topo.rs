//! SMT awareness of the CPU planner, kept in its own file: a physical core whose two threads
//! are both busy does less than two cores of work, so a busy vCPU should go to an idle core
//! before the idle sibling thread of a busy one. The planner reads each cpu's SMT sibling
//! (`CpuSlot::sibling`, from the host topology) and uses these helpers as tie-breaks only:
//! the gains, the thresholds and the never-flip rule still count each cpu on its own.

use super::{CpuInput, EPS};

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
}
