//! Safe wrappers of the bulk statistics calls, `virConnectGetAllDomainStats` (every running
//! domain) and `virDomainListGetStats` (the domains given).
//! Their records' balloon figures become [`BalloonStats`] here too.
//!
//! The `virt` crate's `Connect::all_domain_stats` hands back raw record pointers and frees only
//! the array, leaking the records; this module makes the calls through `virt::sys`, copies every
//! typed parameter into owned Rust values, and frees the whole list with
//! `virDomainStatsRecordListFree`, in one place. The only other `unsafe` code is the one call
//! in `iothread.rs` beside it.

use std::ffi::CStr;
use std::os::raw::c_uint;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use super::BalloonStats;

/// One typed parameter value, owned.
#[derive(Debug, Clone, PartialEq)]
pub enum StatValue {
    Int(i64),
    UInt(u64),
    Double(f64),
    Bool(bool),
    Str(String),
}

impl StatValue {
    /// The value as an unsigned integer, when it is a non-negative number.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            StatValue::UInt(v) => Some(v),
            StatValue::Int(v) => u64::try_from(v).ok(),
            StatValue::Double(v) if v >= 0.0 && v.is_finite() =>
            {
                #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
                Some(v as u64)
            }
            _ => None,
        }
    }
}

/// The statistics of one domain: its name and its `(field, value)` parameters.
#[derive(Debug, Clone, Default)]
pub struct DomainStats {
    pub name: String,
    pub params: Vec<(String, StatValue)>,
}

impl DomainStats {
    pub fn get(&self, field: &str) -> Option<&StatValue> {
        self.params.iter().find(|(k, _)| k == field).map(|(_, v)| v)
    }
    pub fn get_u64(&self, field: &str) -> Option<u64> {
        self.get(field).and_then(StatValue::as_u64)
    }
}

/// Statistics groups (`virDomainStatsTypes`).
pub mod groups {
    use virt::sys;
    pub const BALLOON: u32 = sys::VIR_DOMAIN_STATS_BALLOON;
}

/// `VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT` (libvirt 4.5), not exported by `virt-sys`: skip
/// the statistics of a domain whose monitor is busy instead of waiting for its job lock, so one
/// stuck QEMU does not stall the call for every guest.
pub const STATS_NOWAIT: u32 = 1 << 29;

/// Runs `virConnectGetAllDomainStats(conn, groups, ACTIVE | NOWAIT)` and returns owned records.
pub fn all_domain_stats(conn: &Connect, stat_groups: u32) -> Result<Vec<DomainStats>, virt::error::Error> {
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: `conn.as_ptr()` is a live connection owned by `conn` for the whole call;
    // `records` is a valid out-pointer that libvirt fills with a NULL-terminated array it allocates.
    let n = unsafe {
        sys::virConnectGetAllDomainStats(
            conn.as_ptr(),
            stat_groups as c_uint,
            &mut records,
            (sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | STATS_NOWAIT) as c_uint,
        )
    };
    collect_records(n, records)
}

/// Runs `virDomainListGetStats(doms, groups, NOWAIT)`: the same records for the given domains
/// only (libvirt skips a domain that is no longer defined; one that stopped, or whose monitor
/// is busy, gets a record without the guest's figures). Each domain costs libvirtd what it
/// costs in the call for all of them. No list filter flag: libvirt rejects them with a list.
pub fn list_domain_stats(doms: &[Domain], stat_groups: u32) -> Result<Vec<DomainStats>, virt::error::Error> {
    // libvirt wants a NULL-terminated array of domain pointers.
    // SAFETY: `as_ptr` only reads the handle; each stays owned by its `Domain` in `doms`.
    let mut ptrs: Vec<sys::virDomainPtr> = doms.iter().map(|d| unsafe { d.as_ptr() }).collect();
    ptrs.push(std::ptr::null_mut());
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: every pointer in `ptrs` is a live domain reference owned by `doms`, which
    // outlives the call; the array is NULL-terminated; `records` is a valid out-pointer that
    // libvirt fills with a NULL-terminated array it allocates.
    let n = unsafe {
        sys::virDomainListGetStats(ptrs.as_mut_ptr(), stat_groups as c_uint, &mut records, STATS_NOWAIT as c_uint)
    };
    collect_records(n, records)
}

