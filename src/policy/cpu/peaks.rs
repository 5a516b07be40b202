//! Keeping the two halves of the balancer from undoing each other's moves.
//!
//! Balancing works on loads (a cpu above `high` sheds), peak safety on recent peaks (a cpu
//! whose peaks add up to more than `peak_limit` sheds). In the simulator over the 2013-7
//! traces one vCPU was moved 46 times in a day: balancing moved it off a cpu at 75-77% to an
//! idle cpu whose resident had peaked at a full core, peak safety moved it back to a cpu at
//! 47% where it filled the cpu to exactly `high`, and the next jitter started over. Each rule
//! was right by itself; together they cycled. So each leaves the other nothing to do:
//!
//! - a *preventive* balancing change (its source is at most one core: nothing waits there
//!   yet) may not raise the two cpus' peaks above `peak_limit`
//!   ([`preventive_change_keeps_peaks`]); a source above one core has real delay now, and
//!   removing it outweighs a risk the peaks only predict;
//! - a peak-safety move leaves its target at least [`PEAK_TARGET_HEADROOM`] under `high`.

use super::{CpuPolicy, EPS};

/// How far under `high` a peak-safety move must leave its target, in cores: a target filled
/// to exactly `high` crosses it on the next jitter of its vCPUs, and balancing moves the
/// vCPU on again.
pub(super) const PEAK_TARGET_HEADROOM: f64 = 0.05;

/// Whether moving `delta_peak` cores of recent peaks from a cpu whose peaks add up to
/// `src_peaks` to one at `tgt_peaks` leaves their summed excess over `peak_limit` no larger
/// than before: the change gives peak safety nothing to undo.
pub(super) fn preventive_change_keeps_peaks(
    policy: &CpuPolicy,
    src_peaks: f64,
    tgt_peaks: f64,
    delta_peak: f64,
) -> bool {
    let ex = |x: f64| (x - policy.peak_limit).max(0.0);
    ex(src_peaks - delta_peak) + ex(tgt_peaks + delta_peak) <= ex(src_peaks) + ex(tgt_peaks) + EPS
}
