//! The agent's configuration: built once from the flags (`AgentConfig::from_flags`, called
//! by `main` and the simulator's `build`), and what the loop derives from it (the model's
//! allowed cpus, the discovery cadence). Nothing below the loop reads clap's structs.

use std::time::Duration;

use log::error;

use crate::capacity::AdviceConfig;
use crate::cli::Common;
use crate::memctl::MemTiming;
use crate::model::ModelConfig;
use crate::policy::cpu::CpuPolicy;
use crate::policy::emulator::EmulatorCpus;
use crate::policy::mem::MemPolicy;
use crate::repacker::RepackConfig;

/// Everything the agent is told by its flags.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub quantum: Duration,
    pub smoothing: Duration,
    /// Window of each vCPU's peak demand.
    pub peak_window: Duration,
    /// `None`: all online cpus.
    pub cpus: Option<Vec<u32>>,
    pub exclude: Vec<String>,
    pub cpu: Option<CpuPolicy>,
    /// Where the emulator and I/O threads of the guests the CPU balancer manages go.
    pub emulator: EmulatorCpus,
    /// Consolidation (`--consolidate`) after the CPU balancer, with its limits; never without it.
    pub consolidate: bool,
    pub mem: Option<MemConfig>,
    /// Change nothing; plans are still made and reported.
    pub dry_run: bool,
    /// On a clean stop, leave the agent's pins instead of giving back the prior affinities.
    pub keep_pins_on_exit: bool,
    /// The capacity advice (made whether or not the balancers are on).
    pub advice: AdviceConfig,
    /// The scheduled re-pack (with the CPU balancer only).
    pub repack: RepackConfig,
}

impl AgentConfig {
    /// What the balancer pins a vCPU to; `cpu` with the balancer off.
    pub fn pin_granularity(&self) -> crate::policy::cpu::Granularity {
        self.cpu.as_ref().map_or(crate::policy::cpu::Granularity::Cpu, |p| p.granularity)
    }

    /// The agent's configuration from its flags: the one place flags become policy.
    pub fn from_flags(c: &Common, dry_run: bool) -> Self {
        AgentConfig {
            quantum: c.quantum,
            smoothing: c.smoothing,
            peak_window: c.peak_window,
            cpus: c.cpus.as_ref().map(|l| l.0.clone()),
            exclude: c.exclude.clone(),
            cpu: (!c.no_cpu).then(|| CpuPolicy {
                high: c.high,
                min_gain: c.min_gain,
                max_repins: c.max_repins,
                max_placements: c.max_placements,
                flip_margin: c.flip_margin,
                // Two smoothing time constants: the moving averages have absorbed ~86% of the change.
                settle_ns: ns(c.smoothing).saturating_mul(2),
                cooldown_ns: ns(c.cooldown),
                peak_limit: c.peak_limit,
                delay_margin: c.delay_margin,
                granularity: c.pin_granularity,
                ..CpuPolicy::default()
            }),
            emulator: c.emulator_cpus.clone(),
            consolidate: c.consolidate && !c.no_cpu,
            mem: (!c.no_memory).then(|| MemConfig {
                policy: MemPolicy {
                    floor_kib: c.guest_floor,
                    host_reserve_kib: c.host_reserve,
                    reclaim_above: c.reclaim_above,
                    starve_below: c.starve_below,
                    step_kib: c.mem_step,
                    grant_step_kib: c.mem_step.saturating_mul(4),
                    ..MemPolicy::default()
                },
                timing: MemTiming {
                    min_age_ns: ns(c.min_age),
                    cooldown_ns: ns(c.mem_cooldown),
                    // A balloon moves hundreds of MiB per second; a guest that has not followed
                    // after several stats intervals is not going to soon.
                    target_timeout_ns: ns(c.mem_interval * 4).max(20_000_000_000),
                    backoff_ns: 300_000_000_000,
                    reclaim_window_ns: ns(c.reclaim_window),
                    // A grant the host has not paid for yet counts against the budget a day at
                    // most (memctl/credit.rs: shorter timeouts broke the reserve in the simulator).
                    credit_timeout_ns: 86_400_000_000_000,
                },
                interval: c.mem_interval,
                quiet_interval: c.mem_quiet_interval,
                set_stats_period: !c.no_stats_period,
            }),
            dry_run,
            keep_pins_on_exit: c.keep_pins_on_exit,
            advice: AdviceConfig {
                window: c.overload_window,
                high: c.high,
                host_reserve_kib: c.host_reserve,
                host_psi_limit: MemPolicy::default().host_psi_limit,
            },
            repack: RepackConfig { schedule: c.repack_schedule.clone(), min_gain: c.repack_min_gain },
        }
    }
}

/// The model's settings: the allowed cpus are those of `--cpus` that are online, less those
/// a pin was refused onto lately (`refused`, [`crate::failures`]).
pub(super) fn model_config(cfg: &AgentConfig, topo: &crate::host::Topology, refused: &[u32]) -> ModelConfig {
    let online: Vec<u32> = topo.cpus.iter().map(|c| c.cpu).collect();
    let allowed: Vec<u32> = match &cfg.cpus {
        Some(want) => want.iter().copied().filter(|c| online.contains(c)).collect(),
        None => online.clone(),
    };
    let allowed: Vec<u32> = allowed.into_iter().filter(|c| !refused.contains(c)).collect();
    if allowed.is_empty() {
        error!("none of the cpus given by --cpus is online (online: {})", crate::cpulist::format(&online));
    }
    ModelConfig {
        smoothing_ns: ns(cfg.smoothing),
        peak_ns: ns(cfg.peak_window),
        allowed_cpus: allowed,
        exclude: cfg.exclude.clone(),
    }
}

/// Discovery cadence and budget from the quantum: definitions re-read every five quanta
/// (2 s to 60 s), discovery allowed a quarter of a quantum (at least 20 ms).
pub(super) fn discovery_for(quantum: Duration) -> crate::collect::DiscoveryConfig {
    let q = ns(quantum);
    crate::collect::DiscoveryConfig {
        refresh_ns: q.saturating_mul(5).clamp(2_000_000_000, 60_000_000_000),
        watched_refresh_ns: q.saturating_mul(300).clamp(60_000_000_000, 600_000_000_000),
        refresh_per_quantum: 8,
        budget_ns: (q / 4).max(20_000_000),
    }
}

pub(super) fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The memory balancer's configuration.
#[derive(Debug, Clone)]
pub struct MemConfig {
    pub policy: MemPolicy,
    pub timing: MemTiming,
    /// Cadence of the balloon statistics (and so of memory plans).
    pub interval: Duration,
    /// A quiet guest's last reading is carried forward this long at most (0: every guest is
    /// read every interval).
    pub quiet_interval: Duration,
    /// Turn on the balloon stats period of guests that have a balloon but no period.
    pub set_stats_period: bool,
}
