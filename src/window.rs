//! [`WindowMax`]: the largest value seen over a sliding time window, in fixed memory.
//!
//! Both a vCPU's peak demand (`--peak-window`) and a guest's peak memory use
//! (`--reclaim-window`) need "the most over the last W". Keeping every sample costs W / interval
//! entries (a 24 h window at 100 ms is 864,000 per guest); instead the window is cut into
//! [`BUCKETS`] buckets of W / 8 each and only each bucket's maximum is kept. A value is then
//! remembered for between 7/8 of the window and all of it: coarse, but never longer than asked
//! and never less than most of it.

/// Buckets per window.
pub const BUCKETS: usize = 8;

/// The maximum of the values recorded over the last `window_ns`, in [`BUCKETS`] buckets.
///
/// Each slot holds its bucket number (time / bucket length) and that bucket's maximum, so a
/// query needs no clean-up step: slots of buckets that fell out of the window are ignored.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowMax<T> {
    slots: [Option<(u64, T)>; BUCKETS],
}

impl<T> Default for WindowMax<T> {
    fn default() -> Self {
        WindowMax { slots: std::array::from_fn(|_| None) }
    }
}

impl<T: Copy + PartialOrd> WindowMax<T> {
    /// Bucket number of `t_ns`, or `None` for a window of 0 (nothing is remembered).
    fn bucket(t_ns: u64, window_ns: u64) -> Option<u64> {
        (window_ns > 0).then(|| t_ns / (window_ns / BUCKETS as u64).max(1))
    }

    /// Records `x` at `t_ns`. A time older than the newest bucket counts in the newest one.
    pub fn record(&mut self, t_ns: u64, window_ns: u64, x: T) {
        let Some(k) = Self::bucket(t_ns, window_ns) else { return };
        let newest = self.slots.iter().flatten().map(|&(b, _)| b).max().unwrap_or(0);
        let k = k.max(newest);
        let slot = &mut self.slots[usize::try_from(k % BUCKETS as u64).unwrap_or(0)];
        *slot = match *slot {
            Some((b, m)) if b == k => Some((k, if x > m { x } else { m })),
            _ => Some((k, x)),
        };
    }

    /// The largest value recorded in the window that ends at `t_ns`, if any.
    pub fn max(&self, t_ns: u64, window_ns: u64) -> Option<T> {
        let k = Self::bucket(t_ns, window_ns)?;
        let oldest = k.saturating_sub(BUCKETS as u64 - 1);
        self.slots.iter().flatten().filter(|&&(b, _)| b >= oldest).map(|&(_, m)| m).fold(None, |acc, m| match acc {
            Some(a) if a >= m => Some(a),
            _ => Some(m),
        })
    }

    /// Number of buckets holding a value: never more than [`BUCKETS`].
    pub fn buckets_used(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Records `x` at `t_ns` and returns the maximum over the window, `x` included (`x` itself
    /// for a window of 0).
    pub fn record_max(&mut self, t_ns: u64, window_ns: u64, x: T) -> T {
        self.record(t_ns, window_ns, x);
        self.max(t_ns, window_ns).unwrap_or(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// The old, exact window: every sample kept.
    fn exact(samples: &[(u64, u64)], now: u64, window: u64) -> Option<u64> {
        samples.iter().filter(|&&(t, _)| now.saturating_sub(t) <= window).map(|&(_, x)| x).max()
    }

    #[test]
    fn fixed_size_whatever_the_window_and_interval() {
        // 24 h at 100 ms would have been 864,000 samples; this is 8 slots, always.
        let size = std::mem::size_of::<WindowMax<u64>>();
        assert_eq!(size, std::mem::size_of::<[Option<(u64, u64)>; BUCKETS]>());
        let mut w = WindowMax::default();
        let window = 86_400 * S;
        for i in 0..2_000_000u64 {
            w.record(i * S / 10, window, i % 977);
        }
        assert_eq!(std::mem::size_of_val(&w), size);
        assert_eq!(w.max(2_000_000 * S / 10, window), Some(976));
    }

    #[test]
    fn remembers_a_value_for_seven_eighths_to_all_of_the_window() {
        let window = 800 * S;
        let mut w = WindowMax::default();
        w.record(S, window, 900u64);
        for t in (2..700).step_by(2) {
            assert_eq!(w.record_max(t * S, window, 100), 900, "at {t} s");
        }
        // A full window later it is gone.
        assert_eq!(w.record_max(801 * S, window, 100), 100);
        // Window 0: nothing kept.
        let mut z = WindowMax::default();
        assert_eq!(z.record_max(S, 0, 3u64), 3);
        assert_eq!(z.max(S, 0), None);
    }

    #[test]
    fn agrees_with_the_exact_window_within_a_bucket() {
        // The bucketed max is at least the exact max over the last 7/8 of the window and at
        // most the exact max over the whole window.
        let mut rng = fastrand::Rng::with_seed(5);
        let window = 80 * S;
        let mut w = WindowMax::default();
        let mut all = Vec::new();
        let mut t = 0;
        for _ in 0..5000 {
            t += rng.u64(1..3 * S);
            let x = rng.u64(0..1000);
            w.record(t, window, x);
            all.push((t, x));
            let got = w.max(t, window).unwrap();
            assert!(got >= exact(&all, t, window * 7 / 8).unwrap(), "at {t}");
            assert!(got <= exact(&all, t, window).unwrap(), "at {t}");
        }
    }

    #[test]
    fn a_gap_longer_than_the_window_forgets_everything() {
        let mut w = WindowMax::default();
        w.record(10 * S, 8 * S, 5.0f64);
        assert_eq!(w.max(10 * S, 8 * S), Some(5.0));
        assert_eq!(w.max(100 * S, 8 * S), None);
        // Time going backwards counts in the newest bucket and cannot revive old ones.
        w.record(S, 8 * S, 7.0);
        assert_eq!(w.max(10 * S, 8 * S), Some(7.0));
    }
}
