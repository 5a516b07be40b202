//! Giving back what the agent took: every vCPU (and every QEMU emulator or I/O thread) the
//! agent pins gets the affinity it had before.
//!
//! Pins outlive the agent. Without this, a stopped, crashed or removed agent would leave every
//! vCPU pinned to one cpu, static pinning, the worst policy in the simulator. So:
//! - **Record before acting.** [`apply_recorded`] writes the prior affinity of each vCPU a plan
//!   pins for the first time into the guest's live `<metadata>` (see [`crate::host::record`]),
//!   one write per domain per quantum, *before* the pin: a crash between the two leaves a
//!   record whose prior is the current affinity, which is harmless to restore. A vCPU already
//!   in the record keeps its prior, whoever wrote it: a restarted agent adopts the pins of the
//!   last one and never mistakes them for the original placement. A pin that then fails is
//!   taken out of the record again. The record is read from the host each time, never cached,
//!   so `release` run beside a live agent cannot leave the two out of step.
//! - **Give back on a clean stop** ([`on_stop`], unless `--keep-pins-on-exit`) and from
//!   `vm-balancer release` ([`command`], for systemd's `ExecStopPost=`, also after a crash):
//!   each recorded vCPU gets its prior affinity back and the record is cleared. A vCPU someone
//!   else has since given another multi-cpu affinity is left as it is (the agent only ever sets
//!   single cpus, or at `--pin-granularity core|llc` the cpus of one physical core or one LLC
//!   domain: a set inside one group of the coarser of the granularity in force and the one the
//!   vCPU's record entry says it was pinned at counts as the agent's). Entries only ever get
//!   coarser (a vCPU pinned again at a coarser granularity), which errs toward giving back. A
//!   recorded emulator or I/O thread always gets its prior back: the agent pins those to sets
//!   of cpus, so a set does not tell whose it is. A domain that went away is skipped.

use std::time::Duration;

use anyhow::Context as _;
use log::{debug, info, warn};

use crate::actuate::{self, Outcome};
use crate::daemon::Agent;
use crate::host::{AgentPin, CpuSet, DomainRef, ErrorClass, Host, HostError, QemuThread, ThreadDesc, ThreadPin, chain};
use crate::model::Snapshot;
use crate::policy::Action;
use crate::policy::cpu::Granularity;

fn gone(e: &HostError) -> bool {
    e.class() == ErrorClass::DomainGone
}

