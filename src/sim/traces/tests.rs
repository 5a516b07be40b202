use super::*;

/// Fixture directory (shared with the integration tests).
const FIXTURE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bitbrains-excerpt");

/// Full 25-VM subset; the test using it is skipped when it is absent.
const FULL_TRACE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/traces/bitbrains-rnd/2013-7");

const HEADER: &str = "Timestamp [ms];\tCPU cores;\tCPU capacity provisioned [MHZ];\tCPU usage [MHZ];\tCPU usage [%];\tMemory capacity provisioned [KB];\tMemory usage [KB];\tDisk read throughput [KB/s];\tDisk write throughput [KB/s];\tNetwork received throughput [KB/s];\tNetwork transmitted throughput [KB/s]";

fn fixture(name: &str) -> TraceVm {
    let path = Path::new(FIXTURE_DIR).join(format!("{name}.csv"));
    match load_trace_file(&path) {
        Ok(vm) => vm,
        Err(err) => panic!("fixture {}: {err}", path.display()),
    }
}

/// A data row: ts; cores; capacity MHz; usage MHz; usage %; mem cap KiB; mem usage KiB; 4 zeros.
fn row(t_s: u64, cores: u32, cap_mhz: f64, usage_mhz: f64, mem_cap: f64, mem_used: f64) -> String {
    format!("{t_s};\t{cores};\t{cap_mhz};\t{usage_mhz};\t0.0;\t{mem_cap};\t{mem_used};\t0.0;\t0.0;\t0.0;\t0.0")
}

fn parse(text: &str) -> Result<TraceVm, TraceError> {
    parse_trace("t", text, Path::new("t.csv"))
}

fn assert_sorted_unique(vm: &TraceVm) {
    assert!(vm.samples.windows(2).all(|w| w[0].t_s < w[1].t_s), "{}: samples not strictly increasing", vm.name);
}

#[test]
fn e_notation_parses() {
    // 25.csv writes the memory capacity as 1.0483712E7.
    let vm = fixture("25");
    assert_eq!(vm.name, "25");
    assert_eq!(vm.vcpus, 32);
    assert_eq!(vm.mem_capacity_kib, 10_483_712);
    assert_eq!(vm.samples.len(), 120);
    assert_eq!(vm.start_s(), Some(1_372_629_804));
    assert_eq!(vm.end_s(), Some(1_372_666_108));
    assert_sorted_unique(&vm);

    let text = format!("{HEADER}\n{}\n", row(100, 4, 1.1703996664E4, 4.954691921093334E2, 1.6703488E7, 1.0513712E6));
    let vm = parse(&text).expect("E-notation row");
    assert_eq!(vm.mem_capacity_kib, 16_703_488);
    assert_eq!(vm.samples[0].mem_active_kib, Some(1_051_371));
    // Whole-number columns written as integral floats are accepted too.
    let text = format!("{HEADER}\n1.0E2;\t4.0;\t8.0E3;\t2.0E3;\t25.0;\t1.0E3;\t5.0E2;\t0;\t0;\t0;\t0\n");
    let vm = parse(&text).expect("integral floats");
    assert_eq!((vm.samples[0].t_s, vm.vcpus), (100, 4));
    assert!((vm.samples[0].cpu_demand_cores - 1.0).abs() < 1e-12);
}

