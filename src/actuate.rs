//! Acting: apply a plan through the [`Host`], one action at a time, each applied one logged
//! with its reason. A failed action is returned to the caller (which decides by the error's
//! class what to do about it) and the rest of the plan goes on; a lost connection stops it.

use log::{debug, info};

use crate::host::{DomainRef, Host, HostError};
use crate::model::Snapshot;
use crate::policy::Action;

/// What happened to one action.
#[derive(Debug)]
pub enum Outcome {
    Applied,
    /// The domain went away before the action: nothing to do.
    Gone,
    Failed(HostError),
    /// Not tried: the plan had grown older than its limit (a slow hypervisor held the earlier
    /// actions up), and the sample it was made from no longer says what the host is like.
    /// `age_ns`: the plan's age when it was cut short. The caller says so (the daemon
    /// rate-limits it: on a slow hypervisor it can happen every quantum).
    Stale {
        age_ns: u64,
    },
}

/// How old a balancing plan may be and still be applied (ns): two quanta, at least 1 s.
/// Acting on a sample older than that would be acting on stale data.
pub fn max_plan_age_ns(quantum: std::time::Duration) -> u64 {
    u64::try_from(quantum.as_nanos()).unwrap_or(u64::MAX).saturating_mul(2).max(1_000_000_000)
}

/// Applies `plan`, made from `snap`, while the plan is at most `max_age_ns` old. Returns each
/// action's outcome, or the disconnect that cut the plan short.
pub fn apply(
    host: &mut dyn Host,
    snap: &Snapshot,
    plan: &[Action],
    max_age_ns: u64,
) -> Result<Vec<Outcome>, HostError> {
    let mut out = Vec::with_capacity(plan.len());
    for action in plan {
        let age = host.now_ns().saturating_sub(snap.t_ns);
        if age > max_age_ns {
            debug!("the plan is {:.1}s old: dropping its last {} action(s)", age as f64 / 1e9, plan.len() - out.len());
            out.resize_with(plan.len(), || Outcome::Stale { age_ns: age });
            break;
        }
        let Some(dom) = snap.domains.iter().find(|d| d.dom.name == action.domain()).map(|d| d.dom.clone()) else {
            out.push(Outcome::Gone);
            continue;
        };
        let r = apply_one(host, &dom, action);
        out.push(match r {
            Ok(()) => {
                info!("{action}");
                Outcome::Applied
            }
            Err(HostError::DomainGone(_)) => {
                info!("skipped, domain gone: {action}");
                Outcome::Gone
            }
            Err(e) if e.is_disconnect() => return Err(e),
            Err(e) => Outcome::Failed(e),
        });
    }
    Ok(out)
}

/// The warning for a plan cut short as stale, if `outcomes` has one.
pub fn stale_warning(outcomes: &[Outcome]) -> Option<String> {
    let dropped = outcomes.iter().filter(|o| matches!(o, Outcome::Stale { .. })).count();
    outcomes.iter().find_map(|o| match o {
        Outcome::Stale { age_ns } => Some(format!(
            "the plan is {:.1}s old (a slow hypervisor held it up): dropping its last {dropped} action(s)",
            *age_ns as f64 / 1e9
        )),
        _ => None,
    })
}

fn apply_one(host: &mut dyn Host, dom: &DomainRef, action: &Action) -> Result<(), HostError> {
    match action {
        // One cpu, or a group of them (`--pin-granularity core|llc`).
        Action::Pin { vcpu, to, .. } => match to.as_single() {
            Some(cpu) => host.pin_vcpu(dom, *vcpu, cpu),
            None if !to.0.is_empty() => host.pin_vcpu_set(dom, *vcpu, to),
            None => Err(HostError::Parse { what: "pin target".into(), detail: "no cpu".into() }),
        },
        Action::Balloon { to_kib, .. } => host.set_balloon(dom, *to_kib),
        Action::PinThread { thread, to, .. } => host.pin_thread(dom, *thread, to),
    }
}
