//! `vm-balancer` binary: parse flags, set up logging, run the chosen subcommand.
//! Exit codes: 0 success, 1 runtime failure, 2 bad flags.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use log::error;

use vm_balancer::cli::{Cli, Command, Common};
use vm_balancer::daemon::{self, Agent, AgentConfig};
use vm_balancer::host::libvirt::LibvirtHost;
use vm_balancer::{actuate, diagnose, release};

fn init_logging(c: &Common) {
    env_logger::Builder::new().filter_level(c.log_filter()).format_timestamp_millis().format_target(false).init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { common, dry_run } => {
            init_logging(&common);
            let host = LibvirtHost::new(&common.connect);
            daemon::run(Agent::new(host, AgentConfig::from_flags(&common, dry_run)))
        }
        Command::Diagnose { common, interval, json, apply } => {
            init_logging(&common);
            let host = LibvirtHost::new(&common.connect);
            let mut cfg = AgentConfig::from_flags(&common, true);
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
                let outcomes = release::apply_recorded(&mut agent.host, &snap, &report.plan)?;
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
        Command::Release { common, domains } => {
            init_logging(&common);
            release::command(&common, &domains)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let common = match &cli.command {
        Command::Run { common, .. }
        | Command::Diagnose { common, .. }
        | Command::Simulate { common, .. }
        | Command::Release { common, .. } => common,
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