#[test]
fn vanished_vm_rows_dropped_and_duplicates_collapsed() {
    // Fixture: 20 live rows, then 40 rows with CPU cores == 0 on 18 distinct timestamps.
    let vm = fixture("20");
    assert_eq!(vm.samples.len(), 20);
    assert_eq!(vm.vcpus, 1);
    assert_eq!(vm.mem_capacity_kib, 4_194_304);
    assert_eq!(vm.start_s(), Some(1_373_969_436));
    assert_eq!(vm.end_s(), Some(1_373_975_137)); // 2013-07-16T11:45:37Z
    assert_sorted_unique(&vm);
    // After the VM vanished there is no data, only a short validity tail of the last sample.
    assert_eq!(vm.at(1_373_975_137 + 299, 600).map(|s| s.t_s), Some(1_373_975_137));
    assert!(vm.at(1_373_975_137 + 600, 600).is_none());
    assert!(vm.at(1_375_000_000, 600).is_none());

    // Duplicated and out-of-order live timestamps: sorted, first row in file order kept.
    let text = [
        HEADER.to_owned(),
        row(600, 2, 4000.0, 1000.0, 2048.0, 100.0),
        row(300, 2, 4000.0, 2000.0, 2048.0, 200.0),
        row(600, 2, 4000.0, 3000.0, 2048.0, 300.0),
        row(600, 0, 0.0, 0.0, 0.0, 0.0),
        row(900, 0, 0.0, 0.0, 0.0, 0.0),
        row(900, 0, 0.0, 0.0, 4096.0, 1.0),
    ]
    .join("\n");
    let vm = parse(&text).expect("valid");
    let got: Vec<(u64, Option<u64>)> = vm.samples.iter().map(|s| (s.t_s, s.mem_active_kib)).collect();
    assert_eq!(got, vec![(300, Some(200)), (600, Some(100))]);
    assert_eq!(vm.mem_capacity_kib, 2048);
}

#[test]
fn gap_gives_none() {
    // 9.csv excerpt: samples every ~300 s, then the 110,414 s outage after 1373979937.
    let vm = fixture("9");
    assert_eq!(vm.samples.len(), 22);
    let before_gap = 1_373_979_937;
    let after_gap = 1_374_090_351;
    assert_eq!(vm.at(before_gap, 600).map(|s| s.t_s), Some(before_gap));
    assert_eq!(vm.at(before_gap + 599, 600).map(|s| s.t_s), Some(before_gap));
    assert!(vm.at(before_gap + 600, 600).is_none());
    assert!(vm.at(1_374_000_000, 600).is_none());
    assert!(vm.at(after_gap - 1, 600).is_none());
    assert_eq!(vm.at(after_gap, 600).map(|s| s.t_s), Some(after_gap));
    assert_eq!(vm.at(after_gap + 150, 600).map(|s| s.t_s), Some(after_gap));
    // Before the first sample.
    assert!(vm.at(1_373_976_937 - 1, 600).is_none());
    assert_eq!(vm.at(1_373_976_937, 600).map(|s| s.t_s), Some(1_373_976_937));
    // A gap shorter than max_gap_s is bridged by the previous sample.
    assert_eq!(vm.at(1_374_000_000, 200_000).map(|s| s.t_s), Some(before_gap));

    // 25.csv excerpt has a 601 s gap: covered with max_gap 900, not with 600.
    let vm = fixture("25");
    assert_eq!(vm.at(1_372_660_106 + 600, 600).map(|s| s.t_s), None);
    assert_eq!(vm.at(1_372_660_106 + 600, 900).map(|s| s.t_s), Some(1_372_660_106));
}

#[test]
fn at_edge_cases() {
    let empty = TraceVm { name: "e".into(), vcpus: 0, mem_capacity_kib: 0, samples: vec![] };
    assert!(empty.at(0, 600).is_none());
    assert!(empty.at(u64::MAX, u64::MAX).is_none());
    assert_eq!((empty.start_s(), empty.end_s()), (None, None));

    let text = [HEADER.to_owned(), row(100, 1, 1000.0, 10.0, 1.0, 1.0), row(400, 1, 1000.0, 20.0, 1.0, 1.0)].join("\n");
    let vm = parse(&text).expect("valid");
    assert!(vm.at(99, 300).is_none());
    assert_eq!(vm.at(100, 300).map(|s| s.t_s), Some(100));
    assert_eq!(vm.at(399, 300).map(|s| s.t_s), Some(100));
    assert_eq!(vm.at(400, 300).map(|s| s.t_s), Some(400));
    assert_eq!(vm.at(699, 300).map(|s| s.t_s), Some(400));
    assert!(vm.at(700, 300).is_none());
    assert!(vm.at(100, 0).is_none(), "max_gap_s == 0 covers nothing");
    assert_eq!(vm.at(u64::MAX, u64::MAX).map(|s| s.t_s), Some(400));
    assert!(vm.at(u64::MAX, 600).is_none());
}

