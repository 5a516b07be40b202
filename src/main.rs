//! `vm-balancer` binary: parse flags, set up logging, run the chosen subcommand.
//! Exit codes: 0 success, 1 runtime failure, 2 bad flags.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use log::error;

use vm_balancer::cli::{Cli, Command, Common};
use vm_balancer::daemon::{self, Agent, AgentConfig, MemConfig};
use vm_balancer::memctl::MemTiming;
use vm_balancer::policy::mem::MemPolicy;
use vm_balancer::host::libvirt::LibvirtHost;
use vm_balancer::policy::cpu::CpuPolicy;
use vm_balancer::{actuate, diagnose};

fn agent_config(c: &Common, dry_run: bool) -> AgentConfig {
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
            // Two smoothing time constants: the moving averages have absorbed ~86% of the change.
            settle_ns: ns(c.smoothing).saturating_mul(2),
            cooldown_ns: ns(c.cooldown),
            ..CpuPolicy::default()
        }),
        mem: (!c.no_memory).then(|| MemConfig {
            policy: MemPolicy {
                floor_kib: c.guest_floor,
                host_reserve_kib: c.host_reserve,
                reclaim_above: c.reclaim_above,
                starve_below: c.starve_below,
                step_kib: c.mem_step,
                ..MemPolicy::default()
            },
            timing: MemTiming {
                min_age_ns: ns(c.min_age),
                cooldown_ns: ns(c.mem_cooldown),
                // A balloon moves hundreds of MiB per second; a guest that has not followed
                // after several stats intervals is not going to soon.
                target_timeout_ns: ns(c.mem_interval * 4).max(20_000_000_000),
                backoff_ns: 300_000_000_000,
            },
            interval: c.mem_interval,
            set_stats_period: !c.no_stats_period,
        }),
        dry_run,
    }
}

fn ns(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn init_logging(c: &Common) {
    env_logger::Builder::new()
        .filter_level(c.log_filter())
        .format_timestamp_millis()
        .format_target(false)
        .init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { common, dry_run } => {
            init_logging(&common);
            let host = LibvirtHost::new(&common.connect);
            daemon::run(Agent::new(host, agent_config(&common, dry_run)))
        }
        Command::Diagnose { common, interval, json, apply } => {
            init_logging(&common);
            let host = LibvirtHost::new(&common.connect);
            let mut cfg = agent_config(&common, true);
            // Both samples of a diagnosis carry balloon statistics.
            if let Some(m) = cfg.mem.as_mut() {
                m.interval = interval;
            }
            let mut agent = Agent::new(host, cfg);
            agent.step();
            if !agent.connected() {
                anyhow::bail!("cannot connect to {}", common.connect);
            }
            std::thread::sleep(interval);
            let report = agent.step();
            let snap = report.snapshot.context("no fresh sample: the connection dropped between the two samples")?;
            let out = diagnose::report(&snap, &report.plan, &report.mem_verdicts);
            if json {
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print!("{}", diagnose::render_table(&out));
            }
            if apply && !report.plan.is_empty() {
                let outcomes = actuate::apply(&mut agent.host, &snap, &report.plan)?;
                let failed = outcomes.iter().filter(|o| matches!(o, actuate::Outcome::Failed(_))).count();
                if failed > 0 {
                    anyhow::bail!("{failed} of {} actions failed", outcomes.len());
                }
            }
            Ok(())
        }
        Command::Simulate { common, sim } => {
            // One line per pin would drown the report: warnings only unless -v.
            let level = if common.verbose > 0 { common.log_filter() } else { log::LevelFilter::Warn };
            env_logger::Builder::new().filter_level(level).format_target(false).init();
            print!("{}", vm_balancer::sim::simulate(&common, &sim)?);
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let common = match &cli.command {
        Command::Run { common, .. } | Command::Diagnose { common, .. } | Command::Simulate { common, .. } => common,
    };
    if let Err(msg) = common.validate() {
        eprintln!("error: {msg}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
