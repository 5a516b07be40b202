//! Workloads: deterministic, seeded demand generators and replay of Bitbrains traces.
//!
//! A [`Workload`] is a list of guests and, per quantum, the demand of each vCPU and the memory
//! need of each guest. It depends only on its seed and the quantum number, never on what a
//! policy did, so every policy of one run sees the identical workload.

use std::f64::consts::TAU;

use crate::sim::host::{GuestSpec, SimError};
use crate::sim::traces::{NOMINAL_SAMPLE_INTERVAL_S, TraceVm};

/// Quanta of virtual time per 5-minute trace sample (time compression).
pub const TRACE_SAMPLE_QUANTA: u64 = 15;
/// A trace sample covers the trace up to this long after it; beyond, the VM is stale.
pub const TRACE_MAX_GAP_S: u64 = 600;
/// Memory need = active memory × this.
pub const TRACE_MEM_HEADROOM: f64 = 2.0;
/// Smallest memory need of a trace guest, KiB.
pub const TRACE_MIN_NEED_KIB: u64 = 256 << 10;
/// Per-quantum multiplicative jitter of trace demand: ± this fraction.
pub const TRACE_JITTER: f64 = 0.15;
/// Period of the diurnal scenario, quanta (a compressed day).
pub const DIURNAL_PERIOD_QUANTA: u64 = 1800;
/// The step scenario re-draws half of the guests' levels every this many quanta.
pub const STEP_EVERY_QUANTA: u64 = 900;

/// Built-in generated scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Constant per-vCPU demand.
    Steady,
    /// Low base demand with random bursts to a full core.
    Bursty,
    /// Demand following a compressed day (sine), phases spread over guests.
    Diurnal,
    /// Constant levels, half of the guests re-drawn every 30 minutes of virtual time.
    Step,
    /// Steady CPU; one guest in five lies about its memory.
    Liar,
    /// Each guest one of the above.
    Mixed,
}

#[derive(Debug, Clone)]
enum Pattern {
    Steady,
    Bursty { left: Vec<u32> },
    Diurnal { phase: f64 },
    Step,
    Trace { vm: usize, offset_s: u64, weights: Vec<f64>, last_total: f64, last_need: u64 },
}

#[derive(Debug, Clone)]
struct GuestGen {
    pattern: Pattern,
    /// Base per-vCPU level.
    levels: Vec<f64>,
    need_kib: u64,
}

/// A deterministic workload over a set of guests.
#[derive(Debug, Clone)]
pub struct Workload {
    specs: Vec<GuestSpec>,
    gens: Vec<GuestGen>,
    traces: Vec<TraceVm>,
    /// Mean per-vCPU demand of generated scenarios.
    mean: f64,
    rng: fastrand::Rng,
}

/// vCPU cap per guest on a host of `cpus` cpus: an eighth of the host, at least 1.
pub fn vcpu_cap(cpus: u32) -> u32 {
    (cpus / 8).max(1)
}

/// A heavy-tailed level with mean ≈ `mean`, in [0, 1].
fn level(rng: &mut fastrand::Rng, mean: f64) -> f64 {
    (-(1.0 - rng.f64()).ln() * mean).clamp(0.0, 1.0)
}

#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn frac_kib(kib: u64, f: f64) -> u64 {
    (kib as f64 * f) as u64
}

impl Workload {
    /// A generated scenario: `guests` guests (1, 2, 4 or 8 vCPUs, at most [`vcpu_cap`]; 1 GiB
    /// or 2 GiB per vCPU) whose total mean demand is about 75% of `cpus`.
    pub fn generated(scenario: Scenario, guests: usize, cpus: u32, seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let cap = vcpu_cap(cpus);
        let mut specs = Vec::with_capacity(guests);
        let mut kinds = Vec::with_capacity(guests);
        for i in 0..guests {
            let vcpus = [1, 2, 2, 4, 4, 8][rng.usize(0..6)].min(cap);
            let kind = match scenario {
                Scenario::Mixed => [Scenario::Steady, Scenario::Bursty, Scenario::Diurnal, Scenario::Step][i % 4],
                s => s,
            };
            let liar = match scenario {
                Scenario::Liar => i % 5 == 0,
                Scenario::Mixed => i % 10 == 9,
                _ => false,
            };
            let max_kib = u64::from(vcpus) * rng.u64(1..=2) * (1 << 20);
            specs.push(GuestSpec { name: format!("{kind:?}-{i}").to_lowercase(), vcpus, max_kib, liar });
            kinds.push(kind);
        }
        let total_vcpus: u32 = specs.iter().map(|s| s.vcpus).sum();
        #[allow(clippy::cast_precision_loss)]
        let mean = (0.75 * f64::from(cpus) / f64::from(total_vcpus.max(1))).min(0.9);
        let gens = specs
            .iter()
            .zip(&kinds)
            .map(|(s, kind)| {
                let levels: Vec<f64> = (0..s.vcpus).map(|_| level(&mut rng, mean)).collect();
                let need_kib =
                    if s.liar { frac_kib(s.max_kib, 0.2) } else { frac_kib(s.max_kib, 0.15 + 0.45 * rng.f64()) };
                let pattern = match kind {
                    Scenario::Bursty => Pattern::Bursty { left: vec![0; s.vcpus as usize] },
                    Scenario::Diurnal => Pattern::Diurnal { phase: rng.f64() * 0.25 * TAU },
                    Scenario::Step => Pattern::Step,
                    _ => Pattern::Steady,
                };
                GuestGen { pattern, levels, need_kib }
            })
            .collect();
        Workload { specs, gens, traces: Vec::new(), mean, rng }
    }

