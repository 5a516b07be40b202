//! Command line. Every tuning flag can also come from an environment variable
//! `VM_BALANCER_<FLAG>` and from the settings file (`crate::settings`); a flag on the command
//! line wins.
//! Malformed or out-of-range values stop the program with one line naming the flag and the
//! allowed range, exit code 2 (clap's usage error code).

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::policy::emulator::EmulatorCpus;
use crate::units;

#[derive(Debug, Parser)]
#[command(name = "vm-balancer", version, about = "Balances vCPU pins and guest balloons on a libvirt/KVM host")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the balancing loop (what systemd starts).
    Run {
        #[command(flatten)]
        common: Common,
        /// Log each plan, change nothing.
        #[arg(long, env = "VM_BALANCER_DRY_RUN")]
        dry_run: bool,
        /// Serve Prometheus metrics at http://ADDR:PORT/metrics, e.g. 127.0.0.1:9848 (default:
        /// off).
        #[arg(long, value_name = "ADDR:PORT", value_parser = listen_addr, env = "VM_BALANCER_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Sample twice, print the host, the domains and the plan the balancer would apply now.
    Diagnose {
        #[command(flatten)]
        common: Common,
        /// Time between the two samples.
        #[arg(long, default_value = "2s", value_parser = interval, env = "VM_BALANCER_INTERVAL")]
        interval: Duration,
        /// Print one JSON document instead of tables.
        #[arg(long)]
        json: bool,
        /// Apply the plan once.
        #[arg(long)]
        apply: bool,
        /// Show (with --apply: apply) the re-pack the schedule would make now, and its gain,
        /// instead of the balancer's plan.
        #[arg(long)]
        repack: bool,
    },
    /// Run the balancer and reference policies over a simulated host in virtual time and
    /// report balance quality and cost side by side.
    Simulate {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        sim: SimArgs,
    },
    /// Give back the vCPU pins the agent recorded (after a crash; for `ExecStopPost=`).
    ///
    /// Sets each vCPU (and emulator or I/O thread) the agent pinned on a running guest back to
    /// the affinity it had before, and clears the record. Does nothing with --keep-pins-on-exit.
    Release {
        #[command(flatten)]
        common: Common,
        /// Only these domains (default: every running domain).
        #[arg(value_name = "DOMAIN")]
        domains: Vec<String>,
    },
    /// Write the man page and the shell completions into DIR (the package build runs this:
    /// `lab/package.sh`).
    #[command(hide = true)]
    GenerateAssets {
        /// Created when missing; files of the same names are replaced.
        #[arg(value_name = "DIR")]
        dir: std::path::PathBuf,
    },
}

impl Command {
    /// The shared flags of the subcommand; `None` for one that has none.
    pub fn common(&self) -> Option<&Common> {
        match self {
            Command::Run { common, .. }
            | Command::Diagnose { common, .. }
            | Command::Simulate { common, .. }
            | Command::Release { common, .. } => Some(common),
            Command::GenerateAssets { .. } => None,
        }
    }
}

