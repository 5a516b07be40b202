//! The simulator end to end: the real agent over `SimHost` against the reference policies.
//! Behaviour only, never wall-clock time.

use std::process::Command;

use clap::Parser as _;
use vm_balancer::cli::{Cli, Command as Sub};
use vm_balancer::daemon::{Agent, AgentConfig, StepReport};
use vm_balancer::policy::{Action, PinKind};
use vm_balancer::sim::{self, GuestSpec, Policy, Report, SimConfig, SimHost};

fn run(args: &[&str]) -> Report {
    let mut argv = vec!["vm-balancer", "simulate"];
    argv.extend_from_slice(args);
    let Sub::Simulate { common, sim: sa } = Cli::try_parse_from(argv).unwrap().command else { panic!("not simulate") };
    let (spec, workload) = sim::build(&common, &sa).unwrap();
    sim::run::run_all(&spec, &workload).unwrap()
}

fn spec(args: &[&str]) -> (sim::RunSpec, sim::Workload) {
    let mut argv = vec!["vm-balancer", "simulate"];
    argv.extend_from_slice(args);
    let Sub::Simulate { common, sim: sa } = Cli::try_parse_from(argv).unwrap().command else { panic!("not simulate") };
    sim::build(&common, &sa).unwrap()
}

fn get(r: &Report, p: Policy) -> &sim::PolicyReport {
    r.policies.iter().find(|x| x.name == p.name()).unwrap()
}

#[test]
fn ours_beats_static_on_delay() {
    for scenario in ["steady", "bursty", "mixed"] {
        let r =
            run(&["--scenario", scenario, "--host-cpus", "16", "--guests", "24", "--duration", "20m", "--seed", "3"]);
        let (ours, stat, float) = (get(&r, Policy::Ours), get(&r, Policy::Static), get(&r, Policy::Floating));
        assert!(ours.delay_core_seconds < stat.delay_core_seconds, "{scenario}: {r:#?}");
        assert!(float.delay_core_seconds <= ours.delay_core_seconds + 1e-9, "{scenario}: {r:#?}");
        assert_eq!(ours.host_reserve_violations, 0);
        assert_eq!(stat.repins_per_vcpu_hour, 0.0);
    }
}

#[test]
fn no_policy_has_less_smt_loss_plus_delay_than_the_floor() {
    // Demand near the host's size: the floor is above zero, and each policy sits on or above it,
    // with SMT and without (there the floor is floating's delay: it serves all it can).
    for topology in ["smt", "flat"] {
        let r = run(&[
            "--scenario",
            "mixed",
            "--host-cpus",
            "16",
            "--guests",
            "40",
            "--duration",
            "20m",
            "--seed",
            "2",
            "--topology",
            topology,
        ]);
        let floor = r.policies[0].smt_floor_core_seconds;
        assert!(floor > 0.0, "{r:#?}");
        for p in &r.policies {
            assert_eq!(p.smt_floor_core_seconds, floor, "the workload's, not the policy's");
            let lost = p.smt_lost_core_seconds + p.delay_core_seconds;
            assert!(lost >= floor * (1.0 - 1e-9), "{topology}, {}: {lost} below the floor {floor}", p.name);
        }
        if topology == "flat" {
            let floating = get(&r, Policy::Floating).delay_core_seconds;
            assert!((floating - floor).abs() <= 1e-6 * floor, "{floating} vs {floor}");
        }
    }
}

