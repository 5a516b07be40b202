//! `vm-balancer` binary: parse flags, set up logging, run the chosen subcommand.
//! Exit codes: 0 success, 1 runtime failure, 2 bad flags.

use std::process::ExitCode;

use anyhow::Context as _;
use log::error;

use vm_balancer::cli::{Cli, Command, Common};
use vm_balancer::daemon::{self, Agent, AgentConfig};
use vm_balancer::host::libvirt::LibvirtHost;
use vm_balancer::policy::cpu::Granularity;
use vm_balancer::{actuate, diagnose, release};

/// True when stderr is the journal's stream (`JOURNAL_STREAM` names its device and inode, as
/// sd-daemon(3) says to check): lines then carry a syslog priority and no timestamp.
fn stderr_is_journal() -> bool {
    let Some(want) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Ok(st) = nix::sys::stat::fstat(libc_stderr()) else { return false };
    want.to_str() == Some(&format!("{}:{}", st.st_dev, st.st_ino))
}

fn libc_stderr() -> std::os::fd::RawFd {
    use std::os::fd::AsRawFd as _;
    std::io::stderr().as_raw_fd()
}

fn init_logging(c: &Common) {
    use std::io::Write as _;
    let mut b = env_logger::Builder::new();
    // Every level reaches the logger; `log::set_max_level` chooses, so SIGHUP can change it.
    b.filter_level(log::LevelFilter::Trace).format_target(false);
    if stderr_is_journal() {
        b.format(|f, r| {
            let prio = match r.level() {
                log::Level::Error => 3,
                log::Level::Warn => 4,
                log::Level::Info => 6,
                log::Level::Debug | log::Level::Trace => 7,
            };
            writeln!(f, "<{prio}>{}", r.args())
        });
    } else {
        b.format_timestamp_millis();
    }
    b.init();
    log::set_max_level(c.log_filter());
}

/// The settings again, for SIGHUP: the same command line, the settings file read anew.
fn reload(
    argv: &[std::ffi::OsString],
    connect: &str,
    listen: Option<std::net::SocketAddr>,
) -> Result<(AgentConfig, log::LevelFilter), String> {
    let cli = vm_balancer::settings::parse_reload(argv).map_err(|e| match e {
        vm_balancer::settings::ParseError::Settings(e) => vm_balancer::host::chain(&e),
        vm_balancer::settings::ParseError::Clap(e) => e.to_string().lines().next().unwrap_or("").to_string(),
    })?;
    let Command::Run { common, dry_run, metrics_listen } = cli.command else {
        return Err("not the run command".into());
    };
    common.validate()?;
    check_host_cpus(cli_host_cpus(None).as_ref(), &common)?;
    if common.connect != connect {
        log::warn!("SIGHUP: --connect changed to {}: restart the service to use it", common.connect);
    }
    if metrics_listen != listen {
        log::warn!("SIGHUP: --metrics-listen changed: restart the service to use it");
    }
    Ok((AgentConfig::from_flags(&common, dry_run), common.log_filter()))
}

/// The cpus the flags may name, as (present, online): this host's, or the simulated host's
/// (`simulate --host-cpus N`, all online). `None` when they cannot be read: the agent then
/// finds out at run time (a pin to a cpu that is not there fails, and is not tried again).
fn cli_host_cpus(simulated: Option<u32>) -> Option<(Vec<u32>, Vec<u32>)> {
    let root = std::path::Path::new("/");
    match simulated {
        Some(n) => Some(((0..n).collect(), (0..n).collect())),
        None => Some((
            vm_balancer::host::procfs::present_cpus(root).ok()?,
            vm_balancer::host::procfs::online_cpus(root).ok()?,
        )),
    }
}

/// The flags naming host cpus against the host's; a cpu of them offline is a warning line
/// (through the log once it is set up, else on stderr).
fn check_host_cpus(cpus: Option<&(Vec<u32>, Vec<u32>)>, common: &Common) -> Result<(), String> {
    let Some((present, online)) = cpus else { return Ok(()) };
    if let Some(w) = common.check_host_cpus(present, online)? {
        if log::log_enabled!(log::Level::Warn) {
            log::warn!("{w}");
        } else {
            eprintln!("warning: {w}");
        }
    }
    Ok(())
}

