//! Plain planner inputs for the unit tests of the planners that read `CpuInput` (the balancer,
//! consolidation, the re-pack, the safeguard): one way to write a cpu and a vCPU.

use super::{CpuSet, CpuSlot, VcpuSlot};

/// `n` idle cpus of one node, without SMT siblings.
pub fn cpus(n: u32) -> Vec<CpuSlot> {
    (0..n)
        .map(|id| CpuSlot { id, node: 0, fixed: 0.0, settling: false, sibling: None, group: None, capacity: 1.0 })
        .collect()
}

/// A movable vCPU whose peak is its demand, pinned to `cpu` (an index into the cpus), or
/// floating over cpus 0-3 when `None`.
pub fn vcpu(dom: &str, n: u32, demand: f64, cpu: Option<usize>) -> VcpuSlot {
    VcpuSlot {
        domain: dom.into(),
        vcpu: n,
        demand,
        peak: demand,
        current: cpu.map_or(CpuSet(vec![0, 1, 2, 3]), |c| CpuSet::single(u32::try_from(c).unwrap_or(u32::MAX))),
        cpu,
        movable: true,
    }
}
