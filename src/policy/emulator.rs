//! Where QEMU's emulator thread and I/O threads run.
//!
//! A guest is more than its vCPUs: QEMU's main ("emulator") thread emulates devices and runs
//! timers and the monitor, and I/O threads (`<iothreads>`) serve virtio queues. libvirt lets
//! them float over every host cpu, so a guest's device work lands wherever the scheduler finds
//! room, on cpus the balancer has given to other guests' vCPUs among them, and takes time from
//! those vCPUs. So after the vCPU plan of each quantum:
//!
//! - by default (`--emulator-cpus vcpus`) a guest's emulator and I/O threads are pinned to the
//!   cpus its vCPUs are pinned to *as the plan leaves them* (the union): its device work then
//!   competes with its own vCPUs only, and follows them when they move;
//! - with `--emulator-cpus LIST`, to that housekeeping set, the same for every guest;
//! - with `--emulator-cpus off`, they are left alone.
//!
//! A guest the CPU balancer leaves alone (`--exclude`, an opt-out) is left alone here too, and
//! so is a thread someone else pinned: one the agent did not pin, whose live definition pins it
//! (`<emulatorpin>`, `<iothreadpin>`: libvirt writes them only when someone pins the thread)
//! to a set that does not cover every host cpu (the rule [`cpu::chosen_set`] applies to
//! vCPUs). Unlike a vCPU's, the thread's default affinity is no help here: the emulator *is*
//! QEMU's main thread, whose affinity is the default. A thread already on its set is not
//! touched: the set only changes when the guest's vCPUs move, so a steady host costs no calls.
//!
//! Pure: [`input_from`] turns a snapshot, the quantum's plan and what the agent has set into
//! plain data; [`plan`] decides.

use std::collections::HashMap;

use crate::host::{CpuSet, QemuThread};
use crate::model::Snapshot;
use crate::policy::{Action, cpu};

/// Where the emulator and I/O threads go (`--emulator-cpus`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum EmulatorCpus {
    /// With the guest's vCPUs: the union of their pins.
    #[default]
    Vcpus,
    /// To this housekeeping set, for every guest.
    Set(CpuSet),
    /// Left alone.
    Off,
}

impl std::fmt::Display for EmulatorCpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EmulatorCpus::Vcpus => f.write_str("vcpus"),
            EmulatorCpus::Set(s) => write!(f, "{s}"),
            EmulatorCpus::Off => f.write_str("off"),
        }
    }
}

/// One QEMU thread of a guest now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadNow {
    pub thread: QemuThread,
    /// Its affinity: its pin, or every host cpu when it has none.
    pub current: CpuSet,
    /// Its live definition pins it (or the agent did, since): someone chose `current`.
    pub pinned: bool,
    /// The agent pinned it (this run, or a recorded earlier one): it is the agent's to move.
    pub ours: bool,
}

/// One guest's QEMU threads, and where its vCPUs are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestThreads {
    pub domain: String,
    /// The CPU balancer leaves the guest alone (`--exclude`, an opt-out).
    pub excluded: bool,
    /// The union of its vCPUs' pins as this quantum's plan leaves them; empty when unknown.
    pub vcpu_cpus: CpuSet,
    pub threads: Vec<ThreadNow>,
}

/// The planner's whole input.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ThreadsInput {
    /// Every online host cpu: a thread pinned to all of them floats.
    pub host_cpus: Vec<u32>,
    pub guests: Vec<GuestThreads>,
}

/// What the agent has pinned this run: domain name → (its runtime id, thread → set). The live
/// definition in a snapshot may be older than the agent's last pin; this is not.
pub type ThreadsSet = HashMap<String, (u32, HashMap<QemuThread, CpuSet>)>;