    /// Replays traces: guest `i` is trace VM `i mod n` (VMs without samples skipped), started
    /// at a seeded random offset into its own trace, which wraps around. vCPUs are capped at
    /// [`vcpu_cap`]; the VM's demand (cores) is split over its vCPUs by fixed seeded weights
    /// (uniform 0.5-1.5, normalised; what a vCPU cannot take above one core goes to the others),
    /// then jittered each quantum by ± [`TRACE_JITTER`]. Each 5-minute sample lasts
    /// [`TRACE_SAMPLE_QUANTA`] quanta. Stale periods (gaps in the trace) keep the last demand and
    /// memory need. Memory need = active memory × [`TRACE_MEM_HEADROOM`], at least
    /// [`TRACE_MIN_NEED_KIB`], at most the VM's size; a missing reading keeps the previous need.
    pub fn from_traces(vms: Vec<TraceVm>, guests: usize, cpus: u32, seed: u64) -> Result<Self, SimError> {
        let vms: Vec<TraceVm> = vms.into_iter().filter(|v| v.samples.len() >= 2 && v.vcpus > 0).collect();
        if vms.is_empty() {
            return Err(SimError::Workload("no trace VM has at least two live samples".into()));
        }
        let mut rng = fastrand::Rng::with_seed(seed);
        let cap = vcpu_cap(cpus);
        let mut specs = Vec::with_capacity(guests);
        let mut gens = Vec::with_capacity(guests);
        for i in 0..guests {
            let k = i % vms.len();
            let vm = &vms[k];
            let vcpus = vm.vcpus.min(cap);
            let (start, end) = (vm.start_s().unwrap_or(0), vm.end_s().unwrap_or(0));
            let span = end.saturating_sub(start).max(1);
            let offset_s = rng.u64(0..span);
            let weights: Vec<f64> = (0..vcpus).map(|_| 0.5 + rng.f64()).collect();
            let first_need = vm.samples.iter().find_map(|s| s.mem_active_kib);
            let need = first_need.map_or(vm.mem_capacity_kib / 10, |a| trace_need(a, vm.mem_capacity_kib));
            let max_kib = vm.mem_capacity_kib.max(TRACE_MIN_NEED_KIB);
            specs.push(GuestSpec { name: format!("vm{}-{}", vm.name, i / vms.len()), vcpus, max_kib, liar: false });
            gens.push(GuestGen {
                pattern: Pattern::Trace { vm: k, offset_s, weights, last_total: 0.0, last_need: need },
                levels: vec![0.0; vcpus as usize],
                need_kib: need,
            });
        }
        Ok(Workload { specs, gens, traces: vms, mean: 0.0, rng })
    }

    pub fn specs(&self) -> &[GuestSpec] {
        &self.specs
    }

