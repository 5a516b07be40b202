//! One acting agent per host. Two agents (the service and a `vm-balancer run` started by hand
//! to watch it, or a `diagnose --apply` beside the service) would undo each other's pins and
//! rewrite each other's record of them. The one that acts holds a Linux abstract Unix socket
//! (`@vm-balancer.agent`) for its life: no file to leave behind after a crash (the kernel
//! frees the name with the process), nothing for `ProtectSystem=strict` to forbid, and one
//! namespace with a shell's commands (the unit has no `PrivateNetwork=`). `release NAME`,
//! the README's step for a stuck guest, does not take it.

use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::net::{SocketAddr, UnixListener};

/// The abstract socket name held by the acting agent.
pub const NAME: &[u8] = b"vm-balancer.agent";

/// Held for the life of the acting agent; dropping it lets another act.
#[derive(Debug)]
pub struct Instance(#[allow(dead_code)] UnixListener);

/// Why this process may not act.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    #[error(
        "another vm-balancer agent acts on this host (it holds @vm-balancer.agent): two would undo each other's pins"
    )]
    Taken,
    #[error("cannot take @vm-balancer.agent")]
    Io(#[source] std::io::Error),
}

/// Takes the host's one acting-agent slot, or says who has it.
pub fn take() -> Result<Instance, InstanceError> {
    let addr = SocketAddr::from_abstract_name(NAME).map_err(InstanceError::Io)?;
    match UnixListener::bind_addr(&addr) {
        Ok(l) => Ok(Instance(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(InstanceError::Taken),
        Err(e) => Err(InstanceError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_slot_is_taken_once_and_free_again_when_dropped() {
        // Another test process may hold it (a lab test's agent): only judged when free here.
        let Ok(first) = super::take() else { return };
        assert!(matches!(super::take(), Err(super::InstanceError::Taken)));
        drop(first);
        assert!(super::take().is_ok());
    }
}