/// The pins a plan makes on one domain, in plan order, each with the affinity before it.
#[derive(Default)]
struct DomainPins<'a> {
    vcpus: Vec<(u32, &'a CpuSet)>,
    threads: Vec<(QemuThread, &'a CpuSet)>,
}

/// The pin actions (vCPUs and QEMU threads) of a plan, grouped by domain in plan order.
fn pins_by_domain<'a>(snap: &Snapshot, plan: &'a [Action]) -> Vec<(DomainRef, DomainPins<'a>)> {
    let mut out: Vec<(DomainRef, DomainPins<'a>)> = Vec::new();
    for a in plan {
        if !matches!(a, Action::Pin { .. } | Action::PinThread { .. }) {
            continue;
        }
        let i = match out.iter().position(|(d, _)| d.name == a.domain()) {
            Some(i) => i,
            None => match snap.domains.iter().find(|d| d.dom.name == a.domain()) {
                Some(d) => {
                    out.push((d.dom.clone(), DomainPins::default()));
                    out.len() - 1
                }
                None => continue,
            },
        };
        match a {
            Action::Pin { vcpu, from, .. } => out[i].1.vcpus.push((*vcpu, from)),
            Action::PinThread { thread, from, .. } => out[i].1.threads.push((*thread, from)),
            Action::Balloon { .. } => {}
        }
    }
    out
}

/// What [`record_priors`] added to a domain's record this quantum.
#[derive(Default)]
struct Added {
    vcpus: Vec<u32>,
    threads: Vec<QemuThread>,
}

/// The granularity a vCPU's record entry says it was pinned at (`cpu` without one, or one this
/// version does not know).
fn recorded_granularity(p: &AgentPin) -> Granularity {
    p.granularity.as_deref().and_then(Granularity::parse).unwrap_or_default()
}

/// Adds the vCPUs and threads not yet in the domain's record, with their affinity now; returns
/// them. A recorded vCPU now pinned at a coarser granularity than its entry says (a
/// `diagnose --apply` at `llc` beside a daemon at `cpu`) has its entry say so.
fn record_priors(
    host: &mut dyn Host,
    dom: &DomainRef,
    pins: &DomainPins<'_>,
    granularity: Granularity,
) -> Result<Added, HostError> {
    let at = (granularity != Granularity::Cpu).then(|| granularity.name().to_string());
    let finer = |p: &AgentPin| recorded_granularity(p) < granularity;
    let mut added = Added::default();
    if !pins.vcpus.is_empty() {
        let mut rec = host.agent_pins(dom)?;
        let mut coarser = false;
        for &(vcpu, from) in &pins.vcpus {
            match rec.iter_mut().find(|p| p.vcpu == vcpu) {
                None => {
                    rec.push(AgentPin { vcpu, prior: from.clone(), granularity: at.clone() });
                    added.vcpus.push(vcpu);
                }
                Some(p) if finer(p) => {
                    p.granularity.clone_from(&at);
                    coarser = true;
                }
                Some(_) => {}
            }
        }
        if !added.vcpus.is_empty() || coarser {
            host.set_agent_pins(dom, &rec)?;
        }
    }
    if !pins.threads.is_empty() {
        let mut rec = host.agent_threads(dom)?;
        for &(thread, from) in &pins.threads {
            if !rec.iter().any(|p| p.thread == thread) {
                rec.push(ThreadPin { thread, prior: from.clone() });
                added.threads.push(thread);
            }
        }
        if !added.threads.is_empty() {
            host.set_agent_threads(dom, &rec)?;
        }
    }
    Ok(added)
}

fn is_pin(a: &Action) -> bool {
    matches!(a, Action::Pin { .. } | Action::PinThread { .. })
}

/// [`actuate::apply`], with the prior affinity of each vCPU or QEMU thread recorded before its
/// first pin. The pins of a domain whose record cannot be written are not applied (the agent
/// never takes what it could not give back); they fail with that error.
pub fn apply_recorded(
    host: &mut dyn Host,
    snap: &Snapshot,
    plan: &[Action],
    max_age_ns: u64,
    granularity: Granularity,
) -> Result<Vec<Outcome>, HostError> {
    let mut blocked: Vec<(String, String, crate::host::ErrorClass)> = Vec::new();
    let mut added: Vec<(DomainRef, Added)> = Vec::new();
    for (dom, pins) in pins_by_domain(snap, plan) {
        match record_priors(host, &dom, &pins, granularity) {
            Ok(new) if new.vcpus.is_empty() && new.threads.is_empty() => {}
            Ok(new) => added.push((dom, new)),
            Err(e) if e.is_disconnect() => return Err(e),
            // Applying finds it gone too, and says so.
            Err(e) if gone(&e) => {}
            Err(e) => blocked.push((dom.name.clone(), crate::host::chain(&e), e.class())),
        }
    }
    let is_blocked = |a: &Action| is_pin(a) && blocked.iter().any(|(d, _, _)| d == a.domain());
    let todo: Vec<Action> = plan.iter().filter(|a| !is_blocked(a)).cloned().collect();
    let mut applied = actuate::apply(host, snap, &todo, max_age_ns)?.into_iter();
    let mut outcomes = Vec::with_capacity(plan.len());
    for a in plan {
        if let Some((_, why, class)) = blocked.iter().find(|(d, _, _)| is_blocked(a) && d == a.domain()) {
            debug!("not applied: {a}: cannot record its prior affinity: {why}");
            let detail = format!("cannot record the prior affinity: {why}");
            let (op, object, class) = ("record pin", a.domain().to_string(), *class);
            outcomes.push(Outcome::Failed(HostError::Refused { op, object, class, detail }));
        } else if let Some(o) = applied.next() {
            outcomes.push(o);
        }
    }
    forget_failed(host, plan, &outcomes, &added);
    Ok(outcomes)
}

/// Takes the vCPUs and threads recorded this quantum whose pin then failed out of the record
/// again.
fn forget_failed(host: &mut dyn Host, plan: &[Action], outcomes: &[Outcome], added: &[(DomainRef, Added)]) {
    for (dom, new) in added {
        let applied = |want: &dyn Fn(&Action) -> bool| {
            plan.iter().zip(outcomes).any(|(a, o)| a.domain() == dom.name && want(a) && matches!(o, Outcome::Applied))
        };
        let vcpus: Vec<u32> = new
            .vcpus
            .iter()
            .copied()
            .filter(|&v| !applied(&|a| matches!(a, Action::Pin { vcpu, .. } if *vcpu == v)))
            .collect();
        let threads: Vec<QemuThread> = new
            .threads
            .iter()
            .copied()
            .filter(|&t| !applied(&|a| matches!(a, Action::PinThread { thread, .. } if *thread == t)))
            .collect();
        let mut r = Ok(());
        if !vcpus.is_empty() {
            r = host.agent_pins(dom).and_then(|mut rec| {
                rec.retain(|p| !vcpus.contains(&p.vcpu));
                host.set_agent_pins(dom, &rec)
            });
        }
        if !threads.is_empty() && r.is_ok() {
            r = host.agent_threads(dom).and_then(|mut rec| {
                rec.retain(|p| !threads.contains(&p.thread));
                host.set_agent_threads(dom, &rec)
            });
        }
        match r {
            Ok(()) => {}
            Err(e) if gone(&e) => {}
            Err(e) => {
                warn!(
                    "cannot take the unpinned vCPUs {vcpus:?} and threads {threads:?} of {} out of its pin record: {}",
                    dom.name,
                    chain(&e)
                )
            }
        }
    }
}

/// What giving back one domain's pins did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Released {
    /// vCPUs back on (or found on) their prior affinity.
    pub restored: Vec<AgentPin>,
    /// vCPUs left alone, with their affinity: someone gave them another multi-cpu affinity
    /// since the agent pinned them.
    pub left: Vec<(u32, CpuSet)>,
    /// vCPUs whose affinity could not be set, with why.
    pub failed: Vec<(u32, String)>,
    /// Emulator and I/O threads back on (or found on) their prior affinity.
    pub threads_restored: Vec<ThreadPin>,
    /// Threads whose affinity could not be set, with why.
    pub threads_failed: Vec<(QemuThread, String)>,
}

