//! Capacity advice in the loop: the plain input of [`crate::policy::advice`] from one quantum's
//! snapshot, CPU planner input and memory verdicts, the state kept between quanta (the
//! overload window, the unmet want of the last memory plan, the guest named last), and the log
//! lines of the daemon when advice appears, changes or clears.
//!
//! The daemon, `diagnose` and the simulator get the result in [`crate::daemon::StepReport`];
//! the metrics export it. The agent never migrates anything.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::model::Snapshot;
use crate::policy::advice::{self, Advice, AdviceInput, Guest, MemSide, Overload, Spare, Sustain};
use crate::policy::cpu::CpuInput;
use crate::policy::mem::Verdict;

/// The advice's settings, from the flags.
#[derive(Debug, Clone, PartialEq)]
pub struct AdviceConfig {
    /// `--overload-window`: how long the host must be overloaded before a guest is named.
    pub window: Duration,
    /// `--high`, per allowed cpu, cores.
    pub high: f64,
    /// `--host-reserve`, KiB.
    pub host_reserve_kib: u64,
    /// Host memory pressure (PSI some avg10, %) above which no memory counts as free (the
    /// memory planner's limit).
    pub host_psi_limit: f64,
}

/// The advice after one quantum.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct CapacityReport {
    /// At most one `migrate`, once the overload has lasted `--overload-window`.
    pub advice: Vec<Advice>,
    pub spare: Spare,
    /// How far the host is over its thresholds now (also before the window is over).
    #[serde(skip)]
    pub overload: Overload,
}

/// The advice's input: the CPU planner's view of the allowed cpus and their load, the host's
/// memory, and each running guest. `unmet`: what each starving guest the host refused wanted at
/// the last memory plan; `outstanding_kib`: grants on credit (not yet paid by the host).
pub fn input_from(
    snap: &Snapshot,
    cpu: &CpuInput,
    unmet: &HashMap<String, u64>,
    outstanding_kib: u64,
    cfg: &AdviceConfig,
) -> AdviceInput {
    // In cores: at `--pin-granularity core|llc` the planner's loads are shares of the largest
    // group's capacity, and a smaller group's fixed load includes what it lacks of it.
    let unit = cpu.cpus.iter().map(|c| c.capacity).fold(1.0, f64::max);
    let mut demand: HashMap<&str, f64> = HashMap::new();
    for v in &cpu.vcpus {
        *demand.entry(&v.domain).or_default() += v.demand * unit;
    }
    let fixed: f64 = cpu.cpus.iter().map(|c| (c.fixed * unit - (unit - c.capacity)).max(0.0)).sum();
    let load_cores = fixed + demand.values().sum::<f64>();
    let cpus = cpu.cpus.iter().map(|c| c.group.as_ref().map_or(1, |g| g.0.len())).sum();
    let h = &snap.host;
    let pressure = crate::policy::mem::short_of_memory(
        h.mem_available_kib,
        h.mem_pressure_some_avg10,
        cfg.host_reserve_kib,
        cfg.host_psi_limit,
    );
    let free_kib = if pressure {
        0
    } else {
        h.mem_available_kib.saturating_sub(cfg.host_reserve_kib).saturating_sub(outstanding_kib)
    };
    let guests: Vec<Guest> = snap
        .domains
        .iter()
        .map(|d| Guest {
            name: d.dom.name.clone(),
            cpu_cores: demand.get(d.dom.name.as_str()).copied().unwrap_or(0.0),
            mem_kib: d.balloon.as_ref().map_or(d.desc.max_kib, |(b, _)| b.current_kib),
            unmet_kib: unmet.get(&d.dom.name).copied().unwrap_or(0),
            left_alone: d.cpu_excluded.is_some() || d.mem_excluded.is_some(),
        })
        .collect();
    AdviceInput {
        cpus,
        high: cfg.high,
        load_cores,
        mem: MemSide {
            free_kib,
            short_kib: cfg.host_reserve_kib.saturating_sub(h.mem_available_kib),
            unmet_kib: guests.iter().map(|g| g.unmet_kib).sum(),
        },
        guests,
    }
}

