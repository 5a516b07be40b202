//! Safe wrapper of libvirt's domain events (`virConnectDomainEventRegisterAny`), which the
//! `virt` crate (0.5) does not wrap. The agent re-reads a domain's definition when libvirt
//! says it changed (its metadata, a tunable such as a pin, a device, its persistent
//! definition) instead of re-reading every definition every few quanta: with 60 guests the
//! periodic re-reads were most of the agent's and libvirtd's cost (two XML dumps per guest).
//!
//! Lifecycle events (a domain started, stopped, crashed, ...) also say when the list of running
//! domains changed, so that it is listed again only then (and on a slow safety cadence), not
//! every quantum.
//!
//! A guest's memory figures are read again, instead of carried forward while it is quiet
//! (`collect::balloons`), when libvirt says its balloon moved (`virsh setmem`, the guest's
//! driver) or a device came or went: a pin or a metadata change says nothing about memory, and
//! the agent's own pins raise tunable events on every repin.
//!
//! The callbacks run on libvirt's event loop thread (started by `libvirt::start_event_loop`);
//! each only copies the domain's name into a shared list or sets a flag, which the quantum
//! reads.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virt::connect::Connect;
use virt::sys;

/// What libvirt reported since the quantum last looked.
#[derive(Debug, Default)]
pub struct Watch {
    /// Domains whose definition changed.
    names: Mutex<Vec<String>>,
    /// Domains whose memory figures may have changed (balloon moved, device came or went).
    memory: Mutex<Vec<String>>,
    /// A domain started, stopped, was defined, ...: the listing may have changed.
    lifecycle: AtomicBool,
}