/// Flags of `simulate`.
#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Built-in generated workload (ignored with --traces).
    #[arg(long, value_enum, default_value = "mixed", env = "VM_BALANCER_SCENARIO")]
    pub scenario: crate::sim::workload::Scenario,
    /// Directory of per-VM CSV traces in the Bitbrains GWA-T-12 format, replayed instead of a scenario.
    #[arg(long, value_name = "DIR", env = "VM_BALANCER_TRACES")]
    pub traces: Option<std::path::PathBuf>,
    /// Virtual time to simulate. 1s to 30 days.
    #[arg(long, default_value = "1h", value_parser = sim_duration, env = "VM_BALANCER_DURATION")]
    pub duration: Duration,
    /// Cpus of the simulated host. 1 to 4096.
    #[arg(long, default_value = "64", value_parser = host_cpus, env = "VM_BALANCER_HOST_CPUS")]
    pub host_cpus: u32,
    /// Memory of the simulated host (default: 8 GiB per cpu).
    #[arg(long, value_name = "SIZE", value_parser = size, env = "VM_BALANCER_HOST_MEM")]
    pub host_mem: Option<u64>,
    /// Guests to fill the host with (default: 2 per cpu). 1 to 100000.
    #[arg(long, value_parser = guests, env = "VM_BALANCER_GUESTS")]
    pub guests: Option<usize>,
    /// Seed of the workload generators and trace offsets.
    #[arg(long, default_value = "1", env = "VM_BALANCER_SEED")]
    pub seed: u64,
    /// Runs this many seeds (`--seed`, `--seed`+1, ...) and reports the mean of each figure:
    /// delay is driven by rare events, so one seed can mislead. 1 to 64.
    #[arg(long, default_value = "1", value_parser = seeds, env = "VM_BALANCER_SEEDS")]
    pub seeds: u64,
    /// Layout of the simulated host's cpus: `smt` (2 sockets = 2 NUMA nodes, 2 threads a
    /// core, Linux numbering) or `flat` (one node, one thread a core: no SMT or NUMA cost).
    #[arg(long, value_enum, default_value_t = crate::sim::TopologyKind::default(), env = "VM_BALANCER_TOPOLOGY")]
    pub topology: crate::sim::TopologyKind,
    /// Work of a physical core with both threads busy, in cores (each thread then does its
    /// share of it). 1.0 to 2.0.
    #[arg(long, value_name = "CORES", default_value_t = crate::sim::host::topo::DEFAULT_SMT_YIELD, value_parser = smt_yield, env = "VM_BALANCER_SMT_YIELD")]
    pub smt_yield: f64,
    /// Fraction of its work a vCPU loses while it runs off its guest's home NUMA node. 0 to 0.9.
    #[arg(long, value_name = "FRACTION", default_value_t = crate::sim::host::topo::DEFAULT_REMOTE_PENALTY, value_parser = remote_penalty, env = "VM_BALANCER_REMOTE_PENALTY")]
    pub remote_penalty: f64,
    /// Also run the agent at `--pin-granularity core` and `llc` (the columns `vm-balancer-core`
    /// and `vm-balancer-llc`, every other flag the same), beside `vm-balancer` at the
    /// granularity given.
    #[arg(long, env = "VM_BALANCER_COMPARE_GRANULARITIES")]
    pub compare_granularities: bool,
    /// Print one JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also draw the figures over time, one line per policy, into this SVG file (over several
    /// seeds: their mean).
    #[arg(long, value_name = "FILE.svg", env = "VM_BALANCER_PLOT")]
    pub plot: Option<std::path::PathBuf>,
}

fn sim_duration(s: &str) -> Result<Duration, String> {
    units::parse_duration_in(s, Duration::from_secs(1), Duration::from_secs(30 * 86_400))
}
fn whole_in(s: &str, min: u64, max: u64) -> Result<u64, String> {
    let v: u64 = s.trim().parse().map_err(|_| format!("{s:?} is not a whole number"))?;
    if !(min..=max).contains(&v) {
        return Err(format!("{s:?} is out of range: allowed {min} to {max}"));
    }
    Ok(v)
}
fn seeds(s: &str) -> Result<u64, String> {
    whole_in(s, 1, 64)
}
fn host_cpus(s: &str) -> Result<u32, String> {
    whole_in(s, 1, 4096).map(|v| u32::try_from(v).unwrap_or(4096))
}
fn smt_yield(s: &str) -> Result<f64, String> {
    units::parse_f64_in(s, 1.0, 2.0)
}
fn remote_penalty(s: &str) -> Result<f64, String> {
    units::parse_f64_in(s, 0.0, 0.9)
}
fn guests(s: &str) -> Result<usize, String> {
    whole_in(s, 1, 100_000).map(|v| usize::try_from(v).unwrap_or(100_000))
}