#[test]
fn zero_memory_gives_none() {
    let vm = fixture("1");
    assert_eq!(vm.samples.iter().filter(|s| s.mem_active_kib.is_none()).count(), 2);
    assert_eq!(vm.samples[0].mem_active_kib, Some(1_034_593)); // 1034592.8 KiB rounded
    let vm = fixture("25");
    assert_eq!(vm.samples.iter().filter(|s| s.mem_active_kib.is_none()).count(), 113);
    assert_eq!(vm.samples[0].mem_active_kib, None);

    let text = [HEADER.to_owned(), row(1, 1, 1000.0, 0.0, 4096.0, 0.0), row(2, 1, 1000.0, 0.0, 4096.0, 0.2)].join("\n");
    let vm = parse(&text).expect("valid");
    assert_eq!(vm.samples[0].mem_active_kib, None);
    assert_eq!(vm.samples[1].mem_active_kib, Some(1), "a tiny non-zero reading stays Some");
}

#[test]
fn demand_computation() {
    // 1.csv first row: 2 cores, 5851.9989 MHz, 87.7799835 MHz used (1.5 %) -> 0.03 cores.
    let vm = fixture("1");
    assert_eq!(vm.vcpus, 2);
    assert_eq!(vm.mem_capacity_kib, 8_218_624); // mode of the 300 excerpt rows (295 of them)
    assert_eq!(vm.samples.len(), 300);
    let first = &vm.samples[0];
    assert_eq!(first.t_s, 1_372_629_804);
    assert!((first.cpu_demand_cores - 87.7799835 / (5851.9989 / 2.0)).abs() < 1e-12);
    assert!((first.cpu_demand_cores - 0.03).abs() < 1e-6);
    assert!(vm.samples.iter().all(|s| s.cpu_demand_cores >= 0.0 && s.cpu_demand_cores <= 2.0));

    // 25.csv first row: 32 cores of 2700 MHz, 3657.6 MHz used -> ~1.3547 cores.
    let vm = fixture("25");
    let expected = 3657.597982901333 / (86399.952352 / 32.0);
    assert!((vm.samples[0].cpu_demand_cores - expected).abs() < 1e-12);

    let text = format!("{HEADER}\n{}\n", row(1, 4, 10_000.0, 5_000.0, 1.0, 1.0));
    let vm = parse(&text).expect("valid");
    assert!((vm.samples[0].cpu_demand_cores - 2.0).abs() < 1e-12);
}

#[test]
fn mode_prefers_largest_on_tie() {
    let text = [
        HEADER.to_owned(),
        row(1, 2, 2000.0, 0.0, 1000.0, 1.0),
        row(2, 4, 4000.0, 0.0, 2000.0, 1.0),
        row(3, 4, 4000.0, 0.0, 1000.0, 1.0),
        row(4, 2, 2000.0, 0.0, 2000.0, 1.0),
        row(5, 1, 1000.0, 0.0, 0.0, 1.0),
        row(6, 1, 1000.0, 0.0, 0.0, 1.0),
        row(7, 1, 1000.0, 0.0, 0.0, 1.0),
    ]
    .join("\n");
    let vm = parse(&text).expect("valid");
    assert_eq!(vm.vcpus, 1);
    assert_eq!(vm.mem_capacity_kib, 2000, "zero capacities ignored, tie -> max");
    assert_eq!(mode_largest_on_tie([3u32, 5, 3, 5].into_iter()), Some(5));
    assert_eq!(mode_largest_on_tie(std::iter::empty::<u32>()), None);
}

