//! `vm-balancer` binary: parse flags, set up logging, run the chosen subcommand.
//! Exit codes: 0 success, 1 runtime failure, 2 bad flags.

use std::process::ExitCode;

use anyhow::Context as _;
use log::error;

use vm_balancer::cli::{Cli, Command, Common};
use vm_balancer::daemon::{self, Agent, AgentConfig};
use vm_balancer::host::libvirt::LibvirtHost;
use vm_balancer::{actuate, diagnose};

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
            let text = if json { serde_json::to_string_pretty(&out)? + "\n" } else { diagnose::render_table(&out) };
            if !emit(&text)? {
                return Ok(());
            }
            if apply && !report.plan.is_empty() {
                let outcomes = actuate::apply(&mut agent.host, &snap, &report.plan, u64::MAX)?;
                let mut failed = 0;
                for (a, o) in report.plan.iter().zip(&outcomes) {
                    if let actuate::Outcome::Failed(e) = o {
                        error!("failed: {a}: {}", vm_balancer::host::chain(e));
                        failed += 1;
                    }
                }
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
            emit(&vm_balancer::sim::simulate(&common, &sim)?)?;
            Ok(())
        }
    }
}

/// Writes the program's output to stdout. A reader that went away (`| head`) is not an error:
/// returns `Ok(false)` and the program ends quietly.
fn emit(text: &str) -> std::io::Result<bool> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match vm_balancer::settings::parse(&argv) {
        Ok(cli) => cli,
        Err(vm_balancer::settings::ParseError::Clap(e)) => e.exit(),
        Err(vm_balancer::settings::ParseError::Settings(e)) => {
            eprintln!("error: {}", vm_balancer::host::chain(&e));
            return ExitCode::from(2);
        }
    };
    let common = match &cli.command {
        Command::Run { common, .. } | Command::Diagnose { common, .. } | Command::Simulate { common, .. } => common,
    };
    if let Err(msg) = common.validate() {
        eprintln!("error: {msg}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // Once: the log line when logging is set up (it goes to the same stderr), else a plain line.
        Err(e) => {
            if log::log_enabled!(log::Level::Error) {
                error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(1)
        }
    }
}
