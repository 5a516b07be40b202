//! Whether a guest's QEMU monitor is free, asked before each call that needs the domain's job
//! (`virDomainGetControlInfo`, which the `virt` crate does not wrap).
//!
//! A pin, a balloon change or a metadata write waits up to 30 s for the domain's job (libvirt's
//! job wait) while another call holds it: one waiting for a frozen QEMU (a statistics call left
//! behind, `stats_worker`), a stuck `virsh` of an operator. Two such waits in a quantum and the
//! systemd watchdog kills the agent; at a stop, a give-back of a few vCPUs outlasts
//! `TimeoutStopSec`. The control information takes no job and costs one short round trip to
//! libvirtd, so it is asked first, and the call is not made while the monitor has been busy
//! with one command for [`BUSY_LIMIT`], while a background job has run for [`JOB_LIMIT`] (a
//! migration, a save, a dump: libvirt lets no pin, balloon change or metadata write beside
//! them; a guest's start holds a shorter one that lets them through), or when the monitor
//! failed. A job held with no monitor command running (libvirt gives no time for it: another
//! client's short job looks the same as a stuck one) does not hold a call back. Left: between the steps of a
//! migration libvirt says the monitor is free, and a call made then may still wait.

use std::time::Duration;

use virt::domain::Domain;
use virt::sys;

/// A monitor command running this long is taken for stuck.
pub const BUSY_LIMIT: Duration = Duration::from_secs(1);

/// A background job running this long is taken for one that lets no pin through (a
/// migration, a save). A guest's start holds one for about a second (seen on the lab: 0.7 to
/// 0.9 s), and libvirt lets pins through it.
pub const JOB_LIMIT: Duration = Duration::from_secs(5);

/// Why a call was not made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MonitorBusy {
    #[error("its QEMU has not answered a monitor command for {0:?} (frozen?)")]
    Stuck(Duration),
    #[error("a background job (migration, save, dump) has run for {0:?}")]
    Job(Duration),
    #[error("libvirt says its QEMU monitor failed")]
    Failed,
}

/// What `virDomainGetControlInfo` says, judged: `Err` when a call needing the domain's job
/// should not be made now.
pub fn judge(state: u32, details: u32, state_time_ms: u64) -> Result<(), MonitorBusy> {
    let busy = Duration::from_millis(state_time_ms);
    match state {
        sys::VIR_DOMAIN_CONTROL_OCCUPIED if busy >= BUSY_LIMIT => Err(MonitorBusy::Stuck(busy)),
        sys::VIR_DOMAIN_CONTROL_JOB if busy >= JOB_LIMIT => Err(MonitorBusy::Job(busy)),
        sys::VIR_DOMAIN_CONTROL_ERROR if details == sys::VIR_DOMAIN_CONTROL_ERROR_REASON_MONITOR => {
            Err(MonitorBusy::Failed)
        }
        _ => Ok(()),
    }
}

/// Asks libvirt whether `d`'s monitor is free. A failure to ask (an old libvirt, a driver
/// without it) is not a reason to refrain: `Ok`.
pub fn monitor_free(d: &Domain) -> Result<(), MonitorBusy> {
    let mut info = sys::virDomainControlInfo { state: 0, details: 0, stateTime: 0 };
    // SAFETY: `d.as_ptr()` is a live domain reference owned by `d` for the whole call; `info`
    // is a valid, writable `virDomainControlInfo` that libvirt fills; flags must be 0.
    let r = unsafe { sys::virDomainGetControlInfo(d.as_ptr(), &mut info, 0) };
    if r < 0 {
        return Ok(());
    }
    judge(info.state, info.details, info.stateTime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_command_a_background_job_a_held_job_or_a_failed_monitor_hold_a_call_back() {
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_OK, 0, 0), Ok(()));
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_OCCUPIED, 0, 20), Ok(()), "a command in flight");
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_OCCUPIED, 0, 4_000), Err(MonitorBusy::Stuck(Duration::from_secs(4))));
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_JOB, 0, 600_000), Err(MonitorBusy::Job(Duration::from_secs(600))));
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_JOB, 0, 875), Ok(()), "a guest starting");
        let monitor = sys::VIR_DOMAIN_CONTROL_ERROR_REASON_MONITOR;
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_ERROR, monitor, 0), Err(MonitorBusy::Failed));
        let internal = sys::VIR_DOMAIN_CONTROL_ERROR_REASON_INTERNAL;
        // A job held with no monitor command: also another client's short job (a destroy, a
        // definition change), with no time to tell a stuck one by: not held back.
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_ERROR, internal, 0), Ok(()));
        let none = sys::VIR_DOMAIN_CONTROL_ERROR_REASON_NONE;
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_ERROR, none, 0), Ok(()));
    }
}
