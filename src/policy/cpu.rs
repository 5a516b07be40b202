//! The vCPU pin balancer.
//!
//! Load of a host cpu = fixed load (everything the balancer does not move: host processes,
//! excluded domains, vCPUs without rates yet) + the demand (usage + delay) of the vCPUs pinned
//! to it. Each quantum:
//!
//! 1. **Placement.** vCPUs that float over several cpus are pinned once, heaviest first, each
//!    on the least loaded allowed cpu; among about equally loaded ones, one holding none of
//!    its guest's vCPUs, on an idle physical core, in the NUMA node most of its guest's pinned
//!    vCPUs are on (where its memory most likely is).
//! 2. **Balancing.** While the busiest cpu `b` is above `high`, take the best single move
//!    (a vCPU of `b` to another cpu) or swap (a vCPU of `b` for a lighter one elsewhere):
//!    - *never flip*: the target may not end up busier than the source is left, beyond
//!      `flip_margin` (a target with some host load, say 15%, must still take one of two busy
//!      vCPUs piled on one core), and the busiest cpu's load never rises;
//!    - the gain (how much the pair's larger load drops) must reach `min_gain` (hysteresis),
//!      except for an *overload relief*: the source is above one core (its vCPUs wait) and the
//!      target stays under `high`, so even a small move removes real delay and cannot be
//!      undone (the target never becomes a source);
//!    - *a move must pay for itself*: a change that leaves either cpu above one core must
//!      remove at least `delay_margin` cores of excess (demand above one core, the two cpus
//!      together). On an overloaded host a move between two cpus that both stay above one
//!      core only shifts delay from one to the other; without this rule the agent kept
//!      shuffling vCPUs between such cpus (4.8 repins per vCPU-hour in the simulator where
//!      the baseline made 0.04, for the same delay);
//!    - *no work for peak safety*: a preventive change (its source at most one core) may not
//!      raise the two cpus' recent peaks above `peak_limit`, or peak safety would move the
//!      vCPU straight back ([`peaks`]);
//!    - *no work for SMT relief*: nor may it raise the SMT excess of the two cpus' physical
//!      cores (their two threads' loads above one core, [`topo`]): a busy vCPU goes to an idle
//!      core, or to its own core's other thread, before the idle thread of a busy core;
//!    - among candidates within `about_equal` of the best gain, prefer fewer repins (a move
//!      over a swap), a target in the same NUMA node, then the lighter vCPU (the heaviest one
//!      keeps its warm cache), then the freer target;
//!    - each vCPU moves at most once per plan, not at all while cooling down after a move;
//!      cpus a repin touched sit out until their smoothed loads show its effect (`settle_ns`);
//!      at most `max_repins` pins change per plan (a swap counts two).
//! 3. **SMT relief.** A physical core whose two threads' loads add up above its yield (1.25
//!    cores) sheds a vCPU to a thread of a core that stays at most one core, when that lowers
//!    the summed excess of the cores over one core by `min_gain`; the target cpu stays under
//!    `high` (or held next to nothing: a full-core vCPU gets an idle core) and its peaks as
//!    peak safety wants ([`topo`]). Only while the host's load is at most one core per
//!    physical core (above it cores must share, and moves only shift the sharing). Without
//!    SMT siblings a cpu is a core and this never acts.
//! 4. **Peak safety.** A cpu whose vCPUs' recent peaks add up to more than `peak_limit` sheds
//!    a vCPU to a cpu where they fit, leaving that cpu clearly under `high` and raising no
//!    core's SMT excess ([`peaks`]).
//!
//! Pure: no I/O, no clock. [`input_from`] turns a snapshot into the plain input of [`plan`].

use std::collections::HashMap;
use std::rc::Rc;

use crate::host::CpuSet;
use crate::policy::{Action, PinKind};

mod input;
pub use input::{BlockedPins, Granularity, chosen_set, groups, input_from};

mod peaks;
use peaks::{PEAK_TARGET_HEADROOM, preventive_change_keeps_peaks};

const EPS: f64 = 1e-9;
/// What one host cpu serves, in cores: load above it waits (delay).
const CAPACITY: f64 = 1.0;
/// Smallest gain of an overload relief (cores). Small on purpose: in the simulator over the
/// traces, all of our remaining delay came from full-core vCPUs sharing a cpu with a vCPU at
/// 0.5-1% of a core; moving that one away costs one repin and ends the contention for good.
const RELIEF_MIN_GAIN: f64 = 0.002;

