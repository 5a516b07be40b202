//! The memory step of a quantum with balloon statistics: the memory planner's input from the
//! snapshot and the agent's memory history, its plan, and what the loop keeps out of it
//! (changes that keep failing, changes planned on a quiet guest's carried reading), and which
//! guests' readings may be carried forward next time. Kept apart from `daemon.rs` for size.

use std::collections::HashSet;

use log::info;

use super::Agent;
use crate::failures::Kind;
use crate::host::Host;
use crate::model::Snapshot;
use crate::policy::mem::{self, MemPlan, State};

impl<H: Host> Agent<H> {
    /// The memory plan of this quantum; `None` with the memory balancer off.
    pub(super) fn plan_memory(&mut self, snap: &Snapshot) -> Option<MemPlan> {
        let m = self.cfg.mem.as_ref()?;
        let (guests, host) = self.mem.input(snap, &m.timing);
        // A balloon above the maximum the agent knows: its definition is read again.
        let stale = self.mem.needs_rediscovery();
        if !stale.is_empty() {
            info!("balloon above its known maximum: reading the definition of {} again", stale.join(", "));
            self.collector.rediscover(&stale);
        }
        let mut mp = mem::plan(&guests, &host, &m.policy);
        // Kept out of the plan, the verdict saying why: a balloon change that keeps failing, and
        // any change on a quiet guest's carried reading (read first, next interval: its verdict
        // is no longer steady).
        let carried = |name: &str| {
            let d = snap.domains.iter().find(|d| d.dom.name == name)?;
            d.balloon.as_ref().and_then(|(b, _)| b.carried_for_s)
        };
        let MemPlan { actions, verdicts } = &mut mp;
        actions.retain(|a| {
            let held = match self.failures.blocked(a.domain(), &Kind::Balloon, snap.t_ns) {
                Some(why) => format!("not applied: the balloon change keeps failing ({why})"),
                None => match carried(a.domain()) {
                    Some(age) => format!("waits for fresh statistics (these were read {age}s ago)"),
                    None => return true,
                },
            };
            if let Some(v) = verdicts.iter_mut().find(|v| v.name == a.domain()) {
                v.state = State::Hold;
                v.why = format!("{}; {held}", v.why);
            }
            false
        });
        // Only a guest left steady, with a margin above starving, not about to be changed
        // again once its cooldown ends, and not holding a grant the host has not paid for
        // yet, may have its reading carried forward while it is quiet; none while the host
        // is short of memory (every guest may be asked to give some back).
        self.mem_steady = if mem::host_pressure(&host, &m.policy) {
            HashSet::new()
        } else {
            mp.verdicts
                .iter()
                .filter(|v| v.state == State::Steady)
                .filter_map(|v| guests.iter().find(|g| g.name == v.name))
                .filter(|g| !g.cooling && mem::comfortable(g, &m.policy) && !self.mem.on_credit(&g.name))
                .map(|g| g.name.clone())
                .collect()
        };
        self.advisor.memory_plan(&mp.verdicts);
        Some(mp)
    }
}