#[test]
fn fixture_traces_give_finite_figures() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bitbrains-excerpt");
    let r = run(&["--traces", dir, "--host-cpus", "32", "--duration", "30m", "--host-mem", "64GiB"]);
    assert_eq!(r.policies.len(), Policy::ALL.len());
    for p in &r.policies {
        for x in [
            p.busiest_over_bound_mean,
            p.busiest_over_bound_p99,
            p.delay_core_seconds,
            p.repins_per_vcpu_hour,
            p.mem_reclaimed_fraction,
            p.agent_cpu_us_per_quantum,
        ] {
            assert!(x.is_finite() && x >= 0.0, "{p:#?}");
        }
        let ours = p.name == Policy::Ours.name();
        assert_eq!(p.advice_quanta_fraction.is_some(), ours, "the advice is the agent's: {p:#?}");
        assert!(p.advice_quanta_fraction.is_none_or(|f| (0.0..=1.0).contains(&f)), "{p:#?}");
    }
}

#[test]
fn an_overcommitted_host_gets_capacity_advice_and_a_light_one_none() {
    for g in ["cpu", "llc"] {
        let advice = |guests: &str| {
            let r = run(&[
                "--scenario",
                "steady",
                "--host-cpus",
                "8",
                "--guests",
                guests,
                "--duration",
                "1h",
                "--seed",
                "1",
                "--pin-granularity",
                g,
            ]);
            get(&r, Policy::Ours).advice_quanta_fraction.unwrap()
        };
        // Five guests per cpu ask more than --high allows: after the window, a guest is named
        // (at llc granularity too, where the planner's loads are shares of a cache domain).
        let heavy = advice("40");
        assert!(heavy > 0.0, "{g}: {heavy}");
        assert_eq!(advice("8"), 0.0, "{g}: one guest per cpu: nothing to advise");
    }
}

#[test]
fn same_seed_same_report() {
    let a = run(&["--scenario", "liar", "--host-cpus", "8", "--duration", "5m", "--seed", "9"]);
    let b = run(&["--scenario", "liar", "--host-cpus", "8", "--duration", "5m", "--seed", "9"]);
    for (x, y) in a.policies.iter().zip(&b.policies) {
        assert_eq!(x.delay_core_seconds, y.delay_core_seconds);
        assert_eq!(x.starvation_events, y.starvation_events);
        assert_eq!(x.repins_per_vcpu_hour, y.repins_per_vcpu_hour);
    }
}

fn vmb(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vm-balancer")).args(args).output().unwrap()
}

#[test]
fn simulate_bad_flags_exit_2_naming_the_flag() {
    for (args, flag) in [
        (vec!["simulate", "--host-cpus", "0"], "--host-cpus"),
        (vec!["simulate", "--host-cpus", "many"], "--host-cpus"),
        (vec!["simulate", "--duration", "0s"], "--duration"),
        (vec!["simulate", "--host-mem", "12"], "--host-mem"),
        (vec!["simulate", "--guests", "0"], "--guests"),
        (vec!["simulate", "--scenario", "chaos"], "--scenario"),
        (vec!["simulate", "--seed", "x"], "--seed"),
        (vec!["simulate", "--smt-yield", "0.9"], "--smt-yield"),
        (vec!["simulate", "--smt-yield", "2.5"], "--smt-yield"),
        (vec!["simulate", "--remote-penalty=-0.1"], "--remote-penalty"),
        (vec!["simulate", "--remote-penalty", "1"], "--remote-penalty"),
        (vec!["simulate", "--topology", "torus"], "--topology"),
    ] {
        let out = vmb(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(flag), "{args:?} should name {flag}: {err}");
    }
}

