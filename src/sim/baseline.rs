//! The classic threshold balancer, the reference `vm-balancer` is measured against.
//!
//! It reads the host through the [`Host`] trait like the agent, but only *usage* (time on a
//! cpu), the signal the classic rule uses; it never sees delay.
//!
//! **CPU**, each quantum, at most one change:
//! 1. find the busiest and the freest cpu by usage; if the busiest is above `high` and the
//!    freest below `low`, move the vCPU of the busiest cpu whose usage is the largest not above
//!    half the gap (so the freest does not end up busier than the busiest is left); when every
//!    vCPU there would overshoot, swap a pair instead: a vCPU of the busiest with one of the
//!    freest, the pair whose usage difference is the largest not above half the gap;
//! 2. otherwise, if the freest cpu is idle (below `idle`), it takes the busiest movable vCPU
//!    (the busiest vCPU sharing its cpu with another vCPU).
//!
//! vCPUs start pinned round-robin (see [`crate::sim::SimHost::pin_round_robin`]).
//!
//! **Memory**, each quantum, from the guests' own balloon statistics (`usable_kib` = free):
//! 1. a guest whose free memory is above `free_above × size` gives back
//!    `(free − free_above × size) / 2`;
//! 2. a starved guest (free below `starve_below × size`) that did not give memory this quantum
//!    receives `starve_below × size × give_factor` plus an equal share of what was reclaimed
//!    this quantum;
//! 3. before every grant, a host OOM check: the grant is cut to what host MemAvailable (less
//!    what was already granted this quantum) still holds; nothing when nothing is left. It is
//!    an OOM check, not a reserve check: the classic rule has no host reserve.

use std::collections::{HashMap, HashSet};

use crate::host::{DomainDesc, Host, HostError};

/// Thresholds of the classic rule.
#[derive(Debug, Clone, PartialEq)]
pub struct BaselineConfig {
    /// Busiest-cpu usage above which it acts.
    pub high: f64,
    /// Freest-cpu usage below which it may receive.
    pub low: f64,
    /// A cpu below this usage is idle.
    pub idle: f64,
    /// Free memory above this fraction of the guest's size is given back (halfway per quantum).
    pub free_above: f64,
    /// Free memory below this fraction of the guest's size is starving.
    pub starve_below: f64,
    /// A starving guest receives `starve_below × size × give_factor` (plus its share).
    pub give_factor: f64,
    /// Never shrink a guest below this, KiB.
    pub floor_kib: u64,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        BaselineConfig {
            high: 0.85,
            low: 0.5,
            idle: 0.05,
            free_above: 0.3,
            starve_below: 0.1,
            give_factor: 1.5,
            floor_kib: 256 << 10,
        }
    }
}

/// State of the classic balancer between quanta.
#[derive(Debug, Default)]
pub struct Baseline {
    cfg: BaselineConfig,
    descs: Vec<DomainDesc>,
    prev_t: Option<u64>,
    prev_busy: Vec<u64>,
    prev_run: HashMap<(usize, usize), u64>,
}

struct VcpuUse {
    dom: usize,
    vcpu: u32,
    cpu: usize,
    usage: f64,
}

impl Baseline {
    pub fn new(cfg: BaselineConfig) -> Self {
        Baseline { cfg, ..Baseline::default() }
    }

    /// One quantum: sample, then at most one pin change and the balloon changes.
    pub fn step<H: Host>(&mut self, host: &mut H) -> Result<(), HostError> {
        let now = host.now_ns();
        if self.descs.is_empty() {
            for d in host.list_domains()? {
                self.descs.push(host.describe(&d)?);
            }
        }
        let hs = host.host_sample()?;
        let mut vcpus = Vec::new();
        let mut run_now = HashMap::new();
        for (di, desc) in self.descs.iter().enumerate() {
            for (vi, t) in host.vcpu_times(desc)?.into_iter().enumerate() {
                let Some(t) = t else { continue };
                run_now.insert((di, vi), t.run_ns);
                if let (Some(c), Some(prev)) = (t.affinity_mask.as_single(), self.prev_run.get(&(di, vi))) {
                    vcpus.push(VcpuUse {
                        dom: di,
                        vcpu: u32::try_from(vi).unwrap_or(u32::MAX),
                        cpu: c as usize,
                        usage: t.run_ns.saturating_sub(*prev) as f64,
                    });
                }
            }
        }
        let wall = self.prev_t.map(|t| now.saturating_sub(t));
        let prev_busy = std::mem::replace(&mut self.prev_busy, hs.cpu_busy_ns.clone());
        self.prev_run = run_now;
        self.prev_t = Some(now);
        let Some(wall) = wall.filter(|&w| w > 0) else { return Ok(()) };
        #[allow(clippy::cast_precision_loss)]
        let wall = wall as f64;
        if prev_busy.len() == hs.cpu_busy_ns.len() {
            #[allow(clippy::cast_precision_loss)]
            let usage: Vec<f64> =
                hs.cpu_busy_ns.iter().zip(&prev_busy).map(|(b, p)| b.saturating_sub(*p) as f64 / wall).collect();
            for v in &mut vcpus {
                v.usage /= wall;
            }
            self.balance_cpu(host, &hs.cpu_ids, &usage, &vcpus)?;
        }
        self.balance_memory(host, hs.mem_available_kib)
    }