    /// The demand of every vCPU (`demand[g][v]`, cores) and the memory need of every guest
    /// (KiB) during quantum `q`. Call once per quantum, in order.
    pub fn fill(&mut self, q: u64, demand: &mut [Vec<f64>], need: &mut [u64]) {
        let Workload { gens, traces, rng, mean, specs } = self;
        for (g, gg) in gens.iter_mut().enumerate() {
            let (Some(out), Some(need_out)) = (demand.get_mut(g), need.get_mut(g)) else { continue };
            out.resize(gg.levels.len(), 0.0);
            *need_out = gg.need_kib;
            match &mut gg.pattern {
                Pattern::Steady => out.copy_from_slice(&gg.levels),
                Pattern::Bursty { left } => {
                    for (v, l) in left.iter_mut().enumerate() {
                        if *l == 0 && rng.f64() < 1.0 / 120.0 {
                            *l = 10 + rng.u32(0..60);
                        }
                        out[v] = if *l > 0 {
                            *l -= 1;
                            1.0
                        } else {
                            gg.levels[v] * 0.5
                        };
                    }
                }
                Pattern::Diurnal { phase } => {
                    #[allow(clippy::cast_precision_loss)]
                    let x = (q % DIURNAL_PERIOD_QUANTA) as f64 / DIURNAL_PERIOD_QUANTA as f64;
                    let f = 1.0 + 0.8 * (TAU * x + *phase).sin();
                    for (o, l) in out.iter_mut().zip(&gg.levels) {
                        *o = (l * f).clamp(0.0, 1.0);
                    }
                    *need_out = frac_kib(gg.need_kib, 0.75 + 0.25 * f);
                }
                Pattern::Step => {
                    if q > 0 && q.is_multiple_of(STEP_EVERY_QUANTA) && rng.bool() {
                        for l in &mut gg.levels {
                            *l = level(rng, *mean);
                        }
                        gg.need_kib = frac_kib(specs[g].max_kib, 0.15 + 0.45 * rng.f64());
                    }
                    out.copy_from_slice(&gg.levels);
                    *need_out = gg.need_kib;
                }
                Pattern::Trace { vm, offset_s, weights, last_total, last_need } => {
                    let Some(tv) = traces.get(*vm) else { continue };
                    let (start, end) = (tv.start_s().unwrap_or(0), tv.end_s().unwrap_or(0));
                    let span = end.saturating_sub(start).max(1);
                    let rel = *offset_s
                        + (q / TRACE_SAMPLE_QUANTA) * NOMINAL_SAMPLE_INTERVAL_S
                        + (q % TRACE_SAMPLE_QUANTA) * NOMINAL_SAMPLE_INTERVAL_S / TRACE_SAMPLE_QUANTA;
                    if let Some(s) = tv.at(start + rel % span, TRACE_MAX_GAP_S) {
                        *last_total = s.cpu_demand_cores;
                        if let Some(a) = s.mem_active_kib {
                            *last_need = trace_need(a, tv.mem_capacity_kib);
                        }
                    }
                    split(*last_total, weights, out);
                    for o in out.iter_mut() {
                        *o = (*o * (1.0 + TRACE_JITTER * (2.0 * rng.f64() - 1.0))).clamp(0.0, 1.0);
                    }
                    *need_out = (*last_need).min(specs[g].max_kib);
                }
            }
        }
    }
}

fn trace_need(active_kib: u64, max_kib: u64) -> u64 {
    let need = frac_kib(active_kib, TRACE_MEM_HEADROOM).max(TRACE_MIN_NEED_KIB);
    if max_kib > 0 { need.min(max_kib) } else { need }
}

/// Splits `total` cores over vCPUs by `weights`, none above 1 (the excess goes to the others).
fn split(total: f64, weights: &[f64], out: &mut [f64]) {
    let mut left = total.max(0.0);
    let mut open: Vec<usize> = (0..weights.len().min(out.len())).collect();
    out.iter_mut().for_each(|o| *o = 0.0);
    while left > 1e-12 && !open.is_empty() {
        let wsum: f64 = open.iter().map(|&i| weights[i]).sum();
        let mut spill = 0.0;
        let mut still = Vec::with_capacity(open.len());
        for &i in &open {
            let want = out[i] + left * weights[i] / wsum;
            if want >= 1.0 {
                spill += want - 1.0;
                out[i] = 1.0;
            } else {
                out[i] = want;
                still.push(i);
            }
        }
        left = spill;
        open = still;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_caps_at_one_core_and_conserves() {
        let mut out = vec![0.0; 3];
        split(1.5, &[1.0, 1.0, 1.0], &mut out);
        assert!(out.iter().all(|&x| (x - 0.5).abs() < 1e-9));
        split(2.7, &[3.0, 1.0, 1.0], &mut out);
        assert!((out.iter().sum::<f64>() - 2.7).abs() < 1e-9 && (out[0] - 1.0).abs() < 1e-12, "{out:?}");
        split(5.0, &[1.0, 2.0, 1.0], &mut out);
        assert!(out.iter().all(|&x| (x - 1.0).abs() < 1e-12));
    }

    #[test]
    fn generated_is_deterministic_and_bounded() {
        for sc in
            [Scenario::Steady, Scenario::Bursty, Scenario::Diurnal, Scenario::Step, Scenario::Liar, Scenario::Mixed]
        {
            let mut a = Workload::generated(sc, 20, 16, 42);
            let mut b = Workload::generated(sc, 20, 16, 42);
            assert_eq!(a.specs(), b.specs());
            let n = a.specs().len();
            let (mut da, mut db) = (vec![Vec::new(); n], vec![Vec::new(); n]);
            let (mut na, mut nb) = (vec![0; n], vec![0; n]);
            for q in 0..2000 {
                a.fill(q, &mut da, &mut na);
                b.fill(q, &mut db, &mut nb);
                assert_eq!(da, db);
                assert_eq!(na, nb);
                assert!(da.iter().flatten().all(|&d| (0.0..=1.0).contains(&d)));
            }
        }
    }
}
