//! Safe wrapper of `virDomainPinIOThread`: the `virt` crate (0.5) wraps `virDomainPinEmulator`
//! (`Domain::pin_emulator`) but not the I/O-thread pin, which is only in `virt::sys`. Like
//! `stats.rs` beside it, this is one small module around one C call, with a `// SAFETY:` on
//! its `unsafe` block.

use std::os::raw::{c_int, c_uchar, c_uint};

use virt::domain::Domain;
use virt::sys;

/// `virDomainPinIOThread(dom, iothread_id, cpumap, flags)`: pins one I/O thread of `dom` to
/// the cpus set in `cpumap` (libvirt's bitmap: bit `c % 8` of byte `c / 8` is cpu `c`).
pub fn pin_iothread(dom: &Domain, iothread_id: u32, cpumap: &[u8], flags: u32) -> Result<(), virt::error::Error> {
    // libvirt takes the map's length as an int; a map of more than 2^31 bytes is no host's.
    let len = c_int::try_from(cpumap.len()).unwrap_or(c_int::MAX);
    // libvirt does not write through the map: the pointer is `*mut` only in the C prototype.
    let map = cpumap.as_ptr().cast_mut().cast::<c_uchar>();
    // SAFETY: `dom.as_ptr()` is a live domain reference owned by `dom` for the whole call; `map`
    // points to `len` readable bytes borrowed from `cpumap`, which libvirt only reads, and does
    // not keep after the call returns.
    let r = unsafe { sys::virDomainPinIOThread(dom.as_ptr(), iothread_id as c_uint, map, len, flags as c_uint) };
    if r < 0 {
        return Err(virt::error::Error::last_error());
    }
    Ok(())
}