/// True when every cpu of `set` is in one group of `granularity` in `topology`: one physical
/// core (`core`), one LLC domain (`llc`); never at `cpu`.
fn inside_one_group(set: &CpuSet, topology: &crate::host::Topology, granularity: Granularity) -> bool {
    // A cpu the topology no longer lists (offline) does not count either way.
    let keys: Vec<_> =
        set.0.iter().filter(|&&c| topology.get(c).is_some()).map(|&c| granularity.group_key(c, topology)).collect();
    granularity != Granularity::Cpu && !keys.is_empty() && keys.windows(2).all(|w| w[0] == w[1])
}

/// Gives back the pins recorded on one domain (vCPUs, emulator and I/O threads) and clears the
/// record. `None`: no record.
/// `granularity`: the `--pin-granularity` in force; each vCPU is judged at the coarser of it
/// and the one its record entry says it was pinned at (which sets are the agent's).
pub fn release_domain(
    host: &mut dyn Host,
    dom: &DomainRef,
    granularity: Granularity,
) -> Result<Option<Released>, HostError> {
    let rec = host.agent_pins(dom)?;
    let threads = host.agent_threads(dom)?;
    if rec.is_empty() && threads.is_empty() {
        return Ok(None);
    }
    // The affinity each vCPU and thread has now; without it every recorded one is set.
    let (now, pins_now): (Vec<Option<CpuSet>>, Vec<ThreadDesc>) =
        match host.describe(dom).and_then(|d| Ok((host.vcpu_times(&d)?, d.threads))) {
            Ok((t, th)) => (t.into_iter().map(|t| t.map(|t| t.affinity_mask)).collect(), th),
            Err(e) if gone(&e) || e.is_disconnect() => return Err(e),
            Err(e) => {
                debug!("cannot read the affinities of {}: {e}; setting every recorded one", dom.name);
                (Vec::new(), Vec::new())
            }
        };
    // Each vCPU at the coarser of the granularity in force and the one it was pinned at (its
    // record says; a release after a crash whose settings changed since).
    let at = |p: &AgentPin| recorded_granularity(p).max(granularity);
    // A set the agent may have made: one cpu, or at a group granularity cpus of one group.
    let grouped = rec.iter().any(|p| {
        at(p) != Granularity::Cpu
            && now.get(p.vcpu as usize).cloned().flatten().is_some_and(|c| c.as_single().is_none())
    });
    // Without the topology nothing can tell a group from an operator's set: the record is
    // kept for a later try (`release`), not cleared with those pins left behind.
    let topology = if grouped { Some(host.topology()?) } else { None };
    let agents = |cur: &CpuSet, g: Granularity| {
        cur.as_single().is_some() || topology.as_ref().is_some_and(|t| inside_one_group(cur, t, g))
    };
    // A record carried here by a live migration from a bigger host names cpus this one does
    // not have: what is given back is the part of the prior it has (all its cpus if none). A
    // cpu offline for a while is one it has: the kernel keeps it in the affinity for later.
    let present: Option<Vec<u32>> = host.present_cpus().ok().filter(|p| !p.is_empty());
    let here = |prior: CpuSet| -> CpuSet {
        let Some(present) = present.as_ref() else { return prior };
        let Some(inside) = part_among(&prior, present) else { return prior };
        let to = if inside.0.is_empty() { CpuSet(present.clone()) } else { inside };
        info!(
            "{}: recorded prior {prior} names cpus this host does not have (a migrated guest?): giving back {to}",
            dom.name
        );
        to
    };
    let rec: Vec<AgentPin> = rec.into_iter().map(|p| AgentPin { prior: here(p.prior), ..p }).collect();
    let threads: Vec<ThreadPin> = threads.into_iter().map(|t| ThreadPin { prior: here(t.prior), ..t }).collect();
    let mut out = Released::default();
    for p in rec {
        match now.get(p.vcpu as usize).cloned().flatten() {
            Some(cur) if cur == p.prior => out.restored.push(p),
            Some(cur) if !agents(&cur, at(&p)) => out.left.push((p.vcpu, cur)),
            _ => {
                let mut r = host.pin_vcpu_set(dom, p.vcpu, &p.prior);
                // A prior naming a cpu offline now, refused (cgroup v1): its online part.
                if r.as_ref().is_err_and(|e| e.class() == ErrorClass::CpuRefused)
                    && let Some(part) = online_part(host, &p.prior)
                {
                    r = host.pin_vcpu_set(dom, p.vcpu, &part);
                }
                match r {
                    Ok(()) => out.restored.push(p),
                    Err(e) if gone(&e) || e.is_disconnect() => return Err(e),
                    Err(e) => out.failed.push((p.vcpu, chain(&e))),
                }
            }
        }
    }
    // A thread's pin is a set of cpus whoever made it: each recorded thread gets its prior back.
    for t in threads {
        let cur = pins_now.iter().find(|d| d.thread == t.thread).and_then(|d| d.pinned_to.as_ref());
        if cur == Some(&t.prior) {
            out.threads_restored.push(t);
            continue;
        }
        match host.pin_thread(dom, t.thread, &t.prior) {
            Ok(()) => out.threads_restored.push(t),
            Err(e) if gone(&e) || e.is_disconnect() => return Err(e),
            Err(e) => out.threads_failed.push((t.thread, chain(&e))),
        }
    }
    // Cleared even when a pin failed: retrying a pin that failed once would fail again, and
    // a record left behind would be adopted by the next agent.
    host.set_agent_threads(dom, &[])?;
    host.set_agent_pins(dom, &[])?;
    Ok(Some(out))
}