/// The planner's input from a snapshot, the vCPU pins of this quantum's `plan`, and what the
/// agent has pinned (`set`).
pub fn input_from(snap: &Snapshot, plan: &[Action], set: &ThreadsSet) -> ThreadsInput {
    let mut host_cpus: Vec<u32> = snap.host.topology.cpus.iter().map(|c| c.cpu).collect();
    if host_cpus.is_empty() {
        host_cpus.clone_from(&snap.host.cpus);
    }
    let all = CpuSet(host_cpus.clone());
    let guests = snap
        .domains
        .iter()
        .map(|d| {
            let mut cpus: Vec<u32> = Vec::new();
            for v in &d.vcpus {
                let planned = plan.iter().rev().find_map(|a| match a {
                    Action::Pin { domain, vcpu, to, .. } if domain == &d.dom.name && *vcpu == v.id => Some(to),
                    _ => None,
                });
                cpus.extend(&planned.unwrap_or(&v.pinned_to).0);
            }
            cpus.sort_unstable();
            cpus.dedup();
            let mine = set.get(&d.dom.name).filter(|(id, _)| *id == d.dom.id).map(|(_, m)| m);
            let threads = d
                .desc
                .threads
                .iter()
                .map(|t| {
                    let by_agent = mine.and_then(|m| m.get(&t.thread));
                    let pin = by_agent.or(t.pinned_to.as_ref());
                    ThreadNow {
                        thread: t.thread,
                        current: pin.unwrap_or(&all).clone(),
                        pinned: pin.is_some(),
                        ours: by_agent.is_some() || t.recorded,
                    }
                })
                .collect();
            GuestThreads {
                domain: d.dom.name.clone(),
                excluded: d.cpu_excluded.is_some(),
                vcpu_cpus: CpuSet(cpus),
                threads,
            }
        })
        .collect();
    ThreadsInput { host_cpus, guests }
}