/// When (host clock, ns) each vCPU was last moved: domain name → vCPU → time.
pub type MovedAt = HashMap<String, HashMap<u32, u64>>;

/// Tunables of the CPU balancer.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuPolicy {
    /// A cpu whose load (in cores) is above this is overloaded.
    pub high: f64,
    /// Smallest drop of the pair's larger load that justifies a repin, in cores.
    pub min_gain: f64,
    /// Most pins changed per quantum by balancing (a swap counts two).
    pub max_repins: usize,
    /// Most floating vCPUs placed per quantum.
    pub max_placements: usize,
    /// How long a moved vCPU stays where it was put, ns.
    pub cooldown_ns: u64,
    /// Gains closer than this to the best one count as equal, in cores.
    pub about_equal: f64,
    /// How much busier than the source the target may end up, in cores.
    pub flip_margin: f64,
    /// After a repin, the cpus involved are left out of balancing this long (ns), until their
    /// smoothed loads show the move's effect: no second move on stale figures.
    pub settle_ns: u64,
    /// Peak safety: a cpu whose vCPUs' recent peaks (plus its fixed load) add up to more than
    /// this may shed a vCPU to a cpu where they stay under it, in cores. Above one core on
    /// purpose: peaks of different vCPUs rarely coincide.
    pub peak_limit: f64,
    /// A change that leaves the source or the target above one core must lower the pair's
    /// excess over one core (its predicted delay) by at least this, in cores.
    pub delay_margin: f64,
    /// What a vCPU is pinned to: a cpu, a physical core's threads, or an LLC domain.
    pub granularity: Granularity,
}

/// Default of [`CpuPolicy::delay_margin`] (and of `--delay-margin`).
pub const DEFAULT_DELAY_MARGIN: f64 = 0.05;

impl Default for CpuPolicy {
    fn default() -> Self {
        CpuPolicy {
            high: 0.75,
            min_gain: 0.10,
            max_repins: 4,
            max_placements: 64,
            cooldown_ns: 30_000_000_000,
            about_equal: 0.05,
            flip_margin: 0.25,
            // Two smoothing time constants of the default 4 s (what the daemon derives).
            settle_ns: 8_000_000_000,
            peak_limit: 1.2,
            delay_margin: DEFAULT_DELAY_MARGIN,
            granularity: Granularity::Cpu,
        }
    }
}

/// One allowed host cpu.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuSlot {
    pub id: u32,
    pub node: u32,
    /// Load the balancer cannot move, in cores.
    pub fixed: f64,
    /// A repin touched it recently: neither source nor target of balancing moves.
    pub settling: bool,
    /// Index of its SMT sibling thread among the allowed cpus ([`topo`]).
    pub sibling: Option<usize>,
    /// At `--pin-granularity core|llc`: the cpus this slot stands for (`id` is the lowest),
    /// what its vCPUs are pinned to. Its loads are shares of the group's capacity.
    pub group: Option<CpuSet>,
    /// What the slot serves, in cores: 1 for a cpu; a group's capacity ([`groups`]). At a
    /// group granularity the planner's loads are shares of the largest slot's capacity, and a
    /// smaller slot's fixed load includes what it lacks of that (`input_from`).
    pub capacity: f64,
}

/// `cpu 3`, or `cpus 2-3` for a group: how logs and reasons name a slot.
impl std::fmt::Display for CpuSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.group {
            Some(g) if g.0.len() > 1 => write!(f, "cpus {g}"),
            _ => write!(f, "cpu {}", self.id),
        }
    }
}

/// One vCPU the planner knows the demand of.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuSlot {
    /// Shared by the domain's vCPUs: one allocation per domain, not per vCPU.
    pub domain: Rc<str>,
    pub vcpu: u32,
    /// Smoothed usage + delay, cores.
    pub demand: f64,
    /// Its recent peak demand (decaying), at least `demand`, cores.
    pub peak: f64,
    /// Its affinity now.
    pub current: CpuSet,
    /// Index into `CpuInput::cpus` when pinned to exactly one allowed cpu; `None` when floating.
    pub cpu: Option<usize>,
    /// False for excluded domains and vCPUs cooling down: counted, never moved.
    pub movable: bool,
}

/// The planner's whole input.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CpuInput {
    pub cpus: Vec<CpuSlot>,
    pub vcpus: Vec<VcpuSlot>,
}