/// The part of `prior` among `cpus`, when that is not all of it (it may be empty).
fn part_among(prior: &CpuSet, cpus: &[u32]) -> Option<CpuSet> {
    let part: Vec<u32> = prior.0.iter().copied().filter(|c| cpus.contains(c)).collect();
    (part.len() < prior.0.len()).then_some(CpuSet(part))
}

/// The part of `prior` online now, when it differs from `prior` and is not empty.
fn online_part(host: &mut dyn Host, prior: &CpuSet) -> Option<CpuSet> {
    let online: Vec<u32> = host.topology().ok()?.cpus.iter().map(|c| c.cpu).collect();
    part_among(prior, &online).filter(|p| !p.0.is_empty())
}

/// What giving back the pins of many domains did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Domains that had a record.
    pub domains: usize,
    /// vCPUs, emulator and I/O threads given back their prior affinity.
    pub restored: usize,
    /// vCPUs and threads (or whole domains) whose pins could not be given back.
    pub failed: usize,
}

/// Gives back the recorded pins of each of `doms`; one log line per domain with a record. A
/// domain that went away is skipped; a lost connection stops the run.
pub fn release_domains(
    host: &mut dyn Host,
    doms: &[DomainRef],
    granularity: Granularity,
) -> Result<Summary, HostError> {
    let mut sum = Summary::default();
    for dom in doms {
        match release_domain(host, dom, granularity) {
            Ok(None) => {}
            Ok(Some(r)) => {
                sum.domains += 1;
                sum.restored += r.restored.len() + r.threads_restored.len();
                sum.failed += r.failed.len() + r.threads_failed.len();
                log_released(&dom.name, &r);
            }
            Err(e) if gone(&e) => debug!("{} went away; nothing to give back", dom.name),
            Err(e) if e.is_disconnect() => return Err(e),
            Err(e) => {
                warn!("cannot give back the vCPU pins of {}: {}", dom.name, chain(&e));
                sum.domains += 1;
                sum.failed += 1;
            }
        }
    }
    Ok(sum)
}