#[test]
fn crlf_and_missing_trailing_newline() {
    let lf =
        [HEADER.to_owned(), row(1, 1, 1000.0, 500.0, 64.0, 32.0), row(301, 1, 1000.0, 250.0, 64.0, 16.0)].join("\n");
    let crlf = format!("\u{feff}{}\r\n", lf.replace('\n', "\r\n"));
    let semicolon_only = lf.replace(";\t", ";");
    let with_blank_lines = format!("{lf}\n\n\n");
    for text in [&lf, &crlf, &semicolon_only, &with_blank_lines] {
        let vm = parse(text).unwrap_or_else(|e| panic!("{e} in {text:?}"));
        assert_eq!(vm.samples.len(), 2);
        assert_eq!(vm.samples[1].t_s, 301);
        assert!((vm.samples[1].cpu_demand_cores - 0.25).abs() < 1e-12);
        assert_eq!(vm.samples[1].mem_active_kib, Some(16));
    }
}

#[test]
fn malformed_line_reports_line_number() {
    let good = row(1, 1, 1000.0, 1.0, 1.0, 1.0);
    let path = Path::new("/some/where/3.csv");
    let cases: Vec<(String, usize, &str)> = vec![
        (format!("{HEADER}\n{good}\n1;\t1;\t2\n"), 3, "found 3"),
        (format!("{HEADER}\r\n{good}\r\n{good}\r\n2;\t1;\t1000;\tabc;\t0;\t1;\t1;\t0;\t0;\t0;\t0"), 4, "column 4"),
        (format!("{HEADER}\n\n{good}\n2;\t1;\t1000;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0;\t\n"), 4, "found 12"),
        (format!("{HEADER}\n-5;\t1;\t1000;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"), 2, "column 1"),
        (format!("{HEADER}\n5.5;\t1;\t1000;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"), 2, "whole number"),
        (format!("{HEADER}\n5;\t1;\t1000;\t-1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"), 2, "negative"),
        (format!("{HEADER}\n5;\t1;\t1000;\tNaN;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"), 2, "not finite"),
        (format!("{HEADER}\n5;\t1;\t1000;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\tinf\n"), 2, "column 11"),
        (format!("{HEADER}\n5;\t1;\t0.0;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"), 2, "must be > 0"),
        (format!("{HEADER}\n5;\t99999999999;\t1;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"), 2, "too large"),
        (format!("{HEADER}\n5;\t;\t1;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"), 2, "column 2"),
        (format!("{good}\n{good}\n"), 1, "header"),
        ("Timestamp;CPU cores\n".to_owned(), 1, "found 2"),
        (String::new(), 1, "empty file"),
    ];
    for (text, want_line, want_msg) in cases {
        match parse_trace("3", &text, path) {
            Err(TraceError::Parse { path: p, line, msg }) => {
                assert_eq!(p, path);
                assert_eq!(line, want_line, "{msg} in {text:?}");
                assert!(msg.contains(want_msg), "{msg:?} lacks {want_msg:?}");
            }
            other => panic!("expected a parse error for {text:?}, got {other:?}"),
        }
    }
    // The Display form names the file and line.
    let err = parse_trace("3", &format!("{HEADER}\nx"), path).expect_err("malformed");
    assert!(err.to_string().starts_with("/some/where/3.csv:2: "), "{err}");
    // A header-only file is valid and simply has no samples.
    let vm = parse_trace("3", HEADER, path).expect("header only");
    assert!(vm.samples.is_empty());
    assert_eq!((vm.vcpus, vm.mem_capacity_kib), (0, 0));
}

