//! The simulator: a host of any size in memory ([`SimHost`]), workloads (seeded generators and
//! replayed Bitbrains traces), reference policies, and the `simulate` report comparing them.
//!
//! The real [`crate::daemon::Agent`] runs over [`SimHost`] unchanged; the clock is virtual.

pub mod baseline;
#[cfg(test)]
pub mod faulty;
pub mod host;
pub mod plot;
pub mod run;
pub mod traces;
pub mod workload;

pub use host::{ActionCounts, GuestSpec, IntervalStats, SimConfig, SimError, SimHost, TopologyKind};
pub use run::{Policy, PolicyReport, Report, RunSpec};
pub use workload::{Scenario, Workload};

use crate::cli::{Common, SimArgs};
use crate::daemon::AgentConfig;
use crate::policy::cpu::{CpuPolicy, Granularity};

/// The agent configuration the simulator runs `vm-balancer` with: the one place the simulator
/// builds an [`AgentConfig`], straight from the shared flags.
pub fn agent_config(c: &Common) -> AgentConfig {
    AgentConfig::from_flags(c, false)
}

/// Default host memory: 8 GiB per cpu.
pub fn default_host_mem_kib(cpus: u32) -> u64 {
    u64::from(cpus) * (8 << 20)
}

/// Builds the run of `vm-balancer simulate` from its flags: where the simulator's flags become
/// its configuration; nothing below reads them.
pub fn build(common: &Common, args: &SimArgs) -> Result<(RunSpec, Workload), SimError> {
    let cpus = args.host_cpus;
    let guests = args.guests.unwrap_or(2 * cpus as usize);
    let workload = match &args.traces {
        Some(dir) => Workload::from_traces(traces::load_trace_dir(dir)?, guests, cpus, args.seed)?,
        None => Workload::generated(args.scenario, guests, cpus, args.seed),
    };
    let mem = args.host_mem.unwrap_or_else(|| default_host_mem_kib(cpus));
    let host = SimConfig {
        topology: args.topology,
        smt_yield: args.smt_yield,
        remote_penalty: args.remote_penalty,
        ..SimConfig::new(cpus, mem, common.host_reserve)
    };
    let q = common.quantum.as_nanos().max(1);
    let quanta = u64::try_from(args.duration.as_nanos() / q).unwrap_or(u64::MAX).max(1);
    let baseline = baseline::BaselineConfig {
        high: common.high,
        free_above: common.reclaim_above,
        starve_below: common.starve_below,
        floor_kib: common.guest_floor,
        ..baseline::BaselineConfig::default()
    };
    let agent = agent_config(common);
    // Consolidation packs onto single cpus: its column runs at `cpu` granularity whatever
    // `--pin-granularity` says (the agent refuses the two together).
    let cpu = agent.cpu.clone().map(|p| CpuPolicy { granularity: Granularity::Cpu, ..p });
    let consolidate = AgentConfig { consolidate: agent.cpu.is_some(), cpu, ..agent.clone() };
    let at = |g: Granularity| {
        let cpu = agent.cpu.clone().map(|p| CpuPolicy { granularity: g, ..p });
        AgentConfig { cpu, ..agent.clone() }
    };
    let granularities = if args.compare_granularities && agent.cpu.is_some() {
        vec![(Policy::OursCore, at(Granularity::Core)), (Policy::OursLlc, at(Granularity::Llc))]
    } else {
        Vec::new()
    };
    Ok((RunSpec { host, quantum: common.quantum, quanta, agent, consolidate, baseline, granularities }, workload))
}

/// `vm-balancer simulate`: runs every policy and renders the report (table or JSON).
pub fn simulate(common: &Common, args: &SimArgs) -> Result<String, SimError> {
    let (spec, workload) = build(common, args)?;
    // Fail on a host that cannot hold the guests, or a plot that cannot be written, before
    // spending minutes.
    SimHost::new(spec.host.clone(), workload.specs())?;
    let plot_file = match &args.plot {
        Some(path) => Some((path, std::fs::File::create(path).map_err(|e| SimError::Plot(path.clone(), e))?)),
        None => None,
    };
    let report = if args.seeds > 1 {
        let mut runs = Vec::new();
        for seed in args.seed..args.seed.saturating_add(args.seeds) {
            let (spec, workload) = build(common, &SimArgs { seed, ..args.clone() })?;
            runs.push(run::SeedReport { seed, policies: run::run_all(&spec, &workload)?.policies });
        }
        Report::combine(runs)
    } else {
        run::run_all(&spec, &workload)?
    };
    let vcpus: u32 = workload.specs().iter().map(|g| g.vcpus).sum();
    if let Some((path, mut file)) = plot_file {
        let title = format!(
            "{}: {} cpus, {} guests, {} vCPUs, {}{}",
            args.traces.as_ref().map_or_else(
                || format!("{:?} scenario", args.scenario),
                |d| format!("traces {}", d.file_name().unwrap_or(d.as_os_str()).to_string_lossy())
            ),
            spec.host.cpus,
            workload.specs().len(),
            vcpus,
            humantime::format_duration(args.duration),
            if args.seeds > 1 { format!(", mean of {} seeds", args.seeds) } else { String::new() },
        );
        let lines: Vec<(&str, &plot::Series)> = report.policies.iter().map(|p| (p.name.as_str(), &p.series)).collect();
        let svg = plot::render_svg(&title, &lines)?;
        std::io::Write::write_all(&mut file, svg.as_bytes()).map_err(|e| SimError::Plot(path.clone(), e))?;
    }
    if args.json {
        return Ok(run::render_json(&report) + "\n");
    }
    let header = format!(
        "simulated host: {} cpus, {} MiB, {} guests, {} vCPUs; {} quanta of {} ({} virtual){}\n\n",
        spec.host.cpus,
        spec.host.mem_total_kib / 1024,
        workload.specs().len(),
        vcpus,
        spec.quanta,
        humantime::format_duration(spec.quantum),
        humantime::format_duration(args.duration),
        if args.seeds > 1 { format!("; seeds {} to {}", args.seed, args.seed + args.seeds - 1) } else { String::new() },
    );
    Ok(header + &run::render_table(&report))
}