fn log_released(name: &str, r: &Released) {
    let mut parts: Vec<String> = r.restored.iter().map(|p| format!("vCPU {} -> {}", p.vcpu, p.prior)).collect();
    parts.extend(r.left.iter().map(|(v, c)| format!("vCPU {v} left on {c} (changed since the agent pinned it)")));
    parts.extend(r.failed.iter().map(|(v, e)| format!("vCPU {v} failed: {e}")));
    parts.extend(r.threads_restored.iter().map(|t| format!("{} -> {}", t.thread, t.prior)));
    parts.extend(r.threads_failed.iter().map(|(t, e)| format!("{t} failed: {e}")));
    if r.failed.is_empty() && r.threads_failed.is_empty() {
        info!("gave back the vCPU pins of {name}: {}", parts.join(", "));
    } else {
        warn!("gave back the vCPU pins of {name} in part: {}", parts.join(", "));
    }
}

/// How long `vm-balancer release` tries to connect: systemd runs it when the agent stopped,
/// maybe while libvirtd starts or is busy with many guests (`TimeoutStopSec=15` bounds it).
const CONNECT_PATIENCE: Duration = Duration::from_secs(8);

/// Connects, trying again for `patience` while libvirtd cannot be reached (each try waits at
/// most `opener::OPEN_DEADLINE`).
fn connect_patiently(host: &mut dyn Host, patience: Duration) -> Result<(), HostError> {
    let t0 = std::time::Instant::now();
    loop {
        match host.ensure_connected() {
            Err(e) if e.is_disconnect() && t0.elapsed() + Duration::from_secs(1) < patience => {
                debug!("cannot connect yet: {}; trying again", chain(&e));
                std::thread::sleep(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}

/// Gives back the recorded pins of every running domain.
pub fn release_all(host: &mut dyn Host, granularity: Granularity) -> Result<Summary, HostError> {
    host.ensure_connected()?;
    let doms = host.list_domains()?;
    release_domains(host, &doms, granularity)
}

/// What a clean stop does with the agent's pins: gives them back unless the configuration
/// says to keep them (or the agent was only watching). `None` when it did not try.
pub fn stop_release<H: Host>(agent: &mut Agent<H>) -> Option<Result<Summary, HostError>> {
    let cfg = agent.config();
    if cfg.keep_pins_on_exit {
        info!("keeping the vCPU pins (--keep-pins-on-exit); they stay recorded for the next agent or `release`");
        return None;
    }
    if cfg.dry_run {
        return None;
    }
    let granularity = agent.release_granularity();
    Some(release_all(&mut agent.host, granularity))
}

/// The daemon's clean stop: [`stop_release`]; never fails. It needs no deadline of its own:
/// `daemon::run` ends the process [`crate::daemon::SHUTDOWN_GRACE`] after the stop signal
/// whatever it is doing (a libvirtd that hangs), and `vm-balancer release` finishes the job.
pub fn on_stop<H: Host>(agent: &mut Agent<H>) {
    match stop_release(agent) {
        None => {}
        Some(Ok(s)) if s.domains == 0 => debug!("no vCPU pins to give back"),
        Some(Ok(s)) => info!(
            "gave back {} pins (vCPUs, emulator and I/O threads) on {} domain(s), {} failed",
            s.restored, s.domains, s.failed
        ),
        Some(Err(e)) => {
            warn!("cannot give back the vCPU pins: {e}; exiting anyway (`vm-balancer release` can do it later)")
        }
    }
}

/// `vm-balancer release [DOMAIN...]`: gives back the recorded pins of the named running
/// domains, or of every running domain. Fails when libvirt is unreachable or a pin could not be
/// given back. Without names it does nothing with `--keep-pins-on-exit` (so one settings file
/// serves both `run` and `ExecStopPost=`); named domains are an operator's request, given
/// back whatever that setting says.
pub fn command(
    connect: &str,
    keep_pins_on_exit: bool,
    granularity: Granularity,
    names: &[String],
) -> anyhow::Result<()> {
    if keep_pins_on_exit && names.is_empty() {
        info!("--keep-pins-on-exit is set: leaving the vCPU pins as they are");
        return Ok(());
    }
    if keep_pins_on_exit {
        info!("--keep-pins-on-exit is for a stop: giving back the named domains' pins");
    }
    let mut host = crate::host::libvirt::LibvirtHost::new(connect);
    connect_patiently(&mut host, CONNECT_PATIENCE).with_context(|| format!("cannot connect to {connect}"))?;
    let mut doms = host.list_domains().context("listing the running domains")?;
    if !names.is_empty() {
        for n in names.iter().filter(|n| !doms.iter().any(|d| &&d.name == n)) {
            warn!("{n} is not running; nothing to give back");
        }
        doms.retain(|d| names.contains(&d.name));
    }
    let s = release_domains(&mut host, &doms, granularity).context("giving back the vCPU pins")?;
    if s.failed > 0 {
        anyhow::bail!("{} of the recorded vCPU pins could not be given back", s.failed);
    }
    if s.domains == 0 {
        info!("no recorded vCPU pins to give back");
    } else {
        info!("gave back {} pins (vCPUs, emulator and I/O threads) on {} domain(s)", s.restored, s.domains);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
