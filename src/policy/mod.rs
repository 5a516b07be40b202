//! Planners: pure functions from a [`crate::model::Snapshot`] (plain data) to a [`Plan`], and
//! the capacity advice ([`advice`]) and the scheduled re-pack ([`repack`]) from the same data.
//! Consolidation ([`consolidate`]) runs on the CPU balancer's input after it.

pub mod advice;
pub mod consolidate;
pub mod cpu;
pub mod emulator;
pub mod mem;
pub mod repack;

use serde::Serialize;

use crate::host::{CpuSet, QemuThread};

/// One action of a plan, with the reason an operator reads in the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum Action {
    /// Pin one vCPU to one host cpu.
    Pin { domain: String, vcpu: u32, from: CpuSet, to: CpuSet, kind: PinKind, reason: String },
    /// Resize a guest's balloon.
    Balloon { domain: String, from_kib: u64, to_kib: u64, reason: String },
    /// Pin QEMU's emulator thread or one I/O thread of a guest to a set of host cpus.
    #[serde(rename = "pin_thread")]
    PinThread { domain: String, thread: QemuThread, from: CpuSet, to: CpuSet, reason: String },
}

impl Action {
    pub fn domain(&self) -> &str {
        match self {
            Action::Pin { domain, .. } | Action::Balloon { domain, .. } | Action::PinThread { domain, .. } => domain,
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Pin { domain, vcpu, from, to, reason, .. } => {
                write!(f, "pin vCPU {vcpu} of {domain} {from} -> {to}: {reason}")
            }
            Action::Balloon { domain, from_kib, to_kib, reason } => {
                write!(f, "balloon {domain} {} -> {} MiB: {reason}", from_kib / 1024, to_kib / 1024)
            }
            Action::PinThread { domain, thread, from, to, reason } => {
                write!(f, "pin {thread} of {domain} {from} -> {to}: {reason}")
            }
        }
    }
}

/// Which rule of the CPU planner chose a pin: one spelling for logs, JSON and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PinKind {
    /// First pin of a vCPU that floated over several cpus.
    Placement,
    /// A balancing move to a freer cpu.
    Move,
    /// One half of a balancing swap.
    Swap,
    /// A move off a cpu whose vCPUs' recent peaks add up to more than `--peak-limit`.
    PeakSafety,
    /// A step of a scheduled (or `diagnose --repack`) re-pack.
    Repack,
    /// The safeguard giving a vCPU back the pin it had before a re-pack or a balancing move
    /// set that did not pay off.
    Rollback,
    /// A move of a low-demand vCPU that leaves a core with no vCPU (`--consolidate`).
    Consolidate,
}

impl PinKind {
    pub const ALL: [PinKind; 7] = [
        PinKind::Placement,
        PinKind::Move,
        PinKind::Swap,
        PinKind::PeakSafety,
        PinKind::Consolidate,
        PinKind::Repack,
        PinKind::Rollback,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PinKind::Placement => "placement",
            PinKind::Move => "move",
            PinKind::Swap => "swap",
            PinKind::PeakSafety => "peak_safety",
            PinKind::Repack => "repack",
            PinKind::Rollback => "rollback",
            PinKind::Consolidate => "consolidate",
        }
    }
}

impl std::fmt::Display for PinKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The actions of one quantum, in the order they are applied.
pub type Plan = Vec<Action>;