#[test]
fn simulate_json_has_every_policy() {
    let out = vmb(&["simulate", "--host-cpus", "8", "--duration", "2m", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = v["policies"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["vm-balancer", "baseline", "static", "floating", "vm-balancer-consolidate"]);
    for key in [
        "busiest_over_bound_mean",
        "busiest_over_bound_p99",
        "delay_core_seconds",
        "smt_lost_core_seconds",
        "remote_core_seconds",
        "remote_lost_core_seconds",
        "repins_per_vcpu_hour",
        "mem_reclaimed_fraction",
        "starvation_events",
        "host_reserve_violations",
        "agent_cpu_us_per_quantum",
        "free_cpus_mean",
    ] {
        assert!(v["policies"][0].get(key).is_some(), "{key}");
    }
}

#[test]
fn missing_trace_dir_is_an_error_not_a_panic() {
    let out = vmb(&["simulate", "--traces", "/nonexistent/traces", "--duration", "1m"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/traces"));
}

#[test]
fn several_seeds_report_the_mean_and_each_seed() {
    let argv = [
        "vm-balancer",
        "simulate",
        "--scenario",
        "bursty",
        "--host-cpus",
        "8",
        "--duration",
        "5m",
        "--seed",
        "4",
        "--seeds",
        "2",
    ];
    let Sub::Simulate { common, sim: sa } = Cli::try_parse_from(argv).unwrap().command else { panic!("not simulate") };
    let out = sim::simulate(&common, &sa).unwrap();
    assert!(out.contains("seeds 4 to 5") && out.contains("delay ours/baseline per seed: 4:"), "{out}");
    let json = sim::simulate(&common, &vm_balancer::cli::SimArgs { json: true, ..sa.clone() }).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for (i, p) in doc["policies"].as_array().unwrap().iter().enumerate() {
        let each: Vec<f64> = runs.iter().map(|r| r["policies"][i]["delay_core_seconds"].as_f64().unwrap()).collect();
        let mean = p["delay_core_seconds"].as_f64().unwrap();
        assert!((mean - (each[0] + each[1]) / 2.0).abs() < 1e-6, "{p}");
    }
}

#[test]
fn grants_on_credit_break_the_reserve_and_tracking_them_does_not() {
    // A host short of memory (24 guests wanting up to ~54 GiB on 40 GiB): the simulated host
    // charges granted memory only when the guest touches it, as a real one does, so a budget
    // read from MemAvailable alone hands out the same memory again before it is paid for.
    for scenario in ["diurnal", "mixed"] {
        let args = [
            "--scenario",
            scenario,
            "--host-cpus",
            "16",
            "--guests",
            "24",
            "--host-mem",
            "40GiB",
            "--duration",
            "1h",
            "--seed",
            "3",
        ];
        let (spec, workload) = spec(&args);
        let tracked = sim::run::run_agent(spec.agent.clone(), &spec, workload.clone()).unwrap();
        let mut on_credit = spec.agent.clone();
        on_credit.mem.as_mut().unwrap().timing.credit_timeout_ns = 0;
        let old = sim::run::run_agent(on_credit, &spec, workload).unwrap();
        assert!(old.host_reserve_violations > 0, "{scenario}: granting on credit should break the reserve: {old:#?}");
        assert_eq!(tracked.host_reserve_violations, 0, "{scenario}: {tracked:#?}");
    }
}

#[test]
fn simulate_plot_draws_every_policy_over_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.svg");
    let out = Command::new(env!("CARGO_BIN_EXE_vm-balancer"))
        .args(["simulate", "--host-cpus", "8", "--duration", "30m", "--seeds", "2", "--json"])
        .env("VM_BALANCER_PLOT", &path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The report itself is unchanged by the picture.
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["policies"][0].get("series").is_none(), "the series stay out of the JSON");
    let svg = std::fs::read_to_string(&path).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{}", &svg[..svg.len().min(200)]);
    for p in Policy::ALL {
        // Named in the legend of each of the four panels.
        assert_eq!(svg.matches(&format!(">\n{}\n<", p.name())).count(), 4, "{} in the legends", p.name());
    }
    assert!(svg.contains("mean of 2 seeds"), "the title says what is drawn");
    // Four panels, a line per policy in each (legend samples are lines too).
    assert!(svg.matches("<polyline").count() >= 16, "{} lines", svg.matches("<polyline").count());
}

#[test]
fn simulate_refuses_a_plot_it_cannot_write_before_running() {
    let out = vmb(&["simulate", "--duration", "30d", "--plot", "/nonexistent/dir/run.svg"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("--plot") && err.contains("/nonexistent/dir/run.svg"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn an_overloaded_host_is_not_churned() {
    // 48 trace guests on 8 cpus: demand exceeds the host most of the time (floating itself
    // waits). A move between two cpus that both stay above one core only shifts delay, so
    // `--delay-margin` refuses it: fewer repins than without the margin, and the delay stays
    // within the 1.05x of floating.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bitbrains-excerpt");
    let args = ["--traces", dir, "--host-cpus", "8", "--guests", "48", "--duration", "1h", "--host-mem", "512GiB"];
    let calm = run(&args);
    let eager = run(&[&args[..], &["--delay-margin", "0"]].concat());
    let (ours, float) = (get(&calm, Policy::Ours), get(&calm, Policy::Floating));
    assert!(float.delay_core_seconds > 0.0, "the host must be overloaded: {calm:#?}");
    assert!(ours.delay_core_seconds <= 1.05 * float.delay_core_seconds, "{calm:#?}");
    let before = get(&eager, Policy::Ours).repins_per_vcpu_hour;
    assert!(ours.repins_per_vcpu_hour < before / 2.0, "{} vs {before} without the margin", ours.repins_per_vcpu_hour);
}

fn json_of(args: &[&str], envs: &[(&str, &str)]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_vm-balancer")).args(args).envs(envs.iter().copied()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn figure(v: &serde_json::Value, policy: &str, key: &str) -> f64 {
    let p = v["policies"].as_array().unwrap().iter().find(|p| p["name"] == policy).unwrap();
    p[key].as_f64().unwrap()
}

#[test]
fn smt_and_numa_costs_follow_their_flags_and_vanish_on_a_flat_host() {
    let base = ["simulate", "--scenario", "steady", "--host-cpus", "16", "--duration", "5m", "--json"];
    let smt = json_of(&base, &[]);
    // The steady scenario asks for about 12 cores of 8 physical ones: some cores must share.
    assert!(figure(&smt, "floating", "smt_lost_core_seconds") > 0.0);
    let full_yield = json_of(&[&base[..], &["--smt-yield", "2"]].concat(), &[]);
    let flat = json_of(&base, &[("VM_BALANCER_TOPOLOGY", "flat")]);
    let no_penalty = json_of(&base, &[("VM_BALANCER_REMOTE_PENALTY", "0"), ("VM_BALANCER_SMT_YIELD", "1.5")]);
    for p in ["vm-balancer", "baseline", "static", "floating"] {
        assert_eq!(figure(&full_yield, p, "smt_lost_core_seconds"), 0.0, "{p}: a core that does 2 cores loses none");
        assert!(figure(&no_penalty, p, "smt_lost_core_seconds") <= figure(&smt, p, "smt_lost_core_seconds"), "{p}");
        assert_eq!(figure(&no_penalty, p, "remote_lost_core_seconds"), 0.0, "{p}");
        for key in ["smt_lost_core_seconds", "remote_core_seconds", "remote_lost_core_seconds"] {
            assert_eq!(figure(&flat, p, key), 0.0, "{p} {key} on a flat host");
        }
        let remote = figure(&smt, p, "remote_core_seconds");
        let lost = figure(&smt, p, "remote_lost_core_seconds");
        let penalty = vm_balancer::sim::host::topo::DEFAULT_REMOTE_PENALTY;
        assert!((lost - remote * penalty).abs() <= 1e-6 * remote.max(1.0), "{p}: {lost} vs {remote}");
    }
}

// Consolidation (`--consolidate`) over the simulated host, with the real agent.

const Q: std::time::Duration = std::time::Duration::from_secs(2);

/// An agent over an 8-cpu simulated host (2 sockets of 2 cores of 2 threads) holding 8
/// one-vCPU guests of the given demand, configured by `run` flags.
fn sim_agent(flags: &[&str], demand: f64) -> Agent<SimHost> {
    let mut argv = vec!["vm-balancer", "run", "--no-memory"];
    argv.extend_from_slice(flags);
    let Sub::Run { common, .. } = Cli::try_parse_from(argv).unwrap().command else { panic!("not run") };
    let guests: Vec<GuestSpec> =
        (0..8).map(|i| GuestSpec { name: format!("g{i}"), vcpus: 1, max_kib: 1 << 20, liar: false }).collect();
    let mut host = SimHost::new(SimConfig::new(8, 16 << 20, 1 << 20), &guests).unwrap();
    for g in 0..guests.len() {
        host.set_demand(g, 0, demand);
    }
    Agent::new(host, AgentConfig::from_flags(&common, false))
}

/// Runs `quanta` quanta; per quantum, the kinds of the pins applied and the last report.
fn steps(a: &mut Agent<SimHost>, quanta: usize) -> (Vec<Vec<PinKind>>, StepReport) {
    let mut kinds = Vec::new();
    let mut last = StepReport::default();
    for _ in 0..quanta {
        a.host.advance(u64::try_from(Q.as_nanos()).unwrap());
        last = a.step();
        kinds.push(
            last.plan
                .iter()
                .zip(&last.was_applied)
                .filter(|(_, applied)| **applied)
                .filter_map(|(act, _)| match act {
                    Action::Pin { kind, .. } => Some(*kind),
                    Action::Balloon { .. } | Action::PinThread { .. } => None,
                })
                .collect(),
        );
    }
    (kinds, last)
}

#[test]
fn consolidation_packs_a_steady_low_load_then_stops_moving_and_frees_whole_cores() {
    let mut plain = sim_agent(&[], 0.05);
    let (_, spread) = steps(&mut plain, 300);
    let mut a = sim_agent(&["--consolidate"], 0.05);
    let (kinds, last) = steps(&mut a, 300);
    let moved: Vec<usize> = (0..kinds.len()).filter(|&q| !kinds[q].is_empty()).collect();
    let consolidations = kinds.iter().flatten().filter(|k| **k == PinKind::Consolidate).count();
    assert!(consolidations > 0, "{kinds:?}");
    // Converged in the first half; the second half moves nothing (no ping-pong with the
    // balancer, whose kinds would show here too).
    assert!(moved.iter().all(|&q| q < kinds.len() / 2), "moves at quanta {moved:?}: {kinds:?}");
    assert!(last.free_cpus.len() > spread.free_cpus.len(), "{:?} vs {:?}", last.free_cpus, spread.free_cpus);
    // Whole cores: each free cpu's SMT sibling is free too.
    let topo = vm_balancer::sim::host::topology(8);
    for c in &last.free_cpus {
        assert!(topo.siblings(*c).iter().all(|s| last.free_cpus.contains(s)), "{c}: {:?}", last.free_cpus);
    }
    // Every cpu stays under --high.
    let high = a.config().cpu.as_ref().unwrap().high;
    assert!(last.cpu_loads.iter().all(|&l| l <= high), "{:?}", last.cpu_loads);
}

#[test]
fn the_balancer_unpacks_consolidated_vcpus_when_demand_rises_and_it_stays_unpacked() {
    let mut a = sim_agent(&["--consolidate"], 0.05);
    let (_, packed) = steps(&mut a, 200);
    assert!(!packed.free_cpus.is_empty(), "packed first");
    let high = a.config().cpu.as_ref().unwrap().high;
    // Each vCPU now wants more than --high leaves for two on one cpu.
    let busy = high * 0.8;
    for g in 0..8 {
        a.host.set_demand(g, 0, busy);
    }
    let (kinds, last) = steps(&mut a, 300);
    assert!(kinds.iter().flatten().any(|k| matches!(k, PinKind::Move | PinKind::Swap)), "{kinds:?}");
    assert!(!kinds.iter().flatten().any(|k| *k == PinKind::Consolidate), "busy vCPUs are never packed: {kinds:?}");
    let moved: Vec<usize> = (0..kinds.len()).filter(|&q| !kinds[q].is_empty()).collect();
    assert!(moved.iter().all(|&q| q < kinds.len() / 2), "still moving at {moved:?}");
    assert!(last.cpu_loads.iter().all(|&l| l <= high), "unpacked: {:?}", last.cpu_loads);
    assert!(last.free_cpus.is_empty(), "every cpu holds one busy vCPU: {:?}", last.free_cpus);
}

#[test]
fn the_simulator_reports_the_cpus_consolidation_frees() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bitbrains-excerpt");
    let r = run(&["--traces", dir, "--host-cpus", "32", "--guests", "8", "--duration", "30m"]);
    let (ours, cons, float) = (get(&r, Policy::Ours), get(&r, Policy::Consolidate), get(&r, Policy::Floating));
    assert!(cons.free_cpus_mean > ours.free_cpus_mean, "{r:#?}");
    assert_eq!(float.free_cpus_mean, 0.0, "floating vCPUs cover every cpu");
    assert!(cons.delay_core_seconds.is_finite() && cons.delay_core_seconds >= 0.0);
    let table = sim::run::render_table(&r);
    assert!(table.contains("free cpus mean") && table.contains("consolidation: "), "{table}");
}

#[test]
fn at_core_and_llc_granularity_vcpus_are_pinned_to_groups_and_balanced_over_them() {
    // 8 simulated cpus: 2 sockets (LLCs) of 2 cores of 2 threads, cpu i and i+4 one core.
    for (g, groups) in [
        ("core", vec![vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]]),
        ("llc", vec![vec![0, 1, 4, 5], vec![2, 3, 6, 7]]),
    ] {
        let mut a = sim_agent(&["--pin-granularity", g], 0.6);
        let (kinds, _) = steps(&mut a, 30);
        assert_eq!(kinds.iter().flatten().filter(|k| **k == PinKind::Placement).count(), 8, "{g}: {kinds:?}");
        let mut count = vec![0; groups.len()];
        for guest in 0..8 {
            let set = a.host.affinity(guest, 0).unwrap();
            let k = groups.iter().position(|x| *x == set.0).unwrap_or_else(|| panic!("{g}: pinned to {set}"));
            count[k] += 1;
        }
        // 4.8 cores of demand: the same share on each group.
        let even = 8 / groups.len();
        assert_eq!(count, vec![even; groups.len()], "{g}");
        let later = steps(&mut a, 30).0;
        assert!(later.iter().all(Vec::is_empty), "{g}: a steady load is not churned: {later:?}");
    }
}

#[test]
fn compare_granularities_adds_the_agent_at_core_and_llc() {
    let args = ["--scenario", "mixed", "--host-cpus", "16", "--guests", "24", "--duration", "10m"];
    let plain = run(&args);
    assert!(plain.policies.iter().all(|p| !p.name.starts_with("vm-balancer-core")), "only when asked");
    let r = run(&[&args[..], &["--compare-granularities"]].concat());
    let names: Vec<&str> = r.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(&names[Policy::ALL.len()..], ["vm-balancer-core", "vm-balancer-llc"]);
    let ours = get(&r, Policy::Ours);
    let same = |p: &sim::PolicyReport| (p.delay_core_seconds, p.repins_per_vcpu_hour, p.remote_core_seconds);
    assert_eq!(same(ours), same(get(&plain, Policy::Ours)), "the other columns run as before");
    let vcpus = spec(&args).1.specs().iter().map(|g| u64::from(g.vcpus)).sum::<u64>();
    for p in [Policy::OursCore, Policy::OursLlc] {
        let g = get(&r, p);
        assert!(g.placements >= vcpus, "{}: every vCPU placed: {} of {vcpus}", g.name, g.placements);
    }
}