#[test]
fn never_panics_on_mutated_input() {
    let base = std::fs::read_to_string(Path::new(FIXTURE_DIR).join("20.csv")).expect("fixture");
    let base = base.as_bytes();
    let alphabet = b";\t\r\n0123456789.eE-+ xNa";
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    for _ in 0..300 {
        let mut bytes = base[..rng.usize(0..=base.len().min(2000))].to_vec();
        for _ in 0..rng.usize(0..20) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.usize(0..bytes.len());
            match rng.u8(0..3) {
                0 => bytes[at] = alphabet[rng.usize(0..alphabet.len())],
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, rng.u8(..)),
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(vm) = parse(&text) {
            assert_sorted_unique(&vm);
            assert!(vm.samples.iter().all(|s| s.cpu_demand_cores.is_finite() && s.cpu_demand_cores >= 0.0));
        }
    }
}

#[test]
fn load_fixture_dir_sorted_by_numeric_stem() {
    let vms = load_trace_dir(Path::new(FIXTURE_DIR)).expect("fixture dir");
    let names: Vec<&str> = vms.iter().map(|vm| vm.name.as_str()).collect();
    assert_eq!(names, ["1", "9", "20", "25"]);
}

#[test]
fn load_dir_sorting_and_skipping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let live = format!("{HEADER}\n{}\n", row(1, 1, 1000.0, 1.0, 1.0, 1.0));
    let dead = format!("{HEADER}\n{}\n", row(1, 0, 0.0, 0.0, 0.0, 0.0));
    for name in ["10.csv", "2.csv", "b.csv", "a.CSV", "007.csv"] {
        std::fs::write(dir.path().join(name), &live).expect("write");
    }
    std::fs::write(dir.path().join("3.csv"), &dead).expect("write");
    std::fs::write(dir.path().join("4.csv"), HEADER).expect("write");
    std::fs::write(dir.path().join("notes.txt"), "not a trace").expect("write");
    std::fs::create_dir(dir.path().join("5.csv")).expect("mkdir");
    let vms = load_trace_dir(dir.path()).expect("load");
    let names: Vec<&str> = vms.iter().map(|vm| vm.name.as_str()).collect();
    assert_eq!(names, ["2", "007", "10", "a", "b"]);

    // A malformed file aborts the load and is named in the error.
    std::fs::write(dir.path().join("6.csv"), format!("{HEADER}\n1;2\n")).expect("write");
    match load_trace_dir(dir.path()) {
        Err(TraceError::Parse { path, line: 2, .. }) => assert!(path.ends_with("6.csv")),
        other => panic!("expected parse error, got {other:?}"),
    }
    // Invalid UTF-8 is an Io error for that file.
    std::fs::write(dir.path().join("6.csv"), b"\xff\xfe\xfd").expect("write");
    match load_trace_dir(dir.path()) {
        Err(TraceError::Io { path, .. }) => assert!(path.ends_with("6.csv")),
        other => panic!("expected io error, got {other:?}"),
    }
}

#[test]
fn empty_dir_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    match load_trace_dir(dir.path()) {
        Err(TraceError::Empty(path)) => assert_eq!(path, dir.path()),
        other => panic!("expected Empty, got {other:?}"),
    }
    std::fs::write(dir.path().join("README.md"), "no traces").expect("write");
    assert!(matches!(load_trace_dir(dir.path()), Err(TraceError::Empty(_))));
    let err = load_trace_dir(dir.path()).expect_err("empty");
    assert_eq!(err.to_string(), format!("No trace files (*.csv) in {}", dir.path().display()));

    // All files without live rows: not an error, just no VMs.
    std::fs::write(dir.path().join("1.csv"), HEADER).expect("write");
    assert!(load_trace_dir(dir.path()).expect("ok").is_empty());

    let missing = dir.path().join("does-not-exist");
    assert!(matches!(load_trace_dir(&missing), Err(TraceError::Io { .. })));
    assert!(matches!(load_trace_file(&missing.join("1.csv")), Err(TraceError::Io { .. })));
}