/// Balloon statistics of each record that has them, keyed by domain name.
pub fn balloons_of(recs: &[DomainStats]) -> Vec<(String, BalloonStats)> {
    recs.iter().filter_map(|r| balloon_from_stats(r).map(|b| (r.name.clone(), b))).collect()
}

/// Balloon statistics from one bulk-stats record; `None` without `balloon.current`.
pub fn balloon_from_stats(r: &DomainStats) -> Option<BalloonStats> {
    Some(BalloonStats {
        current_kib: r.get_u64("balloon.current")?,
        maximum_kib: r.get_u64("balloon.maximum").unwrap_or(0),
        unused_kib: r.get_u64("balloon.unused"),
        available_kib: r.get_u64("balloon.available"),
        usable_kib: r.get_u64("balloon.usable"),
        swap_in_kib: r.get_u64("balloon.swap_in"),
        major_fault: r.get_u64("balloon.major_fault"),
        last_update_s: r.get_u64("balloon.last-update"),
        carried_for_s: None,
    })
}

fn collect_records(n: i32, records: *mut sys::virDomainStatsRecordPtr) -> Result<Vec<DomainStats>, virt::error::Error> {
    if n < 0 {
        return Err(virt::error::Error::last_error());
    }
    let list = RecordList(records);
    let count = usize::try_from(n).unwrap_or(0);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        // SAFETY: libvirt returned `n` non-NULL record pointers in `records`, which stays
        // allocated until `list` is dropped at the end of this function.
        let rec: &sys::virDomainStatsRecord = unsafe { &**list.0.add(i) };
        out.push(copy_record(rec));
    }
    Ok(out)
}

/// Frees the list on drop, whatever happens while copying.
struct RecordList(*mut sys::virDomainStatsRecordPtr);

impl Drop for RecordList {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from virConnectGetAllDomainStats or virDomainListGetStats
            // and is freed exactly once.
            unsafe { sys::virDomainStatsRecordListFree(self.0) };
        }
    }
}

fn copy_record(rec: &sys::virDomainStatsRecord) -> DomainStats {
    // SAFETY: `rec.dom` is a domain reference owned by the record; virDomainGetName returns a
    // pointer into it (or NULL), valid while the record lives; we copy it at once.
    let name = unsafe {
        let p = sys::virDomainGetName(rec.dom);
        if p.is_null() { String::new() } else { CStr::from_ptr(p).to_string_lossy().into_owned() }
    };
    let n = usize::try_from(rec.nparams).unwrap_or(0);
    let mut params = Vec::with_capacity(n);
    if !rec.params.is_null() {
        for i in 0..n {
            // SAFETY: `rec.params` points to `rec.nparams` initialised typed parameters.
            let p: &sys::virTypedParameter = unsafe { &*rec.params.add(i) };
            if let Some(kv) = copy_param(p) {
                params.push(kv);
            }
        }
    }
    DomainStats { name, params }
}

fn copy_param(p: &sys::virTypedParameter) -> Option<(String, StatValue)> {
    // The field is a NUL-terminated string within its fixed 80-byte buffer.
    let bytes: Vec<u8> = p.field.iter().take_while(|&&c| c != 0).map(|&c| c.to_ne_bytes()[0]).collect();
    let field = String::from_utf8_lossy(&bytes).into_owned();
    let t = u32::try_from(p.type_).ok()?;
    // SAFETY: libvirt sets `type_` to say which union member is initialised; we read only that one.
    let v = unsafe {
        match t {
            sys::VIR_TYPED_PARAM_INT => StatValue::Int(i64::from(p.value.i)),
            sys::VIR_TYPED_PARAM_UINT => StatValue::UInt(u64::from(p.value.ui)),
            sys::VIR_TYPED_PARAM_LLONG => StatValue::Int(p.value.l),
            sys::VIR_TYPED_PARAM_ULLONG => StatValue::UInt(p.value.ul),
            sys::VIR_TYPED_PARAM_DOUBLE => StatValue::Double(p.value.d),
            sys::VIR_TYPED_PARAM_BOOLEAN => StatValue::Bool(p.value.b != 0),
            sys::VIR_TYPED_PARAM_STRING => {
                if p.value.s.is_null() {
                    StatValue::Str(String::new())
                } else {
                    StatValue::Str(CStr::from_ptr(p.value.s).to_string_lossy().into_owned())
                }
            }
            _ => return None,
        }
    };
    Some((field, v))
}