fn quantum(s: &str) -> Result<Duration, String> {
    units::parse_duration_in(s, Duration::from_millis(100), Duration::from_secs(3600))
}
fn interval(s: &str) -> Result<Duration, String> {
    units::parse_duration_in(s, Duration::from_millis(100), Duration::from_secs(600))
}
fn long_duration(s: &str) -> Result<Duration, String> {
    units::parse_duration_in(s, Duration::ZERO, Duration::from_secs(86_400))
}
fn quiet_interval(s: &str) -> Result<Duration, String> {
    units::parse_duration_in(s, Duration::ZERO, Duration::from_secs(3600))
}
fn smoothing(s: &str) -> Result<Duration, String> {
    units::parse_duration_in(s, Duration::from_millis(1), Duration::from_secs(3600))
}
fn high(s: &str) -> Result<f64, String> {
    units::parse_f64_in(s, 0.1, 1.0)
}
fn peak_limit(s: &str) -> Result<f64, String> {
    units::parse_f64_in(s, 0.5, 4.0)
}
fn gain(s: &str) -> Result<f64, String> {
    units::parse_f64_in(s, 0.0, 1.0)
}
fn repack_gain(s: &str) -> Result<f64, String> {
    units::parse_f64_in(s, 0.0, 64.0)
}
fn granularity(s: &str) -> Result<crate::policy::cpu::Granularity, String> {
    use crate::policy::cpu::Granularity;
    Granularity::parse(s.trim()).ok_or_else(|| format!("expected one of {}", Granularity::NAMES.join(", ")))
}
fn repack_schedule(s: &str) -> Result<crate::schedule::Schedule, String> {
    crate::schedule::Schedule::parse(s).map_err(|e| crate::host::chain(&e))
}
fn fraction(s: &str) -> Result<f64, String> {
    units::parse_f64_in(s, 0.0, 0.95)
}
/// A parsed `--cpus` value. A newtype, not `Vec<u32>`: clap reads `Option<Vec<T>>` as a
/// repeatable flag of single values and panics when the parser returns a whole list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<u32>);

fn cpu_list(s: &str) -> Result<CpuList, String> {
    let v = crate::cpulist::parse(s).map_err(|e| e.to_string())?;
    if v.is_empty() {
        return Err("the cpu list is empty".into());
    }
    Ok(CpuList(v))
}
/// A parsed `--emulator-cpus`: `vcpus`, `off`, or a cpu list (checked against the host's
/// cpus once they are known: [`Common::check_host_cpus`]).
fn emulator_cpus(s: &str) -> Result<EmulatorCpus, String> {
    match s.trim() {
        "vcpus" => Ok(EmulatorCpus::Vcpus),
        "off" => Ok(EmulatorCpus::Off),
        list => cpu_list(list)
            .map(|l| EmulatorCpus::Set(crate::host::CpuSet(l.0)))
            .map_err(|e| format!("{e} (expected vcpus, off or a cpu list such as 0-1)")),
    }
}
/// A libvirt URI of this host. The agent reads this host's procfs, so a URI naming another
/// host (`qemu+ssh://other/system`) would balance one machine with another's figures.
fn local_uri(s: &str) -> Result<String, String> {
    let Some((_, rest)) = s.split_once("://") else {
        return Err(format!("{s:?} is not a libvirt URI (e.g. qemu:///system)"));
    };
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.split(':').next().unwrap_or(""),
    };
    if matches!(host, "" | "localhost" | "127.0.0.1" | "::1") {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} names the remote host {host:?}: the agent reads this host's /proc, so it must connect to the hypervisor of the host it runs on (e.g. qemu:///system)"
        ))
    }
}

/// An address and port to listen on: `127.0.0.1:9848`, `[::1]:9848`.
fn listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    let a: std::net::SocketAddr =
        s.trim().parse().map_err(|_| format!("{s:?} is not an address and port (e.g. 127.0.0.1:9848)"))?;
    if a.port() == 0 {
        return Err(format!("{s:?}: the port must not be 0"));
    }
    Ok(a)
}

fn size(s: &str) -> Result<u64, String> {
    units::parse_size_kib(s)
}
fn max_repins(s: &str) -> Result<usize, String> {
    let v: usize = s.trim().parse().map_err(|_| format!("{s:?} is not a whole number"))?;
    if v > 4096 {
        return Err(format!("{s:?} is out of range: allowed 0 to 4096"));
    }
    Ok(v)
}