#[test]
fn full_bitbrains_subset_matches_readme() {
    let dir = Path::new(FULL_TRACE_DIR);
    if !dir.is_dir() {
        return; // dataset not available on this machine
    }
    // (name, live samples, vcpus, configured memory KiB, live rows with memory usage 0).
    // Computed independently from the CSVs; vcpus and memory agree with MANIFEST.csv's
    // cores_mode / mem_cap_kb_mode, zero counts with rows_mem_used0_live (except 20.csv, whose
    // MANIFEST modes include the absent-VM rows).
    let expected: [(&str, usize, u32, u64, usize); 25] = [
        ("1", 8260, 2, 8_388_608, 58),
        ("2", 8262, 1, 4_071_424, 4651),
        ("3", 8254, 1, 702_948, 0),
        ("4", 8253, 1, 4_059_136, 157),
        ("5", 8262, 1, 2_097_152, 0),
        ("6", 8262, 1, 2_095_104, 0),
        ("7", 8262, 1, 2_097_152, 0),
        ("8", 8253, 1, 4_194_304, 0),
        ("9", 8260, 1, 4_194_304, 0),
        ("10", 8249, 1, 2_097_152, 0),
        ("11", 8250, 1, 2_097_152, 0),
        ("12", 8246, 1, 2_097_152, 0),
        ("13", 8251, 1, 2_097_152, 0),
        ("14", 420, 1, 2_097_152, 0),
        ("15", 8251, 1, 2_097_152, 0),
        ("16", 8262, 1, 2_097_152, 0),
        ("17", 8259, 1, 2_097_152, 0),
        ("18", 8262, 1, 2_097_152, 0),
        ("19", 8251, 1, 2_877_440, 21),
        ("20", 4476, 1, 4_194_304, 0),
        ("21", 8254, 8, 5_111_808, 7124),
        ("22", 8248, 4, 16_703_488, 0),
        ("23", 8252, 4, 5_412_864, 248),
        ("24", 8254, 32, 7_759_872, 7910),
        ("25", 8250, 32, 10_496_000, 7888),
    ];
    let vms = load_trace_dir(dir).expect("full dataset");
    assert_eq!(vms.len(), 25);
    for (vm, &(name, len, vcpus, mem_kib, mem_zero)) in vms.iter().zip(&expected) {
        assert_eq!(vm.name, name);
        assert_eq!(vm.samples.len(), len, "{name}: live samples");
        assert_eq!(vm.vcpus, vcpus, "{name}: vcpus");
        assert_eq!(vm.mem_capacity_kib, mem_kib, "{name}: memory");
        let zeros = vm.samples.iter().filter(|s| s.mem_active_kib.is_none()).count();
        assert_eq!(zeros, mem_zero, "{name}: zero memory rows");
        assert_sorted_unique(vm);
        // The ~31 h outage (2013-07-16/17) is "no data" for every VM that was live then.
        if name != "14" && name != "20" {
            assert!(vm.at(1_374_000_000, 600).is_none(), "{name}: outage");
            assert_eq!(vm.start_s(), Some(1_372_629_804), "{name}: start");
            assert_eq!(vm.end_s(), Some(1_375_221_457), "{name}: end");
        }
    }
    let total: usize = vms.iter().map(|vm| vm.samples.len()).sum();
    assert_eq!(total, 206_848 - 12_077 - 8, "all rows minus the cores == 0 rows");

    // 20.csv: 16,553 data rows, the first 4,476 live, up to 2013-07-16T11:45:37Z.
    let vm20 = &vms[19];
    assert_eq!(vm20.end_s(), Some(1_373_975_137));
    // 14.csv: the README's 428 rows include 8 leading rows with CPU cores == 0.
    let text14 = std::fs::read_to_string(dir.join("14.csv")).expect("14.csv");
    assert_eq!(text14.lines().count() - 1, 428);
    let vm14 = &vms[13];
    assert_eq!(vm14.samples.len(), 420);
    assert_eq!(vm14.start_s(), Some(1_375_095_746));
    assert_eq!(vm14.end_s(), Some(1_375_221_457));
}
