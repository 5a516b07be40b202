//! The cpus under a running agent, over the fake host: cpus a cgroup cpuset refuses (to every
//! guest, or to one), and a domain described before its vCPU threads exist.

use crate::daemon::StepReport;
use crate::daemon::tests::{agent, piled, run};
use crate::host::Host;
use crate::sim::faulty::Faulty;

#[test]
fn a_cpu_every_guest_refuses_is_left_out_and_no_vcpu_is_blocked() {
    // cpus 1 and 2 refused to every guest (machine.slice AllowedCPUs=0,3): pins there fail
    // with EINVAL.
    let mut h = Faulty::new(4, &[("web", 2), ("db", 2)]);
    let doms = h.sim.list_domains().unwrap();
    for (g, d) in doms.iter().enumerate() {
        for v in 0..2 {
            h.sim.pin_vcpu(d, v, 0).unwrap();
            h.sim.set_demand(g, v as usize, 0.45);
        }
    }
    h.refused_cpus = vec![1, 2];
    let mut a = agent(h);
    let reports = run(&mut a, 80);
    let last = reports.last().unwrap();
    // No other guest runs there: the cpu is refused to all, not to one guest's own cpuset.
    assert!(last.blocked.is_empty(), "the cpu was refused, not the vCPUs: {:?}", last.blocked);
    let snap = last.snapshot.as_ref().unwrap();
    assert_eq!(snap.host.cpus, vec![0, 3], "the refused cpus are left out");
    let on: Vec<u32> = (0..2)
        .flat_map(|g| (0..2).map(move |v| (g, v)))
        .filter_map(|(g, v)| a.host.sim.affinity(g, v)?.as_single())
        .collect();
    assert_eq!(on.iter().filter(|&&c| c == 3).count(), 2, "half the load went to cpu 3: {on:?}");
    let onto_refused = |rs: &[StepReport]| {
        rs.iter()
            .flat_map(|r| &r.plan)
            .filter(|p| matches!(p, crate::policy::Action::Pin { to, .. } if to.0 == [1] || to.0 == [2]))
            .count()
    };
    assert!((1..=4).contains(&onto_refused(&reports)), "{} pins planned onto refused cpus", onto_refused(&reports));
    // Its time up, each refused cpu is tried again (and left out again when refused).
    a.host.sim.advance(crate::failures::REFUSED_CPU_NS);
    let r = run(&mut a, 10);
    assert!(r.iter().any(|r| r.snapshot.as_ref().is_some_and(|s| s.host.cpus.len() > 2)), "tried again");
    assert!(r.iter().all(|r| r.blocked.is_empty()), "{:?}", r.last().unwrap().blocked);
}

#[test]
fn a_cpu_one_guest_refuses_stays_for_the_others() {
    // Only web's cgroup cpuset leaves cpu 2 out; db runs pinned there, busy keeps cpu 1 busy:
    // web's pile-up on cpu 0 is sent to cpu 2 and refused; db's vCPU there shows cpu 2 usable.
    let mut h = Faulty::new(3, &[("web", 2), ("db", 1), ("busy", 1)]);
    let doms = h.sim.list_domains().unwrap();
    for v in 0..2 {
        h.sim.pin_vcpu(&doms[0], v, 0).unwrap();
        h.sim.set_demand(0, v as usize, 0.6);
    }
    h.sim.pin_vcpu(&doms[1], 0, 2).unwrap();
    h.sim.set_demand(1, 0, 0.3);
    h.sim.pin_vcpu(&doms[2], 0, 1).unwrap();
    h.sim.set_demand(2, 0, 0.7);
    h.refused_cpus = vec![2];
    h.refused_for = Some("web".into());
    let mut a = agent(h);
    let reports = run(&mut a, 40);
    let sent = |p: &crate::policy::Action| matches!(p, crate::policy::Action::Pin { domain, to, .. } if domain == "web" && to.0 == [2]);
    assert!(reports.iter().flat_map(|r| &r.plan).any(sent), "web was sent to cpu 2");
    let last = reports.last().unwrap();
    assert!(
        reports.iter().all(|r| r.snapshot.as_ref().is_none_or(|s| s.host.cpus == [0, 1, 2])),
        "cpu 2 stays for the others"
    );
    assert!(!last.blocked.is_empty() && last.blocked.iter().all(|(d, ..)| d == "web"), "{:?}", last.blocked);
}

#[test]
fn a_domain_listed_while_its_qemu_starts_is_described_again_until_its_vcpus_are_found() {
    let mut h = piled();
    h.events = Some(vec![]); // with events, definitions are otherwise re-read every 300 quanta
    h.threads_hidden = vec!["web".into()];
    let mut a = agent(h);
    let reports = run(&mut a, 3);
    assert!(reports.iter().all(|r| r.plan.is_empty()), "nothing known of its vCPUs yet");
    a.host.threads_hidden.clear();
    let reports = run(&mut a, 12);
    let spread = reports.iter().flat_map(|r| &r.plan).any(|p| matches!(p, crate::policy::Action::Pin { .. }));
    assert!(spread, "its vCPUs were found and the pile-up spread: {:?}", reports.last().map(|r| &r.plan));
    // Described again in place: never out of a sample (which would cost it its history).
    let listed = |r: &StepReport| r.snapshot.as_ref().is_none_or(|s| s.domains.iter().any(|d| d.dom.name == "web"));
    assert!(reports.iter().all(listed));
}