/// Flags every subcommand shares.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Settings file: `VM_BALANCER_X=value` lines, below flags and environment variables, above
    /// the defaults (default: /etc/default/vm-balancer, when it exists).
    #[arg(long, value_name = "PATH", env = "VM_BALANCER_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// libvirt connection URI (the agent must run on the host itself: it reads procfs).
    #[arg(long, default_value = "qemu:///system", value_parser = local_uri, env = "VM_BALANCER_CONNECT")]
    pub connect: String,
    /// Time between two samples (and plans). 100ms to 1h.
    #[arg(long, default_value = "2s", value_parser = quantum, env = "VM_BALANCER_QUANTUM")]
    pub quantum: Duration,
    /// Never touch this domain (repeatable; the environment variable takes a comma list).
    #[arg(long, value_name = "NAME", env = "VM_BALANCER_EXCLUDE", value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Host cpus the balancer may place vCPUs on, e.g. `0-3,8` (default: all online cpus).
    #[arg(long, value_name = "LIST", value_parser = cpu_list, env = "VM_BALANCER_CPUS")]
    pub cpus: Option<CpuList>,
    /// A cpu whose load (fraction of one core: usage + delay of its vCPUs) is above this is
    /// overloaded. 0.1 to 1.0.
    #[arg(long, default_value = "0.75", value_parser = high, env = "VM_BALANCER_HIGH")]
    pub high: f64,
    /// Smallest load drop (cores) that justifies a repin. 0 to 1.
    #[arg(long, default_value = "0.1", value_parser = gain, env = "VM_BALANCER_MIN_GAIN")]
    pub min_gain: f64,
    /// How much busier (cores) a move may leave the target than the source. 0 to 1.
    #[arg(long, default_value = "0.25", value_parser = gain, env = "VM_BALANCER_FLIP_MARGIN")]
    pub flip_margin: f64,
    /// Most vCPU repins per quantum (a swap counts two). 0 to 4096.
    #[arg(long, default_value = "4", value_parser = max_repins, env = "VM_BALANCER_MAX_REPINS")]
    pub max_repins: usize,
    /// Most floating vCPUs pinned for the first time per quantum (a host full of new guests is
    /// placed over several quanta, not in one burst of libvirt calls). 0 to 4096.
    #[arg(long, default_value = "64", value_parser = max_repins, env = "VM_BALANCER_MAX_PLACEMENTS")]
    pub max_placements: usize,
    /// A moved vCPU stays where it was put at least this long. 0 to 24h.
    #[arg(long, default_value = "30s", value_parser = long_duration, env = "VM_BALANCER_COOLDOWN")]
    pub cooldown: Duration,
    /// Time constant of the moving average of vCPU usage and delay. 1ms to 1h.
    #[arg(long, default_value = "4s", value_parser = smoothing, env = "VM_BALANCER_SMOOTHING")]
    pub smoothing: Duration,
    /// Each vCPU's peak demand is its highest demand over this window: the balancer keeps
    /// cpus able to hold their vCPUs' recent peaks, not only their averages. 0 (no peaks) to 24h.
    #[arg(long, default_value = "4h", value_parser = long_duration, env = "VM_BALANCER_PEAK_WINDOW")]
    pub peak_window: Duration,
    /// A cpu whose vCPUs' peaks (plus its other load) add up to more than this many cores
    /// sheds a vCPU to a cpu where they stay under it. Above 1 because peaks rarely coincide.
    /// 0.5 to 4.
    #[arg(long, default_value = "1.2", value_parser = peak_limit, env = "VM_BALANCER_PEAK_LIMIT")]
    pub peak_limit: f64,
    /// Where QEMU's emulator and I/O threads of each balanced guest run: `vcpus` (the cpus of
    /// its vCPUs, following them when they move), a cpu list (a housekeeping set, e.g. `0-1`,
    /// within the host's cpus), or `off` (left alone).
    #[arg(
        long,
        value_name = "vcpus|LIST|off",
        default_value = "vcpus",
        value_parser = emulator_cpus,
        env = "VM_BALANCER_EMULATOR_CPUS"
    )]
    pub emulator_cpus: EmulatorCpus,
    /// A repin that leaves its source or target cpu above one core must lower their demand
    /// above one core (the delay it predicts) by at least this many cores: on an overloaded
    /// host, moves that only shift delay between cpus are not made. 0 to 1.
    #[arg(long, default_value_t = crate::policy::cpu::DEFAULT_DELAY_MARGIN, value_parser = gain, env = "VM_BALANCER_DELAY_MARGIN")]
    pub delay_margin: f64,
    /// What each vCPU is pinned to: `cpu` (one logical cpu), `core` (both threads of one
    /// physical core) or `llc` (every cpu of one last-level-cache domain). The balancer moves
    /// vCPUs between those groups; inside one the kernel schedules. `core` and `llc` cannot be
    /// combined with --consolidate or --repack-schedule.
    #[arg(long, value_name = "cpu|core|llc", default_value = "cpu", value_parser = granularity, env = "VM_BALANCER_PIN_GRANULARITY")]
    pub pin_granularity: crate::policy::cpu::Granularity,
    /// Re-pack every movable vCPU from scratch at these times: cron syntax (minute hour
    /// day-of-month month day-of-week), in UTC unless preceded by `TZ=Zone`, e.g.
    /// `TZ=Europe/Amsterdam 0 3 * * 1-5` (default: never).
    #[arg(long, value_name = "CRON", value_parser = repack_schedule, env = "VM_BALANCER_REPACK_SCHEDULE")]
    pub repack_schedule: Option<crate::schedule::Schedule>,
    /// A re-pack is applied only when it lowers the cost (load above --high plus peaks above
    /// --peak-limit, summed over the cpus) by at least this many cores. 0 to 64.
    #[arg(long, default_value = "0.2", value_parser = repack_gain, env = "VM_BALANCER_REPACK_MIN_GAIN")]
    pub repack_min_gain: f64,
    /// Pack low-demand vCPUs onto as few cpus as keep every cpu under --high (less
    /// --min-gain) and its peaks under --peak-limit, leaving whole cores with no vCPU; only in
    /// quanta where the balancer has nothing to do.
    #[arg(long, env = "VM_BALANCER_CONSOLIDATE")]
    pub consolidate: bool,
    /// Do not balance vCPUs.
    #[arg(long, env = "VM_BALANCER_NO_CPU")]
    pub no_cpu: bool,
    /// Do not balance memory.
    #[arg(long, env = "VM_BALANCER_NO_MEMORY")]
    pub no_memory: bool,
    /// How often the (costly) bulk balloon statistics call runs. 100ms to 1h.
    #[arg(long, default_value = "5s", value_parser = quantum, env = "VM_BALANCER_MEM_INTERVAL")]
    pub mem_interval: Duration,
    /// A guest the memory balancer left steady, with room above starving, whose vCPUs used
    /// under 1% of a cpu since its balloon statistics were last read (and in the last
    /// interval) is quiet: that reading is kept for up to this long before it is read again
    /// (each read costs libvirtd a call to the guest's QEMU); nothing is done to a guest
    /// before a fresh reading. 0 reads every guest every --mem-interval. 0 to 1h.
    #[arg(long, default_value = "30s", value_parser = quiet_interval, env = "VM_BALANCER_MEM_QUIET_INTERVAL")]
    pub mem_quiet_interval: Duration,
    /// Never inflate a guest's balloon below this size.
    #[arg(long, default_value = "256MiB", value_parser = size, env = "VM_BALANCER_GUEST_FLOOR")]
    pub guest_floor: u64,
    /// Never let a grant drive host MemAvailable below this.
    #[arg(long, default_value = "1GiB", value_parser = size, env = "VM_BALANCER_HOST_RESERVE")]
    pub host_reserve: u64,
    /// Leave guests younger than this alone (their boot needs memory; stats still settle). 0 to 24h.
    #[arg(long, default_value = "60s", value_parser = long_duration, env = "VM_BALANCER_MIN_AGE")]
    pub min_age: Duration,
    /// A guest whose usable memory is above this fraction of its size gives memory back. 0 to 0.95.
    #[arg(long, default_value = "0.3", value_parser = fraction, env = "VM_BALANCER_RECLAIM_ABOVE")]
    pub reclaim_above: f64,
    /// A guest whose usable memory is below this fraction of its size is starving. 0 to 0.95.
    #[arg(long, default_value = "0.1", value_parser = fraction, env = "VM_BALANCER_STARVE_BELOW")]
    pub starve_below: f64,
    /// Most memory taken from one guest per change (grants may be 4× this).
    #[arg(long, default_value = "256MiB", value_parser = size, env = "VM_BALANCER_MEM_STEP")]
    pub mem_step: u64,
    /// Time between two balloon changes of the same guest. 0 to 24h.
    #[arg(long, default_value = "15s", value_parser = long_duration, env = "VM_BALANCER_MEM_COOLDOWN")]
    pub mem_cooldown: Duration,
    /// Reclaim looks at the guest's peak use over this window, not at one sample. 0 to 24h.
    #[arg(long, default_value = "10m", value_parser = long_duration, env = "VM_BALANCER_RECLAIM_WINDOW")]
    pub reclaim_window: Duration,
    /// Do not turn on the balloon statistics period of guests that have it off.
    #[arg(long, env = "VM_BALANCER_NO_STATS_PERIOD")]
    pub no_stats_period: bool,
    /// On a clean stop, leave every vCPU (and emulator or I/O thread) where the agent pinned it
    /// instead of giving back the affinity it had before (`release` then does nothing either).
    #[arg(long, env = "VM_BALANCER_KEEP_PINS_ON_EXIT")]
    pub keep_pins_on_exit: bool,
    /// Capacity advice: the host must be overloaded (vCPU demand above what --high allows on
    /// the allowed cpus, or starving guests the memory budget cannot serve) this long without a
    /// break before the agent names a guest to migrate. 0 (at once) to 24h.
    #[arg(long, default_value = "5m", value_parser = long_duration, env = "VM_BALANCER_OVERLOAD_WINDOW")]
    pub overload_window: Duration,
    /// Log level: error, warn, info, debug, trace.
    #[arg(long, default_value = "info", env = "VM_BALANCER_LOG_LEVEL")]
    pub log_level: log::LevelFilter,
    /// More logging (-v debug, -vv trace); overrides --log-level.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