/// The thread pins that put each guest's emulator and I/O threads where `mode` says.
pub fn plan(input: &ThreadsInput, mode: &EmulatorCpus) -> Vec<Action> {
    let mut out = Vec::new();
    // A housekeeping cpu taken offline: its online part, until it is back.
    let housekeeping = match mode {
        EmulatorCpus::Set(s) => CpuSet(s.0.iter().copied().filter(|c| input.host_cpus.contains(c)).collect()),
        _ => CpuSet(Vec::new()),
    };
    for g in input.guests.iter().filter(|g| !g.excluded) {
        let (to, reason) = match mode {
            EmulatorCpus::Off => return out,
            EmulatorCpus::Set(_) if housekeeping.0.is_empty() => return out,
            EmulatorCpus::Set(s) if housekeeping != *s => {
                (&housekeeping, format!("the housekeeping cpus (--emulator-cpus {s}, those online)"))
            }
            EmulatorCpus::Set(_) => (&housekeeping, "the housekeeping cpus (--emulator-cpus)".to_string()),
            EmulatorCpus::Vcpus if g.vcpu_cpus.0.is_empty() => continue,
            EmulatorCpus::Vcpus => (&g.vcpu_cpus, format!("with its vCPUs (on {})", g.vcpu_cpus)),
        };
        for t in &g.threads {
            let operators = !t.ours && t.pinned && cpu::chosen_set(&t.current, &input.host_cpus, None);
            if operators || &t.current == to {
                continue;
            }
            out.push(Action::PinThread {
                domain: g.domain.clone(),
                thread: t.thread,
                from: t.current.clone(),
                to: to.clone(),
                reason: reason.clone(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u32]) -> CpuSet {
        CpuSet(v.to_vec())
    }

    /// The emulator on `current`: pinned there unless that is every cpu of the 4-cpu host.
    fn emulator(current: &[u32], ours: bool) -> ThreadNow {
        ThreadNow { thread: QemuThread::Emulator, current: set(current), pinned: current.len() < 4 || ours, ours }
    }

    fn guest(vcpu_cpus: &[u32], threads: Vec<ThreadNow>) -> GuestThreads {
        GuestThreads { domain: "web".into(), excluded: false, vcpu_cpus: set(vcpu_cpus), threads }
    }

    fn input(guests: Vec<GuestThreads>) -> ThreadsInput {
        ThreadsInput { host_cpus: vec![0, 1, 2, 3], guests }
    }

    /// (thread, to) of each pin of the plan.
    fn pins(plan: &[Action]) -> Vec<(QemuThread, CpuSet)> {
        plan.iter()
            .map(|a| match a {
                Action::PinThread { thread, to, .. } => (*thread, to.clone()),
                other => panic!("not a thread pin: {other}"),
            })
            .collect()
    }

    #[test]
    fn by_default_the_threads_go_where_the_guests_vcpus_are() {
        let io = ThreadNow { thread: QemuThread::IoThread(1), current: set(&[0, 1, 2, 3]), pinned: false, ours: false };
        let i = input(vec![guest(&[1, 3], vec![emulator(&[0, 1, 2, 3], false), io])]);
        let p = plan(&i, &EmulatorCpus::Vcpus);
        assert_eq!(pins(&p), vec![(QemuThread::Emulator, set(&[1, 3])), (QemuThread::IoThread(1), set(&[1, 3]))]);
        assert!(p[0].to_string().contains("pin emulator of web 0-3 -> 1,3: with its vCPUs"), "{}", p[0]);
        // Already there: nothing to do.
        let i = input(vec![guest(&[1, 3], vec![emulator(&[1, 3], true)])]);
        assert!(plan(&i, &EmulatorCpus::Vcpus).is_empty());
        // vCPUs not known (no threads found): nothing to follow.
        let i = input(vec![guest(&[], vec![emulator(&[0, 1, 2, 3], false)])]);
        assert!(plan(&i, &EmulatorCpus::Vcpus).is_empty());
    }

    #[test]
    fn a_housekeeping_set_takes_every_guests_threads() {
        let mut other = guest(&[2], vec![emulator(&[0], true)]);
        other.domain = "db".into();
        let i = input(vec![guest(&[1, 3], vec![emulator(&[0, 1, 2, 3], false)]), other]);
        let p = plan(&i, &EmulatorCpus::Set(set(&[0])));
        assert_eq!(pins(&p), vec![(QemuThread::Emulator, set(&[0]))], "db's is already on 0");
        assert_eq!(p[0].domain(), "web");
        assert!(p[0].to_string().contains("--emulator-cpus"), "{}", p[0]);
    }

    #[test]
    fn a_housekeeping_cpu_taken_offline_leaves_the_online_part() {
        // Host cpus 0-3 online; the set names 0 and 5 (5 offline): the threads go to 0.
        let i = input(vec![guest(&[1, 3], vec![emulator(&[0, 1, 2, 3], false)])]);
        let p = plan(&i, &EmulatorCpus::Set(set(&[0, 5])));
        assert_eq!(pins(&p), vec![(QemuThread::Emulator, set(&[0]))]);
        assert!(p[0].to_string().contains("(--emulator-cpus 0,5, those online)"), "{}", p[0]);
        // None of it online: the threads stay where they are.
        assert!(plan(&i, &EmulatorCpus::Set(set(&[5]))).is_empty());
    }

    #[test]
    fn a_thread_pin_in_json_reads_as_the_readme_says() {
        let a = |thread| Action::PinThread {
            domain: "web".into(),
            thread,
            from: set(&[0, 1]),
            to: set(&[1]),
            reason: "r".into(),
        };
        let j = serde_json::to_value(a(QemuThread::Emulator)).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"action": "pin_thread", "domain": "web", "thread": "emulator", "from": [0, 1], "to": [1], "reason": "r"})
        );
        let j = serde_json::to_value(a(QemuThread::IoThread(2))).unwrap();
        assert_eq!(j["thread"], serde_json::json!({"iothread": 2}));
    }

    #[test]
    fn off_leaves_every_thread_alone() {
        let i = input(vec![guest(&[1], vec![emulator(&[0, 1, 2, 3], false)])]);
        assert!(plan(&i, &EmulatorCpus::Off).is_empty());
    }

    #[test]
    fn an_operators_pin_and_an_excluded_guest_are_left_alone() {
        // Pinned to 2 by someone else: not all cpus, not the default, not the agent's.
        let i = input(vec![guest(&[1], vec![emulator(&[2], false)])]);
        assert!(plan(&i, &EmulatorCpus::Vcpus).is_empty());
        assert!(plan(&i, &EmulatorCpus::Set(set(&[0]))).is_empty());
        // The same pin set by the agent is the agent's to move.
        let i = input(vec![guest(&[1], vec![emulator(&[2], true)])]);
        assert_eq!(pins(&plan(&i, &EmulatorCpus::Vcpus)), vec![(QemuThread::Emulator, set(&[1]))]);
        // A pin over every cpu (a pin given back, `virsh emulatorpin web 0-3`) floats.
        let i = input(vec![guest(&[1], vec![ThreadNow { pinned: true, ..emulator(&[0, 1, 2, 3], false) }])]);
        assert_eq!(pins(&plan(&i, &EmulatorCpus::Vcpus)), vec![(QemuThread::Emulator, set(&[1]))]);
        // Not pinned in the definition: it floats, whatever its affinity says.
        let i = input(vec![guest(&[1], vec![ThreadNow { pinned: false, ..emulator(&[0, 1], false) }])]);
        assert_eq!(pins(&plan(&i, &EmulatorCpus::Vcpus)), vec![(QemuThread::Emulator, set(&[1]))]);
        let mut g = guest(&[1], vec![emulator(&[0, 1, 2, 3], false)]);
        g.excluded = true;
        assert!(plan(&input(vec![g]), &EmulatorCpus::Vcpus).is_empty());
    }

    #[test]
    fn the_threads_follow_the_vcpus_through_the_plan() {
        use crate::host::{DomainDesc, DomainRef, ThreadDesc, Topology};
        use crate::model::{DomainView, HostView, VcpuView};
        let dom = DomainRef { name: "web".into(), uuid: "u".into(), id: 7 };
        let vcpu = |id, pinned: &[u32]| VcpuView { id, pcpu: None, pinned_to: set(pinned), rates: None, wait_ns: 0 };
        let desc = DomainDesc {
            vcpu_tids: vec![Some(1), Some(2)],
            vcpu_count: 2,
            pid: Some(1),
            max_kib: 1,
            // Described before the agent's last pin: the live definition still says 0-3.
            threads: vec![ThreadDesc { thread: QemuThread::Emulator, pinned_to: None, recorded: false }],
            ..DomainDesc::bare(dom.clone())
        };
        let snap = Snapshot {
            t_ns: 0,
            epoch_s: 0,
            quantum: 0,
            host: HostView {
                cpus: vec![0, 1, 2, 3],
                topology: Topology::flat(4),
                cpu_busy: vec![0.0; 4],
                mem_total_kib: 0,
                mem_available_kib: 0,
                mem_pressure_some_avg10: None,
            },
            domains: vec![DomainView {
                dom: dom.clone(),
                desc,
                cpu_excluded: None,
                mem_excluded: None,
                vcpus: vec![vcpu(0, &[0]), vcpu(1, &[0])],
                balloon: None,
            }],
        };
        // The agent pinned the emulator to 0 when both vCPUs were there.
        let mut by_agent: ThreadsSet = HashMap::new();
        by_agent.insert("web".into(), (7, HashMap::from([(QemuThread::Emulator, set(&[0]))])));
        let i = input_from(&snap, &[], &by_agent);
        assert_eq!(i.guests[0].threads, vec![emulator(&[0], true)], "what the agent set, not the stale definition");
        assert!(plan(&i, &EmulatorCpus::Vcpus).is_empty(), "steady: no call");
        // This quantum's plan moves vCPU 1 to cpu 2: the emulator follows at once.
        let kind = crate::policy::PinKind::Move;
        let mv =
            Action::Pin { domain: "web".into(), vcpu: 1, from: set(&[0]), to: set(&[2]), kind, reason: "r".into() };
        let i = input_from(&snap, std::slice::from_ref(&mv), &by_agent);
        assert_eq!(i.guests[0].vcpu_cpus, set(&[0, 2]));
        let p = plan(&i, &EmulatorCpus::Vcpus);
        assert_eq!(p.len(), 1);
        assert!(p[0].to_string().starts_with("pin emulator of web 0 -> 0,2"), "{}", p[0]);
        // What the agent set on an earlier run of the domain (another runtime id) does not count.
        by_agent.insert("web".into(), (6, HashMap::from([(QemuThread::Emulator, set(&[0]))])));
        let i = input_from(&snap, &[], &by_agent);
        assert_eq!(i.guests[0].threads, vec![emulator(&[0, 1, 2, 3], false)]);
    }
}