impl Watch {
    /// The domains reported changed since the last call.
    pub fn take_names(&self) -> Vec<String> {
        std::mem::take(&mut *self.names.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The domains whose memory figures may have changed since the last call.
    pub fn take_memory(&self) -> Vec<String> {
        std::mem::take(&mut *self.memory.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Whether a lifecycle event came since the last call.
    pub fn take_lifecycle(&self) -> bool {
        self.lifecycle.swap(false, Ordering::AcqRel)
    }

    /// Forgets what was reported (a new connection starts from a fresh listing).
    pub fn clear(&self) {
        self.take_names();
        self.take_memory();
        self.take_lifecycle();
    }

    fn note(&self, name: String, kind: Kind) {
        let lists: &[&Mutex<Vec<String>>] = match kind {
            Kind::Definition => &[&self.names],
            Kind::Memory => &[&self.memory],
            Kind::Both => &[&self.names, &self.memory],
        };
        for list in lists {
            let mut list = list.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !list.contains(&name) {
                list.push(name.clone());
            }
        }
    }
}

/// What an event says changed of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Its definition (a pin, its metadata): read it again.
    Definition,
    /// Its memory figures (its balloon moved): read its balloon statistics again.
    Memory,
    /// Both (a device came or went, a new definition).
    Both,
}

/// What an event of id `event` says changed (for a lifecycle event, of type `lifecycle`),
/// if anything the agent reads; the one place events are sorted.
fn kind_of(event: sys::virDomainEventID, lifecycle: c_int) -> Option<Kind> {
    let lifecycle = u32::try_from(lifecycle).ok();
    match event {
        sys::VIR_DOMAIN_EVENT_ID_TUNABLE | sys::VIR_DOMAIN_EVENT_ID_METADATA_CHANGE => Some(Kind::Definition),
        sys::VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE | sys::VIR_DOMAIN_EVENT_ID_REBOOT => Some(Kind::Memory),
        sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED | sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED => Some(Kind::Both),
        sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE => match lifecycle {
            // A new persistent definition.
            Some(sys::VIR_DOMAIN_EVENT_DEFINED) => Some(Kind::Both),
            // Undefined while it runs: now transient, its opt-outs are read from the live one.
            Some(sys::VIR_DOMAIN_EVENT_UNDEFINED) => Some(Kind::Definition),
            // Started (booted, restored, from a snapshot, migrated in): its QEMU runs now, with
            // its vCPU threads (a listing during its start found none) and its memory.
            Some(sys::VIR_DOMAIN_EVENT_STARTED) => Some(Kind::Both),
            // Resumed: its memory may be another one than the agent last read, under the same id.
            Some(sys::VIR_DOMAIN_EVENT_RESUMED) => Some(Kind::Memory),
            _ => None,
        },
        _ => None,
    }
}

/// Shared between the agent and libvirt's event loop thread.
pub type Changed = Arc<Watch>;

/// libvirt's `VIR_DOMAIN_EVENT_CALLBACK()` cast of `$f`, whose type must be the callback type
/// `$ty` libvirt's bindings give for its event (a signature that does not match does not
/// compile).
macro_rules! generic {
    ($f:expr, $ty:ty) => {{
        let f: $ty = Some($f);
        // SAFETY: an optional function pointer to an optional function pointer of the same
        // size (`transmute` checks); libvirt only ever calls it back with the signature of the
        // event it was registered for, which is `$ty`'s.
        unsafe { std::mem::transmute::<$ty, sys::virConnectDomainEventGenericCallback>(f) }
    }};
}

/// Registers, on `conn`, for every domain, the events after which a domain's definition or its
/// balloon statistics must be read again (the names go into `changed`) or the running domains
/// listed again. All or
/// nothing: on an error the events already registered are deregistered. Returns the callback
/// ids.
pub fn watch(conn: &Connect, changed: &Changed) -> Result<Vec<c_int>, virt::error::Error> {
    let wanted: [(sys::virDomainEventID, sys::virConnectDomainEventGenericCallback); 7] = [
        // A domain started, stopped, crashed, ... (the listing changed), or its persistent
        // definition was changed (`virsh define`, `edit`).
        (sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE, generic!(on_lifecycle, sys::virConnectDomainEventCallback)),
        // A pin or another tunable changed (`virsh vcpupin --live`, `emulatorpin`, ...).
        (sys::VIR_DOMAIN_EVENT_ID_TUNABLE, generic!(on_tunable, sys::virConnectDomainEventTunableCallback)),
        // The opt-out (`virsh metadata --live`); the agent's own record is ignored.
        (
            sys::VIR_DOMAIN_EVENT_ID_METADATA_CHANGE,
            generic!(on_metadata, sys::virConnectDomainEventMetadataChangeCallback),
        ),
        // A device (memory, an I/O thread's disk, a balloon) came or went.
        (sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, generic!(on_device, sys::virConnectDomainEventDeviceAddedCallback)),
        (sys::VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, generic!(on_device, sys::virConnectDomainEventDeviceRemovedCallback)),
        // The balloon moved (`virsh setmem`, the agent's own change, the guest's driver), or
        // the guest rebooted: a quiet guest's carried statistics are read again.
        (
            sys::VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE,
            generic!(on_balloon, sys::virConnectDomainEventBalloonChangeCallback),
        ),
        // (Already of the generic type: no cast.)
        (sys::VIR_DOMAIN_EVENT_ID_REBOOT, Some(on_reboot)),
    ];
    let mut ids = Vec::with_capacity(wanted.len());
    for (event, cb) in wanted {
        // Each registration owns one strong count of the list, given back by `free_opaque`.
        let opaque = Arc::into_raw(Arc::clone(changed)).cast_mut().cast::<c_void>();
        // SAFETY: `conn.as_ptr()` is a live connection for the whole call. `cb` is the callback
        // of `event`'s own signature, cast to the generic type as libvirt's API requires (it
        // calls it back with the signature of the event id). `opaque` is a strong count of an
        // `Arc<Watch>` that stays valid until libvirt calls `free_opaque` with it,
        // once, when the callback is deregistered or the connection closes.
        let id = unsafe {
            sys::virConnectDomainEventRegisterAny(
                conn.as_ptr(),
                std::ptr::null_mut(),
                event as c_int,
                cb,
                opaque,
                Some(free_opaque),
            )
        };
        if id < 0 {
            let e = virt::error::Error::last_error();
            // SAFETY: registration failed, so libvirt did not take `opaque`: give its count back.
            unsafe { free_opaque(opaque) };
            unwatch(conn, &ids);
            return Err(e);
        }
        ids.push(id);
    }
    Ok(ids)
}

/// Deregisters the callbacks `ids` from `conn` (errors ignored: the connection may be gone,
/// and then libvirt has dropped them already).
pub fn unwatch(conn: &Connect, ids: &[c_int]) {
    for &id in ids {
        // SAFETY: `conn.as_ptr()` is a live connection; an unknown id is an error, not UB.
        unsafe { sys::virConnectDomainEventDeregisterAny(conn.as_ptr(), id) };
    }
}

/// Adds `dom`'s name to the list(s) of `kind` behind `opaque` (nothing for `None`).
///
/// # Safety
/// `dom` is a domain libvirt passes to a callback (valid during it); `opaque` was made by
/// [`watch`] and not yet freed.
unsafe fn note(dom: sys::virDomainPtr, opaque: *mut c_void, kind: Option<Kind>) {
    let Some(kind) = kind else { return };
    // SAFETY: the caller's contract; `virDomainGetName` returns a string owned by `dom`, or null.
    let name = unsafe { sys::virDomainGetName(dom) };
    if name.is_null() || opaque.is_null() {
        return;
    }
    // SAFETY: non-null, NUL-terminated, alive while `dom` is.
    let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
    // SAFETY: the caller's contract.
    unsafe { watch_of(opaque) }.note(name, kind);
}

/// The [`Watch`] behind `opaque`.
///
/// # Safety
/// `opaque` was made by [`watch`] and not yet freed; the reference lives only during a callback.
unsafe fn watch_of<'a>(opaque: *mut c_void) -> &'a Watch {
    // SAFETY: a live `Arc` count (see `watch`); borrowed, not taken.
    unsafe { &*opaque.cast_const().cast::<Watch>() }
}

unsafe extern "C" fn on_lifecycle(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    if opaque.is_null() {
        return 0;
    }
    // SAFETY: called by libvirt with our `opaque`.
    unsafe { watch_of(opaque) }.lifecycle.store(true, Ordering::Release);
    // SAFETY: called by libvirt with a live `dom` and our `opaque`.
    unsafe { note(dom, opaque, kind_of(sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE, event)) };
    0
}

unsafe extern "C" fn on_tunable(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _params: sys::virTypedParameterPtr,
    _n: c_int,
    opaque: *mut c_void,
) {
    // SAFETY: as above.
    unsafe { note(dom, opaque, kind_of(sys::VIR_DOMAIN_EVENT_ID_TUNABLE, 0)) };
}

unsafe extern "C" fn on_metadata(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _kind: c_int,
    nsuri: *const c_char,
    opaque: *mut c_void,
) {
    // The agent's own record of its pins changes with each pin it makes: nothing to read.
    // SAFETY: libvirt passes the namespace as a NUL-terminated string alive during the call,
    // or null.
    if !nsuri.is_null() && unsafe { CStr::from_ptr(nsuri) }.to_bytes() == super::libvirt::PINS_NS.as_bytes() {
        return;
    }
    // SAFETY: as above.
    unsafe { note(dom, opaque, kind_of(sys::VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, 0)) };
}

/// A device added or removed (the two events have the same callback type, and the same kind).
unsafe extern "C" fn on_device(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _alias: *const c_char,
    opaque: *mut c_void,
) {
    // SAFETY: as above.
    unsafe { note(dom, opaque, kind_of(sys::VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, 0)) };
}

unsafe extern "C" fn on_balloon(
    _c: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    _actual: std::os::raw::c_ulonglong,
    opaque: *mut c_void,
) {
    // SAFETY: as above.
    unsafe { note(dom, opaque, kind_of(sys::VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, 0)) };
}

unsafe extern "C" fn on_reboot(_c: sys::virConnectPtr, dom: sys::virDomainPtr, opaque: *mut c_void) {
    // SAFETY: as above.
    unsafe { note(dom, opaque, kind_of(sys::VIR_DOMAIN_EVENT_ID_REBOOT, 0)) };
}

/// Gives back the strong count `watch` handed to libvirt.
unsafe extern "C" fn free_opaque(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: made by `Arc::into_raw` in `watch`; libvirt frees each opaque once.
        drop(unsafe { Arc::from_raw(opaque.cast_const().cast::<Watch>()) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_and_metadata_change_the_definition_balloons_and_reboots_the_memory() {
        use sys::*;
        let lifecycle = |t: u32| kind_of(VIR_DOMAIN_EVENT_ID_LIFECYCLE, c_int::try_from(t).unwrap());
        // The agent's own repins raise tunable events: never a balloon read.
        assert_eq!(kind_of(VIR_DOMAIN_EVENT_ID_TUNABLE, 0), Some(Kind::Definition));
        assert_eq!(kind_of(VIR_DOMAIN_EVENT_ID_METADATA_CHANGE, 0), Some(Kind::Definition));
        assert_eq!(kind_of(VIR_DOMAIN_EVENT_ID_BALLOON_CHANGE, 0), Some(Kind::Memory));
        assert_eq!(kind_of(VIR_DOMAIN_EVENT_ID_REBOOT, 0), Some(Kind::Memory));
        assert_eq!(kind_of(VIR_DOMAIN_EVENT_ID_DEVICE_ADDED, 0), Some(Kind::Both));
        assert_eq!(kind_of(VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED, 0), Some(Kind::Both));
        assert_eq!(lifecycle(VIR_DOMAIN_EVENT_DEFINED), Some(Kind::Both));
        assert_eq!(lifecycle(VIR_DOMAIN_EVENT_UNDEFINED), Some(Kind::Definition), "now transient");
        assert_eq!(lifecycle(VIR_DOMAIN_EVENT_STARTED), Some(Kind::Both), "its vCPU threads run now");
        assert_eq!(lifecycle(VIR_DOMAIN_EVENT_RESUMED), Some(Kind::Memory));
        assert_eq!(lifecycle(VIR_DOMAIN_EVENT_STOPPED), None);
        assert_eq!(lifecycle(VIR_DOMAIN_EVENT_SUSPENDED), None);
        assert_eq!(kind_of(VIR_DOMAIN_EVENT_ID_LIFECYCLE, -1), None);
    }

    #[test]
    fn each_kind_goes_to_its_lists_once_and_clear_forgets_all() {
        let w = Watch::default();
        w.note("pinned".into(), Kind::Definition);
        w.note("pinned".into(), Kind::Definition);
        w.note("setmem".into(), Kind::Memory);
        w.note("hotplug".into(), Kind::Both);
        w.lifecycle.store(true, Ordering::Release);
        assert_eq!(w.take_names(), ["pinned", "hotplug"]);
        assert_eq!(w.take_memory(), ["setmem", "hotplug"]);
        assert!(w.take_names().is_empty() && w.take_memory().is_empty(), "taken");
        w.note("a".into(), Kind::Both);
        w.clear();
        assert!(w.take_names().is_empty() && w.take_memory().is_empty() && !w.take_lifecycle());
    }
}
