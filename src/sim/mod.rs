//! The simulator: a host of any size in memory ([`SimHost`]), workloads (seeded generators and
//! replayed Bitbrains traces), reference policies, and the `simulate` report comparing them.
//!
//! The real [`crate::daemon::Agent`] runs over [`SimHost`] unchanged; the clock is virtual.

pub mod host;
pub mod traces;

pub use host::{ActionCounts, GuestSpec, IntervalStats, SimConfig, SimError, SimHost};

use crate::cli::Common;
use crate::daemon::AgentConfig;
use crate::policy::cpu::CpuPolicy;

/// The agent configuration the simulator runs `vm-balancer` with: the one place the simulator
/// builds an [`AgentConfig`], straight from the shared flags.
pub fn agent_config(c: &Common) -> AgentConfig {
    AgentConfig {
        quantum: c.quantum,
        smoothing: c.smoothing,
        cpus: c.cpus.clone(),
        exclude: c.exclude.clone(),
        cpu: (!c.no_cpu).then(|| CpuPolicy {
            high: c.high,
            min_gain: c.min_gain,
            max_repins: c.max_repins,
            flip_margin: c.flip_margin,
            cooldown_ns: u64::try_from(c.cooldown.as_nanos()).unwrap_or(u64::MAX),
            ..CpuPolicy::default()
        }),
        dry_run: false,
    }
}