/// Each allowed cpu's load as the planner sees it (fixed load + demand of the vCPUs pinned
/// there), indexed like `input.cpus`: what the debug log and the metrics report.
pub fn loads(input: &CpuInput) -> Vec<f64> {
    let mut load: Vec<f64> = input.cpus.iter().map(|c| c.fixed).collect();
    for v in &input.vcpus {
        if let Some(l) = v.cpu.and_then(|c| load.get_mut(c)) {
            *l += v.demand;
        }
    }
    load
}

/// Each allowed cpu's load as the planner sees it, on one line (`cpu 0: 0.05 + 2.00 (2 vCPUs)`),
/// for the debug log: why a pile-up was or was not moved.
pub fn describe_loads(input: &CpuInput) -> String {
    let loads = loads(input);
    let mut parts = Vec::with_capacity(input.cpus.len());
    for ((i, c), load) in input.cpus.iter().enumerate().zip(loads) {
        let on = input.vcpus.iter().filter(|v| v.cpu == Some(i)).count();
        parts.push(format!("{c}: {:.2} + {:.2} ({on} vCPUs)", c.fixed, load - c.fixed));
    }
    let floating = input.vcpus.iter().filter(|v| v.cpu.is_none()).count();
    if floating > 0 {
        parts.push(format!("{floating} floating"));
    }
    parts.join(", ")
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    v: usize,
    /// Swap partner (a vCPU on the target), if a swap.
    w: Option<usize>,
    target: usize,
    gain: f64,
    same_node: bool,
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

/// The plan's working state: loads and placements as the changes planned so far leave them.
struct Work {
    load: Vec<f64>,
    /// The same with each vCPU counted at its recent peak.
    peak_load: Vec<f64>,
    /// vCPUs on each cpu.
    on: Vec<Vec<usize>>,
    /// vCPUs the plan may still move.
    free: Vec<bool>,
    /// Cpus left out of balancing (`CpuSlot::settling`).
    settling: Vec<bool>,
}

impl Work {
    fn new(input: &CpuInput) -> Work {
        let n = input.cpus.len();
        let load: Vec<f64> = input.cpus.iter().map(|c| c.fixed).collect();
        // Each cpu's list sized once (for its vCPUs and a few moves in): no regrowth.
        let mut count = vec![0usize; n];
        for c in input.vcpus.iter().filter_map(|v| v.cpu) {
            count[c] += 1;
        }
        let mut w = Work {
            peak_load: load.clone(),
            load,
            on: count.iter().map(|&k| Vec::with_capacity(k + 4)).collect(),
            free: input.vcpus.iter().map(|v| v.movable).collect(),
            settling: input.cpus.iter().map(|c| c.settling).collect(),
        };
        for (i, v) in input.vcpus.iter().enumerate() {
            if let Some(c) = v.cpu {
                w.add(input, i, c);
            }
        }
        w
    }

    /// Counts vCPU `i` on cpu `c`.
    fn add(&mut self, input: &CpuInput, i: usize, c: usize) {
        let v = &input.vcpus[i];
        self.load[c] += v.demand;
        self.peak_load[c] += v.peak;
        self.on[c].push(i);
    }

    /// Moves vCPU `i` from cpu `b` to cpu `t` (it moves no more in this plan); returns its pin.
    fn shift(&mut self, input: &CpuInput, i: usize, b: usize, t: usize, kind: PinKind, reason: String) -> Action {
        let v = &input.vcpus[i];
        self.load[b] -= v.demand;
        self.peak_load[b] -= v.peak;
        self.on[b].retain(|&x| x != i);
        self.add(input, i, t);
        self.free[i] = false;
        pin(v, &input.cpus[t], kind, reason)
    }
}

fn pin(v: &VcpuSlot, slot: &CpuSlot, kind: PinKind, reason: String) -> Action {
    let to = slot.group.clone().unwrap_or_else(|| CpuSet::single(slot.id));
    let (domain, from) = (v.domain.to_string(), v.current.clone());
    Action::Pin { domain, vcpu: v.vcpu, from, to, kind, reason }
}

/// Plans the pins of one quantum.
pub fn plan(input: &CpuInput, policy: &CpuPolicy) -> Vec<Action> {
    let mut actions = Vec::new();
    if input.cpus.is_empty() {
        return actions;
    }
    let mut w = Work::new(input);

    // 1. Placement of floating vCPUs, heaviest first.
    let mut floating: Vec<usize> =
        (0..input.vcpus.len()).filter(|&i| input.vcpus[i].cpu.is_none() && w.free[i]).collect();
    floating.sort_by(|&a, &b| input.vcpus[b].demand.total_cmp(&input.vcpus[a].demand).then(a.cmp(&b)));
    for &i in floating.iter().take(policy.max_placements) {
        let v = &input.vcpus[i];
        let c = place(input, policy, &w, v);
        let reason = format!(
            "initial placement: vCPU floated on cpus {} (demand {}); {} is among the least loaded allowed cpus ({}) and holds the fewest of its siblings",
            v.current,
            pct(v.demand),
            &input.cpus[c],
            pct(w.load[c])
        );
        actions.push(pin(v, &input.cpus[c], PinKind::Placement, reason));
        w.add(input, i, c);
        w.free[i] = false;
    }

    // 2. Balancing.
    let mut repins = 0;
    while repins < policy.max_repins {
        let Some(b) = argmax(&w.load, &w.settling) else { break };
        if w.load[b] <= policy.high + EPS {
            break;
        }
        let Some(best) = best_candidate(input, policy, &w, b, policy.max_repins - repins) else { break };
        let t = best.target;
        let v = &input.vcpus[best.v];
        let (src_before, tgt_before) = (w.load[b], w.load[t]);
        let moved_back = best.w.map_or(0.0, |x| input.vcpus[x].demand);
        let why = format!(
            "{} at {} (over {}), {} at {}; after: {} and {}",
            &input.cpus[b],
            pct(src_before),
            pct(policy.high),
            &input.cpus[t],
            pct(tgt_before),
            pct(src_before + moved_back - v.demand),
            pct(tgt_before + v.demand - moved_back)
        );
        let pin_reason = match best.w {
            Some(x) => format!("swap with vCPU {} of {}: {why}", input.vcpus[x].vcpu, input.vcpus[x].domain),
            None => format!("move (demand {}): {why}", pct(v.demand)),
        };
        let kind = if best.w.is_some() { PinKind::Swap } else { PinKind::Move };
        actions.push(w.shift(input, best.v, b, t, kind, pin_reason));
        repins += 1;
        if let Some(x) = best.w {
            let reason =
                format!("swap with vCPU {} of {} (demand {}): {why}", v.vcpu, v.domain, pct(input.vcpus[x].demand));
            actions.push(w.shift(input, x, t, b, PinKind::Swap, reason));
            repins += 1;
        }
    }

    // 3. SMT relief.
    while repins < policy.max_repins {
        let Some((b, i, t)) = topo::smt_relief(input, policy, &w) else { break };
        let v = &input.vcpus[i];
        let sib = |c: usize| topo::sibling_load(input, &w.load, c);
        let why = format!(
            "SMT relief: the core of {} holds {} (its threads {} + {}, over {}); vCPU (demand {}) moves to {} (core at {})",
            &input.cpus[b],
            pct(w.load[b] + sib(b)),
            pct(w.load[b]),
            pct(sib(b)),
            pct(topo::CORE_LIMIT),
            pct(v.demand),
            &input.cpus[t],
            pct(w.load[t] + sib(t))
        );
        actions.push(w.shift(input, i, b, t, PinKind::Move, why));
        repins += 1;
    }

    // 4. Peak safety.
    while repins < policy.max_repins {
        let Some((b, i, t)) = peak_relief(input, policy, &w) else { break };
        let v = &input.vcpus[i];
        let why = format!(
            "peak safety: the recent peaks on {} add up to {} (over {}); vCPU peak {} (now {}) moves to {} (peaks {}, load {})",
            &input.cpus[b],
            pct(w.peak_load[b]),
            pct(policy.peak_limit),
            pct(v.peak),
            pct(v.demand),
            &input.cpus[t],
            pct(w.peak_load[t]),
            pct(w.load[t])
        );
        actions.push(w.shift(input, i, b, t, PinKind::PeakSafety, why));
        repins += 1;
    }
    actions
}

/// Smallest drop of a cpu's peak excess that justifies a peak-safety repin, in cores.
const PEAK_MIN_GAIN: f64 = 0.05;

/// One peak-safety move `(source, vCPU, target)`: from the cpu whose peaks exceed
/// `peak_limit` the most (among those where a move exists), the vCPU with the smallest peak
/// that covers the excess (else the largest), to the cpu with the lowest peaks where it fits
/// under both `peak_limit` and `high`, in the same NUMA node if one fits there. Each such move
/// lowers the total excess over all cpus by at least `PEAK_MIN_GAIN` and creates none, so
/// these moves cannot cycle; and it leaves its target `PEAK_TARGET_HEADROOM` under `high`, so
/// balancing does not move the vCPU on at the next jitter.
fn peak_relief(input: &CpuInput, policy: &CpuPolicy, w: &Work) -> Option<(usize, usize, usize)> {
    let Work { load, peak_load, on, free, settling } = w;
    let limit = policy.peak_limit;
    let cap = policy.high - PEAK_TARGET_HEADROOM;
    let mut over: Vec<usize> = (0..load.len()).filter(|&c| !settling[c] && peak_load[c] > limit + EPS).collect();
    if over.is_empty() {
        return None;
    }
    over.sort_by(|&a, &b| peak_load[b].total_cmp(&peak_load[a]).then(a.cmp(&b)));
    let mut targets: Vec<usize> = (0..load.len()).filter(|&c| !settling[c]).collect();
    targets.sort_by(|&a, &b| peak_load[a].total_cmp(&peak_load[b]).then(a.cmp(&b)));
    // least_load[k]: the lowest load among the k targets with the lowest peaks. A vCPU of peak
    // p can only go to a prefix of `targets`; if even that prefix's least loaded cpu cannot
    // take its demand, no scan is needed.
    let mut least_load = Vec::with_capacity(targets.len() + 1);
    least_load.push(f64::INFINITY);
    for &t in &targets {
        let m = least_load.last().copied().unwrap_or(f64::INFINITY);
        least_load.push(m.min(load[t]));
    }
    for &b in &over {
        let excess = peak_load[b] - limit;
        let mut movers: Vec<usize> = on[b].iter().copied().filter(|&v| free[v]).collect();
        let pk = |v: usize| input.vcpus[v].peak;
        movers.sort_by(|&x, &y| {
            let (px, py) = (pk(x), pk(y));
            let (cx, cy) = (px >= excess - EPS, py >= excess - EPS);
            cy.cmp(&cx).then(if cx { px.total_cmp(&py) } else { py.total_cmp(&px) }).then(x.cmp(&y))
        });
        for &v in &movers {
            let (d, p) = (input.vcpus[v].demand, pk(v));
            if p.min(excess) < PEAK_MIN_GAIN - EPS {
                continue;
            }
            let fits =
                |t: usize| t != b && load[t] + d <= cap + EPS && topo::smt_excess_removed(input, load, b, t, d) >= -EPS;
            let room = targets.partition_point(|&t| peak_load[t] + p <= limit + EPS);
            if least_load[room] + d > cap + EPS {
                continue;
            }
            let mut first = None;
            for &t in &targets[..room] {
                if !fits(t) {
                    continue;
                }
                if input.cpus[t].node == input.cpus[b].node {
                    return Some((b, v, t));
                }
                first.get_or_insert(t);
            }
            if let Some(t) = first {
                return Some((b, v, t));
            }
        }
    }
    None
}

/// The busiest cpu that is not settling.
fn argmax(load: &[f64], settling: &[bool]) -> Option<usize> {
    let mut b: Option<usize> = None;
    for (i, &l) in load.iter().enumerate() {
        if !settling[i] && b.is_none_or(|j| l > load[j] + EPS) {
            b = Some(i);
        }
    }
    b
}

/// Where a floating vCPU goes: among the cpus within `about_equal` of the least loaded, the
/// one holding the fewest vCPUs of the same domain (siblings tend to get busy together: a
/// guest that wakes up wakes all its vCPUs), then one on an idle physical core (its SMT
/// sibling thread idle), then one in the guest's NUMA node ([`home_node`]), then the lowest
/// recent peaks, then the fewest vCPUs.
fn place(input: &CpuInput, policy: &CpuPolicy, w: &Work, v: &VcpuSlot) -> usize {
    let Work { load, peak_load, on, .. } = w;
    let least = load.iter().copied().fold(f64::INFINITY, f64::min);
    // Per cpu of the slot: a group of cpus (`--pin-granularity`) holds a vCPU per cpu before
    // it counts as stacking the guest's vCPUs.
    let siblings = |c: usize| {
        let width = input.cpus[c].group.as_ref().map_or(1, |g| g.0.len().max(1));
        on[c].iter().filter(|&&x| input.vcpus[x].domain == v.domain).count() / width
    };
    let home = home_node(input, w, &v.domain);
    let away = |c: usize| home.is_some_and(|h| input.cpus[c].node != h);
    (0..load.len())
        .filter(|&c| load[c] <= least + policy.about_equal + EPS)
        .min_by(|&a, &b| {
            siblings(a)
                .cmp(&siblings(b))
                .then(topo::on_busy_core(input, load, a).cmp(&topo::on_busy_core(input, load, b)))
                .then(away(a).cmp(&away(b)))
                .then(peak_load[a].total_cmp(&peak_load[b]))
                .then(on[a].len().cmp(&on[b].len()))
                .then(a.cmp(&b))
        })
        .unwrap_or(0)
}

/// The NUMA node most of `domain`'s pinned vCPUs are on ([`crate::host::home_node`]);
/// `None` while none is pinned.
fn home_node(input: &CpuInput, w: &Work, domain: &str) -> Option<u32> {
    let nodes: Vec<u32> = w
        .on
        .iter()
        .enumerate()
        .flat_map(|(c, vs)| vs.iter().filter(|&&x| &*input.vcpus[x].domain == domain).map(move |_| input.cpus[c].node))
        .collect();
    crate::host::home_node(&nodes)
}

/// Moving `delta` cores from `src` to `tgt`: the drop of the pair's larger load, or `None` when
/// the move would flip the imbalance, i.e. leave the target busier than the source by more
/// than `flip_margin`. Moving `delta` straight back can never gain, and every accepted move
/// lowers the pair's larger load by at least `min_gain`, so plans cannot oscillate on a steady
/// load.
fn pair_gain(policy: &CpuPolicy, src: f64, tgt: f64, delta: f64) -> Option<f64> {
    let (ns, nt) = (src - delta, tgt + delta);
    // Computed either way: a select, not a branch, in the loops of `best_candidate`.
    (nt <= ns + policy.flip_margin + EPS).then_some(src - ns.max(nt))
}

/// The candidates that may still win: those within `about_equal` of the best gain so far.
/// The best only rises, so a candidate left out here would be left out at the end too; the
/// kept ones stay in the order they came, as the final choice breaks no tie by position but
/// the first.
struct Shortlist {
    cands: Vec<Candidate>,
    /// The best gain of all candidates offered (kept or not: the best is always kept).
    best: f64,
    about_equal: f64,
}

impl Shortlist {
    fn new(about_equal: f64) -> Self {
        Shortlist { cands: Vec::new(), best: f64::NEG_INFINITY, about_equal }
    }

    fn push(&mut self, c: Candidate) {
        if c.gain >= self.best - self.about_equal - EPS {
            self.best = self.best.max(c.gain);
            self.cands.push(c);
        }
    }
}

/// Whether moving `delta` cores from a cpu at `src` to one at `tgt` pays for itself: it
/// leaves both at most one core (nothing waits there: the old rules decide), or it lowers
/// their excess over one core by at least `delay_margin`. A move between two cpus that both
/// stay above one core removes nothing: the delay it takes from the source it adds to the
/// target.
fn pays_for_itself(policy: &CpuPolicy, src: f64, tgt: f64, delta: f64) -> bool {
    let (ns, nt) = (src - delta, tgt + delta);
    if ns <= CAPACITY + EPS && nt <= CAPACITY + EPS {
        return true;
    }
    excess_removed(src, tgt, delta) >= policy.delay_margin - EPS
}

/// How much moving `delta` cores from a cpu at `src` to one at `tgt` lowers their summed
/// excess over one core, in cores (negative when it adds excess).
fn excess_removed(src: f64, tgt: f64, delta: f64) -> f64 {
    let ex = |x: f64| (x - CAPACITY).max(0.0);
    ex(src) + ex(tgt) - ex(src - delta) - ex(tgt + delta)
}

fn best_candidate(input: &CpuInput, policy: &CpuPolicy, w: &Work, b: usize, repins_left: usize) -> Option<Candidate> {
    let Work { load, peak_load, on, free, settling } = w;
    let node_b = input.cpus[b].node;
    // A candidate must gain `min_gain`, except an overload relief: the source is above `high`
    // (the caller only plans for such a source) and the target stays under it, so the change
    // removes real delay and the target can never become a source that sends it back.
    let admissible = |gain: f64, tgt_after: f64| {
        // `|` and `&`, not `||` and `&&`: no branches to mispredict in the loops below.
        (gain >= policy.min_gain - EPS) | ((tgt_after <= policy.high + EPS) & (gain >= RELIEF_MIN_GAIN))
    };
    // A source above one core has delay now: its changes may risk the peaks. A preventive one
    // may not give peak safety a reason to move the vCPU back.
    let preventive = load[b] <= CAPACITY + EPS;
    let keeps_peaks = |dp: f64, t: usize, delta: f64| {
        !preventive
            || (preventive_change_keeps_peaks(policy, peak_load[b], peak_load[t], dp)
                && topo::smt_excess_removed(input, load, b, t, delta) >= -EPS)
    };
    // The free vCPUs of `b` with their demands, read once.
    let movers: Vec<(usize, f64)> =
        on[b].iter().copied().filter(|&v| free[v]).map(|v| (v, input.vcpus[v].demand)).collect();
    let mut short = Shortlist::new(policy.about_equal);
    // Moves first.
    for &(v, dv) in &movers {
        for t in 0..load.len() {
            if t == b || settling[t] {
                continue;
            }
            if let Some(gain) = pair_gain(policy, load[b], load[t], dv) {
                let tgt_after = load[t] + dv;
                if admissible(gain, tgt_after)
                    && pays_for_itself(policy, load[b], load[t], dv)
                    && keeps_peaks(input.vcpus[v].peak, t, dv)
                {
                    let same_node = input.cpus[t].node == node_b;
                    short.push(Candidate { v, w: None, target: t, gain, same_node });
                }
            }
        }
    }
    // Swaps, only where one could matter: no change between b and t gains more than half
    // their gap, and a swap within `about_equal` of the best move loses to that move anyway.
    if repins_left >= 2 {
        let best_move = short.best;
        // The free vCPUs of the target with their demands, gathered once per target.
        let mut partners: Vec<(usize, f64)> = Vec::new();
        for t in 0..load.len() {
            if t == b || settling[t] || (load[b] - load[t]) / 2.0 <= best_move + policy.about_equal + EPS {
                continue;
            }
            let same_node = input.cpus[t].node == node_b;
            partners.clear();
            partners.extend(on[t].iter().copied().filter(|&w| free[w]).map(|w| (w, input.vcpus[w].demand)));
            for &(v, dv) in &movers {
                for &(w, dw) in &partners {
                    let delta = dv - dw;
                    // Tested together (`&`): most pairs pass, and a branch per test mispredicts.
                    let gain = pair_gain(policy, load[b], load[t], delta);
                    // A swap that only shifts delay between overloaded cpus is not made.
                    let pays = |g: f64| {
                        (delta > EPS) & admissible(g, load[t] + delta)
                            && pays_for_itself(policy, load[b], load[t], delta)
                            && keeps_peaks(input.vcpus[v].peak - input.vcpus[w].peak, t, delta)
                    };
                    if let Some(gain) = gain.filter(|&g| pays(g)) {
                        short.push(Candidate { v, w: Some(w), target: t, gain, same_node });
                    }
                }
            }
        }
    }
    let Shortlist { cands, best: best_gain, .. } = short;
    // Peaks the target would hold after the change: within the limit first.
    let peak_safe = |c: &Candidate| {
        let back = c.w.map_or(0.0, |w| input.vcpus[w].peak);
        peak_load[c.target] + input.vcpus[c.v].peak - back <= policy.peak_limit + EPS
    };
    // Each candidate's sort key, computed once: (swap, not peak-safe, other node, target on a
    // busy physical core), then the lighter vCPU, the freer target, and the lower indices.
    let keyed = cands.into_iter().filter(|c| c.gain >= best_gain - policy.about_equal - EPS).map(|c| {
        let key = (usize::from(c.w.is_some()), !peak_safe(&c), !c.same_node, topo::on_busy_core(input, load, c.target));
        (key, input.vcpus[c.v].demand, load[c.target], c)
    });
    keyed
        .min_by(|(kx, dx, lx, x), (ky, dy, ly, y)| {
            kx.cmp(ky).then(dx.total_cmp(dy)).then(lx.total_cmp(ly)).then(x.target.cmp(&y.target)).then(x.v.cmp(&y.v))
        })
        .map(|(.., c)| c)
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
mod topo;
pub use topo::CORE_LIMIT;