/// The advice's state between quanta; owned by the agent.
#[derive(Debug, Default)]
pub struct Advisor {
    sustain: Sustain,
    /// Unmet want of each starving guest the host refused, at the last memory plan (memory
    /// plans come every `--mem-interval`, not every quantum).
    unmet: HashMap<String, u64>,
    /// The guest named in the last quantum.
    named: Option<String>,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Advisor {
    /// Takes the verdicts of a memory plan.
    pub fn memory_plan(&mut self, verdicts: &[Verdict]) {
        self.unmet = verdicts.iter().filter(|v| v.unmet_kib > 0).map(|v| (v.name.clone(), v.unmet_kib)).collect();
    }

    /// Forgets everything (a lost connection: nothing old is trusted).
    pub fn reset(&mut self) {
        *self = Advisor::default();
    }

    /// One quantum's advice.
    pub fn observe(
        &mut self,
        snap: &Snapshot,
        cpu: &CpuInput,
        outstanding_kib: u64,
        cfg: &AdviceConfig,
    ) -> CapacityReport {
        let input = input_from(snap, cpu, &self.unmet, outstanding_kib, cfg);
        let a = advice::assess(&input, self.named.as_deref());
        let lasted = self.sustain.observe(snap.t_ns, a.overload.any(), ns(cfg.window));
        let advice: Vec<Advice> = match (lasted, a.migrate) {
            (Some(lasted), Some(Advice::Migrate { domain, reason })) => {
                let reason = if cfg.window.is_zero() {
                    reason
                } else {
                    let lasted = Duration::from_secs(lasted / 1_000_000_000);
                    format!(
                        "{reason}; overloaded for {} (--overload-window {})",
                        humantime::format_duration(lasted),
                        humantime::format_duration(cfg.window)
                    )
                };
                vec![Advice::Migrate { domain, reason }]
            }
            _ => Vec::new(),
        };
        self.named = advice.first().map(|a| a.domain().to_string());
        CapacityReport { advice, spare: a.spare, overload: a.overload }
    }
}

/// How important a line of [`Announcer::update`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Advice appeared or changed: an operator (or cluster engine) should act.
    Warn,
    /// Advice cleared.
    Info,
}

/// The daemon's log of the advice: one line when it appears, when it names another guest, and
/// when it clears; nothing while it stays the same.
#[derive(Debug, Default)]
pub struct Announcer {
    advised: Option<String>,
}

impl Announcer {
    /// The lines to log after a quantum's advice.
    pub fn update(&mut self, r: &CapacityReport) -> Vec<(Level, String)> {
        let now = r.advice.first();
        let line = match (&self.advised, now) {
            (None, Some(a)) => Some((Level::Warn, format!("capacity advice: {a}"))),
            (Some(before), Some(a)) if before != a.domain() => {
                Some((Level::Warn, format!("capacity advice changed ({before} before): {a}")))
            }
            (Some(before), None) => {
                let why = if r.overload.any() {
                    "no guest the agent may name would relieve the host now"
                } else {
                    "the host is back under its thresholds"
                };
                Some((Level::Info, format!("capacity advice cleared: {why} (no longer advising to migrate {before})")))
            }
            _ => None,
        };
        self.advised = now.map(|a| a.domain().to_string());
        line.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(domain: Option<&str>) -> CapacityReport {
        CapacityReport {
            advice: domain.map(|d| Advice::Migrate { domain: d.into(), reason: "r".into() }).into_iter().collect(),
            ..CapacityReport::default()
        }
    }

    #[test]
    fn advice_is_logged_once_when_it_appears_changes_and_clears() {
        let mut a = Announcer::default();
        assert!(a.update(&report(None)).is_empty());
        let l = a.update(&report(Some("web")));
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].0, Level::Warn);
        assert!(l[0].1.contains("migrate web"), "{l:?}");
        assert!(a.update(&report(Some("web"))).is_empty(), "unchanged advice is not logged again");
        let l = a.update(&report(Some("db")));
        assert!(l[0].1.contains("migrate db") && l[0].1.contains("web before"), "{l:?}");
        let l = a.update(&report(None));
        assert_eq!(l[0].0, Level::Info);
        assert!(l[0].1.contains("cleared: the host is back under"), "{l:?}");
        assert!(a.update(&report(None)).is_empty());
        // Still overloaded, but nobody to name (the named guest left): said so.
        a.update(&report(Some("web")));
        let still = CapacityReport { overload: Overload { cpu_cores: 1.0, mem_kib: 0 }, ..report(None) };
        let l = a.update(&still);
        assert!(l[0].1.contains("no guest the agent may name"), "{l:?}");
    }
}