fn run(cli: Cli, argv: &[std::ffi::OsString]) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { common, dry_run, metrics_listen } => {
            init_logging(&common);
            // Bound before the loop starts: an address in use fails the start (exit 1; 2 when
            // the sandbox forbids it).
            let metrics = metrics_listen.map(vm_balancer::metrics::Metrics::listen).transpose()?;
            let host = LibvirtHost::new(&common.connect);
            let (connect, listen) = (common.connect.clone(), metrics_listen);
            let agent = Agent::new(host, AgentConfig::from_flags(&common, dry_run));
            daemon::run(agent, &|| reload(argv, &connect, listen), metrics)
        }
        Command::Diagnose { common, interval, json, apply, repack } => {
            init_logging(&common);
            let host = LibvirtHost::new(&common.connect);
            let mut cfg = AgentConfig::from_flags(&common, true);
            // Both samples of a diagnosis carry balloon statistics.
            if let Some(m) = cfg.mem.as_mut() {
                m.interval = interval;
            }
            // Two samples are all diagnose has: its advice is the condition over its interval,
            // not over --overload-window, and its reason says so.
            cfg.advice.window = std::time::Duration::ZERO;
            let advice_note = format!(
                "; seen over diagnose's {} interval (the agent advises only after --overload-window {})",
                humantime::format_duration(interval),
                humantime::format_duration(common.overload_window)
            );
            let mut agent = Agent::new(host, cfg);
            agent.step();
            if !agent.connected() {
                anyhow::bail!("cannot connect to {}", common.connect);
            }
            std::thread::sleep(interval);
            let report = agent.step();
            let snap = report.snapshot.context("no fresh sample: the connection dropped between the two samples")?;
            let capacity = report.capacity.unwrap_or_default();
            let repack = if repack {
                let p = agent.repack_plan(&snap).context("--repack needs the CPU balancer, and --no-cpu is set")?;
                Some(diagnose::RepackOut::new(&p))
            } else {
                None
            };
            // With --repack, the plan (what --apply applies) is the re-pack's pins.
            let plan = repack.as_ref().map_or_else(|| report.plan.clone(), diagnose::RepackOut::plan);
            let mut out = diagnose::report(&snap, &plan, &report.mem_verdicts, &capacity, &advice_note);
            out.repack = repack;
            if let Some(pol) = agent.config().cpu.as_ref().filter(|p| p.granularity != Granularity::Cpu) {
                out.host.pin_granularity = pol.granularity.name();
                let groups = vm_balancer::policy::cpu::groups(&snap.host.cpus, &snap.host.topology, pol.granularity);
                out.host.pin_groups = groups.into_iter().map(|(set, _)| set).collect();
            }
            // Applied before the report is printed: a reader that is slow (a pager) or gone
            // must neither age the plan nor skip it.
            let mut failed = 0;
            if apply && !plan.is_empty() {
                // A re-pack's steps go in order, at once: a one-shot has no quanta to wait. The
                // balancer's plan is applied only on a sample at most two quanta old, as the
                // daemon's.
                let max_age = if out.repack.is_some() { u64::MAX } else { actuate::max_plan_age_ns(common.quantum) };
                let g = agent.config().pin_granularity();
                let outcomes = release::apply_recorded(&mut agent.host, &snap, &plan, max_age, g)?;
                if let Some(w) = actuate::stale_warning(&outcomes) {
                    log::warn!("{w}");
                }
                for (a, o) in plan.iter().zip(&outcomes) {
                    match o {
                        actuate::Outcome::Failed(e) => error!("failed: {a}: {}", vm_balancer::host::chain(e)),
                        // A one-shot has no next quantum to plan again: not applied is a failure.
                        actuate::Outcome::Stale { .. } => {}
                        _ => continue,
                    }
                    failed += 1;
                }
            }
            let text = if json { serde_json::to_string_pretty(&out)? + "\n" } else { diagnose::render_table(&out) };
            emit(&text)?;
            if failed > 0 {
                anyhow::bail!("{failed} of {} actions failed or were not applied", plan.len());
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
        Command::Release { common, domains } => {
            init_logging(&common);
            release::command(&common.connect, common.keep_pins_on_exit, common.pin_granularity, &domains)
        }
        Command::GenerateAssets { dir } => {
            let written = vm_balancer::assets::write_all(&dir)?;
            let list: String = written.iter().map(|p| format!("{}\n", p.display())).collect();
            emit(&list)?;
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
    // `release` is the safety net run after every stop, a crash included: a bad settings line
    // is a warning for it, not a reason to leave the pins (its own flags are still checked).
    let release = vm_balancer::settings::subcommand(&argv) == Some("release");
    let parsed = if release {
        let (cli, warnings) = vm_balancer::settings::parse_leniently(&argv);
        for w in warnings {
            eprintln!("warning: {w}");
        }
        cli
    } else {
        vm_balancer::settings::parse(&argv)
    };
    let cli = match parsed {
        Ok(cli) => cli,
        Err(vm_balancer::settings::ParseError::Clap(e)) => e.exit(),
        Err(vm_balancer::settings::ParseError::Settings(e)) => {
            eprintln!("error: {}", vm_balancer::host::chain(&e));
            return ExitCode::from(2);
        }
    };
    match cli.command.common().map(Common::validate) {
        Some(Err(msg)) if release => eprintln!("warning: {msg} (release plans nothing: going on)"),
        Some(Err(msg)) => {
            eprintln!("error: {msg}");
            return ExitCode::from(2);
        }
        _ => {}
    }
    if let Command::Diagnose { common, repack: true, .. } = &cli.command
        && let Err(msg) = common.packs_onto_single_cpus("--repack")
    {
        eprintln!("error: {msg}");
        return ExitCode::from(2);
    }
    // Flags naming host cpus, against the host's (`release` pins nothing new).
    let online = match &cli.command {
        Command::Run { .. } | Command::Diagnose { .. } => cli_host_cpus(None),
        Command::Simulate { sim, .. } => cli_host_cpus(Some(sim.host_cpus)),
        Command::Release { .. } | Command::GenerateAssets { .. } => None,
    };
    if let Some(Err(msg)) = cli.command.common().map(|c| check_host_cpus(online.as_ref(), c)) {
        eprintln!("error: {msg}");
        return ExitCode::from(2);
    }
    match run(cli, &argv) {
        Ok(()) => ExitCode::SUCCESS,
        // Once: the log line when logging is set up (it goes to the same stderr), else a plain line.
        Err(e) => {
            if log::log_enabled!(log::Level::Error) {
                error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            // A setting no restart mends: like a bad flag, exit 2 (the unit does not restart).
            let config = e.downcast_ref::<vm_balancer::metrics::MetricsError>().is_some_and(|m| m.is_configuration());
            ExitCode::from(if config { 2 } else { 1 })
        }
    }
}
