//! Whether a guest's QEMU monitor is free, asked before each call that needs the domain's job
//! (`virDomainGetControlInfo`, which the `virt` crate does not wrap).
//!
//! A pin, a balloon change or a metadata write waits up to 30 s for the domain's job (libvirt's
//! job wait) while another call holds it: one waiting for a frozen QEMU (a statistics call left
//! behind, `stats_worker`), a stuck `virsh` of an operator. Two such waits in a quantum and the
//! systemd watchdog kills the agent; at a stop, a give-back of a few vCPUs outlasts
//! `TimeoutStopSec`. The control information takes no job and costs one short round trip to
//! libvirtd, so it is asked first, and the call is not made while the monitor has been busy
//! with one command for [`BUSY_LIMIT`] or is broken. A background job (a migration) does not
//! count: libvirt lets some calls run beside it.

use std::time::Duration;

use virt::domain::Domain;
use virt::sys;

/// A monitor command running this long is taken for stuck.
pub const BUSY_LIMIT: Duration = Duration::from_secs(1);

/// Why a call was not made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MonitorBusy {
    #[error("its QEMU has not answered a monitor command for {0:?} (frozen?)")]
    Stuck(Duration),
    #[error("libvirt says its QEMU monitor failed")]
    Failed,
}

/// What `virDomainGetControlInfo` says, judged: `Err` when a call needing the domain's job
/// should not be made now.
pub fn judge(state: u32, details: u32, state_time_ms: u64) -> Result<(), MonitorBusy> {
    let busy = Duration::from_millis(state_time_ms);
    match state {
        sys::VIR_DOMAIN_CONTROL_OCCUPIED if busy >= BUSY_LIMIT => Err(MonitorBusy::Stuck(busy)),
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
    fn only_a_long_running_command_or_a_failed_monitor_holds_a_call_back() {
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_OK, 0, 0), Ok(()));
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_OCCUPIED, 0, 20), Ok(()), "a command in flight");
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_OCCUPIED, 0, 4_000), Err(MonitorBusy::Stuck(Duration::from_secs(4))));
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_JOB, 0, 600_000), Ok(()), "a migration");
        let monitor = sys::VIR_DOMAIN_CONTROL_ERROR_REASON_MONITOR;
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_ERROR, monitor, 0), Err(MonitorBusy::Failed));
        let internal = sys::VIR_DOMAIN_CONTROL_ERROR_REASON_INTERNAL;
        assert_eq!(judge(sys::VIR_DOMAIN_CONTROL_ERROR, internal, 0), Ok(()));
    }
}