impl Common {
    /// The flags' defaults (and whatever `VM_BALANCER_*` variables are set): for benches and
    /// tools that build an agent without a command line. Fails when such a variable is invalid.
    pub fn defaults() -> Result<Self, clap::Error> {
        match Cli::try_parse_from(["vm-balancer", "run"])? {
            Cli { command: Command::Run { common, .. } } => Ok(common),
            _ => Err(clap::Error::new(clap::error::ErrorKind::InvalidSubcommand)),
        }
    }

    pub fn log_filter(&self) -> log::LevelFilter {
        match self.verbose {
            0 => self.log_level,
            1 => log::LevelFilter::Debug,
            _ => log::LevelFilter::Trace,
        }
    }

    /// Checks between flags that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.starve_below >= self.reclaim_above {
            return Err(format!(
                "--starve-below ({}) must be below --reclaim-above ({}): the gap between them is the dead band",
                self.starve_below, self.reclaim_above
            ));
        }
        if self.consolidate {
            self.packs_onto_single_cpus("--consolidate")?;
        }
        if self.repack_schedule.is_some() {
            self.packs_onto_single_cpus("--repack-schedule")?;
        }
        Ok(())
    }

    /// `what` (consolidation, a re-pack) packs vCPUs onto single cpus: refused with
    /// `--pin-granularity core|llc`.
    pub fn packs_onto_single_cpus(&self, what: &str) -> Result<(), String> {
        match self.pin_granularity {
            crate::policy::cpu::Granularity::Cpu => Ok(()),
            g => Err(format!(
                "--pin-granularity {}: {what} packs vCPUs onto single cpus; use --pin-granularity cpu with it",
                g.name()
            )),
        }
    }

    /// Checks the flags that name host cpus against the host's cpus, once they are known: a
    /// housekeeping set must be made of cpus the machine has (`present`). Cpus of it that are
    /// offline are no error (a cpu taken offline for maintenance must not keep the agent from
    /// starting): the answer is then a warning to show, and the threads go to the online part
    /// until they are back (or stay where they are while none is online).
    pub fn check_host_cpus(&self, present: &[u32], online: &[u32]) -> Result<Option<String>, String> {
        let EmulatorCpus::Set(set) = &self.emulator_cpus else { return Ok(None) };
        let not_in = |have: &[u32]| -> Vec<u32> { set.0.iter().copied().filter(|c| !have.contains(c)).collect() };
        let missing = not_in(present);
        if !missing.is_empty() {
            return Err(format!(
                "--emulator-cpus {set}: {} not among the host's cpus ({})",
                crate::cpulist::format(&missing),
                crate::cpulist::format(present)
            ));
        }
        let offline = not_in(online);
        if offline.len() == set.0.len() {
            return Ok(Some(format!(
                "--emulator-cpus {set}: none of them is online (online: {}); emulator and I/O threads stay where they are until one is",
                crate::cpulist::format(online)
            )));
        }
        Ok((!offline.is_empty()).then(|| {
            format!(
                "--emulator-cpus {set}: {} offline; emulator and I/O threads go to the online ones until it is back",
                crate::cpulist::format(&offline)
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulator_cpus_is_vcpus_off_or_a_list_within_the_host() {
        assert_eq!(emulator_cpus("vcpus"), Ok(EmulatorCpus::Vcpus));
        assert_eq!(emulator_cpus("off"), Ok(EmulatorCpus::Off));
        assert_eq!(emulator_cpus("0-1,4"), Ok(EmulatorCpus::Set(crate::host::CpuSet(vec![0, 1, 4]))));
        for bad in ["", "none", "3-1", "x"] {
            assert!(emulator_cpus(bad).is_err(), "{bad:?}");
        }
        let mut c = Common::defaults().unwrap();
        assert_eq!(c.check_host_cpus(&[0, 1], &[0, 1]), Ok(None), "the default names no cpu");
        c.emulator_cpus = EmulatorCpus::Set(crate::host::CpuSet(vec![1, 2, 3]));
        assert_eq!(
            c.check_host_cpus(&[0, 1], &[0, 1]),
            Err("--emulator-cpus 1-3: 2-3 not among the host's cpus (0-1)".to_string())
        );
        assert_eq!(c.check_host_cpus(&[0, 1, 2, 3], &[0, 1, 2, 3]), Ok(None));
        // Taken offline (maintenance): a warning, not a failed start that systemd would not
        // restart (exit 2 is in the unit's RestartPreventExitStatus).
        assert_eq!(
            c.check_host_cpus(&[0, 1, 2, 3], &[0, 2]),
            Ok(Some(
                "--emulator-cpus 1-3: 1,3 offline; emulator and I/O threads go to the online ones until it is back"
                    .to_string()
            ))
        );
        assert!(
            c.check_host_cpus(&[0, 1, 2, 3], &[0]).unwrap().unwrap().contains("none of them is online (online: 0)")
        );
    }

    #[test]
    fn only_local_uris_are_accepted() {
        for ok in [
            "qemu:///system",
            "qemu:///session",
            "qemu+unix:///system?socket=/x",
            "qemu+tcp://localhost/system",
            "test:///default",
            "qemu+ssh://root@[::1]/system",
        ] {
            assert!(local_uri(ok).is_ok(), "{ok}");
        }
        for bad in
            ["qemu+ssh://other/system", "qemu+tcp://10.0.0.2:16509/system", "qemu+ssh://root@node7/system", "system"]
        {
            assert!(local_uri(bad).is_err(), "{bad}");
        }
    }
}