    fn pin<H: Host>(&self, host: &mut H, v: &VcpuUse, cpu: u32) -> Result<(), HostError> {
        host.pin_vcpu(&self.descs[v.dom].dom, v.vcpu, cpu)
    }

    fn balance_cpu<H: Host>(
        &self,
        host: &mut H,
        ids: &[u32],
        usage: &[f64],
        vcpus: &[VcpuUse],
    ) -> Result<(), HostError> {
        if usage.is_empty() {
            return Ok(());
        }
        let b = (0..usage.len()).max_by(|&x, &y| usage[x].total_cmp(&usage[y]).then(y.cmp(&x))).unwrap_or(0);
        let f = (0..usage.len()).min_by(|&x, &y| usage[x].total_cmp(&usage[y]).then(x.cmp(&y))).unwrap_or(0);
        if b == f {
            return Ok(());
        }
        let on = |c: usize| vcpus.iter().filter(move |v| v.cpu == c);
        if usage[b] > self.cfg.high && usage[f] < self.cfg.low {
            let half = (usage[b] - usage[f]) / 2.0;
            let mv = on(b).filter(|v| v.usage > 0.0 && v.usage <= half).max_by(|x, y| x.usage.total_cmp(&y.usage));
            if let Some(v) = mv {
                return self.pin(host, v, ids[f]);
            }
            let mut best: Option<(&VcpuUse, &VcpuUse, f64)> = None;
            for a in on(b) {
                for c in on(f) {
                    let d = a.usage - c.usage;
                    if d > 0.0 && d <= half && best.is_none_or(|(_, _, bd)| d > bd) {
                        best = Some((a, c, d));
                    }
                }
            }
            if let Some((a, c, _)) = best {
                self.pin(host, a, ids[f])?;
                return self.pin(host, c, ids[b]);
            }
            return Ok(());
        }
        if usage[f] < self.cfg.idle {
            let mut count = vec![0usize; usage.len()];
            for v in vcpus {
                if let Some(c) = count.get_mut(v.cpu) {
                    *c += 1;
                }
            }
            let mv = vcpus
                .iter()
                .filter(|v| v.cpu != f && count.get(v.cpu).is_some_and(|&n| n >= 2) && v.usage > self.cfg.idle)
                .max_by(|x, y| x.usage.total_cmp(&y.usage));
            if let Some(v) = mv {
                return self.pin(host, v, ids[f]);
            }
        }
        Ok(())
    }

    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn balance_memory<H: Host>(&self, host: &mut H, host_available_kib: u64) -> Result<(), HostError> {
        let stats = host.balloon_stats()?;
        let c = &self.cfg;
        let mut reclaimed = 0u64;
        let mut gave: HashSet<&str> = HashSet::new();
        let dom_of = |name: &str| self.descs.iter().find(|d| d.dom.name == name).map(|d| d.dom.clone());
        for (name, b) in &stats {
            let Some(free) = b.usable_kib else { continue };
            let thr = (b.current_kib as f64 * c.free_above) as u64;
            if free > thr {
                let give = ((free - thr) / 2).min(b.current_kib.saturating_sub(c.floor_kib));
                if give == 0 {
                    continue;
                }
                if let Some(d) = dom_of(name) {
                    host.set_balloon(&d, b.current_kib - give)?;
                    reclaimed += give;
                    gave.insert(name);
                }
            }
        }
        let starved: Vec<_> = stats
            .iter()
            .filter(|(n, b)| {
                !gave.contains(n.as_str())
                    && b.usable_kib.is_some_and(|f| (f as f64) < b.current_kib as f64 * c.starve_below)
            })
            .collect();
        if starved.is_empty() {
            return Ok(());
        }
        let share = reclaimed / starved.len() as u64;
        let mut left = host_available_kib;
        for (name, b) in starved {
            let want = (b.current_kib as f64 * c.starve_below * c.give_factor) as u64 + share;
            let grant = want.min(b.maximum_kib.saturating_sub(b.current_kib)).min(left);
            if grant == 0 {
                continue;
            }
            if let Some(d) = dom_of(name) {
                host.set_balloon(&d, b.current_kib + grant)?;
                left -= grant;
            }
        }
        Ok(())
    }
}
