//! Loader for the Bitbrains GWA-T-12 "Rnd" per-VM resource traces (Grid Workloads Archive).
//!
//! One CSV file per VM (`<n>.csv`), one header line, 11 columns separated by `";\t"`:
//!
//! | # | column | used as |
//! |---|---|---|
//! | 1 | `Timestamp [ms]` (really epoch **seconds**) | [`TraceSample::t_s`] |
//! | 2 | `CPU cores` | [`TraceVm::vcpus`] (mode); `0` marks an "absent VM" row, which is dropped |
//! | 3 | `CPU capacity provisioned [MHZ]` | per-core speed = column 3 / column 2 |
//! | 4 | `CPU usage [MHZ]` | [`TraceSample::cpu_demand_cores`] = column 4 / (column 3 / column 2) |
//! | 6 | `Memory capacity provisioned [KB]` (KiB) | [`TraceVm::mem_capacity_kib`] (mode) |
//! | 7 | `Memory usage [KB]` (active memory, KiB) | [`TraceSample::mem_active_kib`]; `0` = missing |
//!
//! Columns 5 and 8-11 are validated as numbers but not kept.
//!
//! Cleaning rules (see the dataset README): rows with `CPU cores == 0` are dropped, rows are
//! sorted by timestamp and only the first row of each timestamp is kept. Gaps in the data
//! (monitoring outages) are kept as gaps: [`TraceVm::at`] returns `None` inside them, which
//! callers must treat as "stale / no data", never as zero load.
//!
//! Data source: Siqi Shen, Vincent van Beek, Alexandru Iosup, "Statistical Characterization of
//! Business-Critical Workloads Hosted in Cloud Datacenters", `CCGrid` 2015, pp. 465-474.

use std::collections::HashMap;
use std::hash::Hash;
use std::path::{Path, PathBuf};

/// Nominal sampling interval of the Bitbrains traces, in seconds.
pub const NOMINAL_SAMPLE_INTERVAL_S: u64 = 300;

/// Number of columns in every line (header and data) of a trace file.
pub const TRACE_COLUMN_COUNT: usize = 11;

/// Column names as they appear in the header, used in error messages.
const COLUMN_NAMES: [&str; TRACE_COLUMN_COUNT] = [
    "Timestamp [ms]",
    "CPU cores",
    "CPU capacity provisioned [MHZ]",
    "CPU usage [MHZ]",
    "CPU usage [%]",
    "Memory capacity provisioned [KB]",
    "Memory usage [KB]",
    "Disk read throughput [KB/s]",
    "Disk write throughput [KB/s]",
    "Network received throughput [KB/s]",
    "Network transmitted throughput [KB/s]",
];

const COL_TIMESTAMP: usize = 0;
const COL_CPU_CORES: usize = 1;
const COL_CPU_CAPACITY_MHZ: usize = 2;
const COL_CPU_USAGE_MHZ: usize = 3;
const COL_MEM_CAPACITY_KIB: usize = 5;
const COL_MEM_USAGE_KIB: usize = 6;

/// Longest excerpt of an offending field quoted in a parse error message, in characters.
const MAX_QUOTED_FIELD_CHARS: usize = 40;

/// Errors while reading or parsing trace files.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// A file or directory could not be read (includes files that are not valid UTF-8).
    #[error("Cannot read {path}")]
    Io {
        /// The file or directory that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line of a trace file is malformed.
    #[error("{path}:{line}: {msg}")]
    Parse {
        /// The trace file.
        path: PathBuf,
        /// 1-based physical line number (the header is line 1).
        line: usize,
        /// What is wrong with the line.
        msg: String,
    },
    /// The directory contains no `*.csv` file.
    #[error("No trace files (*.csv) in {0}")]
    Empty(PathBuf),
}

/// One cleaned observation of a VM.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSample {
    /// Absolute time of the observation, Unix epoch seconds (not relative to the trace start).
    pub t_s: u64,
    /// CPU demand in cores: `CPU usage [MHZ] / (CPU capacity provisioned [MHZ] / CPU cores)`.
    /// Always finite and `>= 0`; may exceed the vCPU count slightly in other Rnd months.
    pub cpu_demand_cores: f64,
    /// Active memory in KiB (rounded to whole KiB, at least 1 when present). `None` when the row
    /// says exactly 0, which in this dataset means "missing measurement", not "needs no memory".
    pub mem_active_kib: Option<u64>,
}

/// The cleaned trace of one VM.
///
/// Invariant (relied on by [`TraceVm::at`]): `samples` is sorted by strictly increasing `t_s`.
/// Everything built by this module upholds it; keep it if you construct or modify one yourself.
#[derive(Debug, Clone)]
pub struct TraceVm {
    /// File stem of the trace file, e.g. `"7"` for `7.csv`.
    pub name: String,
    /// Provisioned vCPU count: mode of `CPU cores` over the kept live rows (largest on ties);
    /// 0 only when there are no live rows.
    pub vcpus: u32,
    /// Configured memory size in KiB: mode of `Memory capacity provisioned [KB]` (rounded to whole
    /// KiB) over the kept live rows with a non-zero capacity, largest value on ties; 0 when there
    /// is no such row.
    pub mem_capacity_kib: u64,
    /// Live rows only (`CPU cores > 0`), sorted by time, one per timestamp (the first in file order).
    pub samples: Vec<TraceSample>,
}

impl TraceVm {
    /// Demand at absolute time `t_s` (epoch s): the sample covering it (the last sample at or
    /// before `t_s`, valid while `t_s < its timestamp + max_gap_s`). `None` where there is no data
    /// (before the first sample, inside a gap longer than `max_gap_s`, after the end): callers
    /// treat `None` as stale, not zero.
    ///
    /// `max_gap_s` should be at least the sampling interval ([`NOMINAL_SAMPLE_INTERVAL_S`], plus a
    /// little jitter, e.g. 600); with `max_gap_s == 0` nothing is ever covered. O(log n).
    #[must_use]
    pub fn at(&self, t_s: u64, max_gap_s: u64) -> Option<&TraceSample> {
        let after = self.samples.partition_point(|s| s.t_s <= t_s);
        let sample = self.samples.get(after.checked_sub(1)?)?;
        // `t_s >= sample.t_s` here, so this is `t_s < sample.t_s + max_gap_s` without overflow.
        (t_s - sample.t_s < max_gap_s).then_some(sample)
    }

    /// Timestamp (epoch s) of the first live sample, `None` if there is none.
    #[must_use]
    pub fn start_s(&self) -> Option<u64> {
        self.samples.first().map(|s| s.t_s)
    }

    /// Timestamp (epoch s) of the last live sample, `None` if there is none.
    #[must_use]
    pub fn end_s(&self) -> Option<u64> {
        self.samples.last().map(|s| s.t_s)
    }
}

/// A validated live row before deduplication.
struct LiveRow {
    cores: u32,
    mem_capacity_kib: u64,
    sample: TraceSample,
}

/// Parses the text of one trace file.
///
/// `name` becomes [`TraceVm::name`]; `path` is only used in error messages. The first line must be
/// the 11-column header. Accepts LF or CRLF line endings, a missing final newline, a UTF-8 BOM,
/// blank lines (skipped), `;` with or without the TAB, and floats in E-notation. Any malformed line
/// (wrong column count, non-numeric, negative or non-finite value, `CPU cores > 0` with a
/// capacity of 0) is a [`TraceError::Parse`] with its 1-based line number. An empty text is a
/// parse error (no header); a header without live rows gives a `TraceVm` with no samples.
///
/// # Errors
///
/// [`TraceError::Parse`] for the first malformed line.
pub fn parse_trace(name: &str, text: &str, path: &Path) -> Result<TraceVm, TraceError> {
    let parse_error = |line: usize, msg: String| TraceError::Parse {
        path: path.to_path_buf(),
        line,
        msg,
    };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines().enumerate().map(|(idx, line)| (idx + 1, line));

    let Some((header_line_no, header)) = lines.next() else {
        return Err(parse_error(1, "empty file: missing header line".to_owned()));
    };
    let header_fields = split_fields(header).map_err(|msg| parse_error(header_line_no, msg))?;
    if header_fields[COL_TIMESTAMP].parse::<f64>().is_ok() {
        return Err(parse_error(
            header_line_no,
            format!(
                "expected the header line (\"{}; ...\"), found a data row",
                COLUMN_NAMES[COL_TIMESTAMP]
            ),
        ));
    }

    let mut rows = Vec::new();
    for (line_no, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        if let Some(row) = parse_row(line).map_err(|msg| parse_error(line_no, msg))? {
            rows.push(row);
        }
    }

    // Stable sort, then keep the first row (in file order) of each timestamp.
    rows.sort_by_key(|row| row.sample.t_s);
    rows.dedup_by_key(|row| row.sample.t_s);

    let vcpus = mode_largest_on_tie(rows.iter().map(|row| row.cores)).unwrap_or(0);
    let mem_capacity_kib = mode_largest_on_tie(
        rows.iter()
            .map(|row| row.mem_capacity_kib)
            .filter(|&kib| kib > 0),
    )
    .unwrap_or(0);

    Ok(TraceVm {
        name: name.to_owned(),
        vcpus,
        mem_capacity_kib,
        samples: rows.into_iter().map(|row| row.sample).collect(),
    })
}

/// Reads and parses one trace file; the VM name is the file stem (e.g. `"7"` for `.../7.csv`).
///
/// # Errors
///
/// [`TraceError::Io`] if the file cannot be read or is not UTF-8, [`TraceError::Parse`] for the
/// first malformed line.
pub fn load_trace_file(path: &Path) -> Result<TraceVm, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    parse_trace(&name, &text, path)
}

/// All *.csv files of a directory, sorted by numeric stem (then lexically); a VM with no live rows is skipped with no error.
///
/// Non-numeric stems sort after numeric ones. The extension match ignores ASCII case; other files
/// (e.g. `README.md`) and subdirectories are ignored. Returns [`TraceError::Empty`] when there is
/// no `*.csv` file, and an empty vector when there are some but none has live rows. The first
/// unreadable or malformed file aborts the load with its error.
///
/// # Errors
///
/// [`TraceError::Io`] if the directory or a file cannot be read, [`TraceError::Empty`] if it holds
/// no `*.csv` file, [`TraceError::Parse`] for the first malformed line of any file.
pub fn load_trace_dir(dir: &Path) -> Result<Vec<TraceVm>, TraceError> {
    let io_error = |source: std::io::Error| TraceError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let path = entry.map_err(io_error)?.path();
        let is_csv = path
            .extension()
            .is_some_and(|ext| ext.eq_ignore_ascii_case("csv"));
        if is_csv && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(TraceError::Empty(dir.to_path_buf()));
    }
    files.sort_by_cached_key(|path| file_sort_key(path));

    let mut vms = Vec::with_capacity(files.len());
    for path in &files {
        let vm = load_trace_file(path)?;
        if !vm.samples.is_empty() {
            vms.push(vm);
        }
    }
    Ok(vms)
}

/// Sort key: numeric stems first, by value; then everything else lexically.
fn file_sort_key(path: &Path) -> (bool, u128, String) {
    let stem = path
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default();
    match stem.parse::<u128>() {
        Ok(number) => (false, number, stem),
        Err(_) => (true, 0, stem),
    }
}

/// Splits a line into exactly [`TRACE_COLUMN_COUNT`] trimmed fields.
fn split_fields(line: &str) -> Result<[&str; TRACE_COLUMN_COUNT], String> {
    let mut fields = [""; TRACE_COLUMN_COUNT];
    let mut count = 0usize;
    for field in line.split(';') {
        if let Some(slot) = fields.get_mut(count) {
            *slot = field.trim();
        }
        count += 1;
    }
    if count == TRACE_COLUMN_COUNT {
        Ok(fields)
    } else {
        Err(format!(
            "expected {TRACE_COLUMN_COUNT} fields separated by ';', found {count}"
        ))
    }
}

/// Parses one data line; `Ok(None)` for a valid "absent VM" row (`CPU cores == 0`).
fn parse_row(line: &str) -> Result<Option<LiveRow>, String> {
    let fields = split_fields(line)?;
    let t_s = parse_whole(fields[COL_TIMESTAMP], COL_TIMESTAMP)?;
    let cores_u64 = parse_whole(fields[COL_CPU_CORES], COL_CPU_CORES)?;
    let cores = u32::try_from(cores_u64)
        .map_err(|_| column_error(COL_CPU_CORES, fields[COL_CPU_CORES], "is too large"))?;
    let mut values = [0.0f64; TRACE_COLUMN_COUNT];
    for (col, (value, field)) in values.iter_mut().zip(fields).enumerate().skip(2) {
        *value = parse_non_negative(field, col)?;
    }
    if cores == 0 {
        return Ok(None);
    }

    let capacity_mhz = values[COL_CPU_CAPACITY_MHZ];
    if capacity_mhz <= 0.0 {
        return Err(column_error(
            COL_CPU_CAPACITY_MHZ,
            fields[COL_CPU_CAPACITY_MHZ],
            "must be > 0 when CPU cores > 0",
        ));
    }
    let per_core_mhz = capacity_mhz / f64::from(cores);
    // `+ 0.0` turns a -0.0 (from a "-0" field) into 0.0.
    let cpu_demand_cores = values[COL_CPU_USAGE_MHZ] / per_core_mhz + 0.0;
    if !cpu_demand_cores.is_finite() {
        return Err(format!(
            "CPU demand is not finite (usage {} MHz, capacity {} MHz, {} cores)",
            values[COL_CPU_USAGE_MHZ], capacity_mhz, cores
        ));
    }

    let mem_usage_kib = values[COL_MEM_USAGE_KIB];
    let mem_active_kib = (mem_usage_kib > 0.0).then(|| round_to_u64(mem_usage_kib).max(1));
    Ok(Some(LiveRow {
        cores,
        mem_capacity_kib: round_to_u64(values[COL_MEM_CAPACITY_KIB]),
        sample: TraceSample {
            t_s,
            cpu_demand_cores,
            mem_active_kib,
        },
    }))
}

/// Parses a non-negative whole number, also written as an integral float (`"2.0"`, `"1.6E1"`).
fn parse_whole(field: &str, col: usize) -> Result<u64, String> {
    if let Ok(value) = field.parse::<u64>() {
        return Ok(value);
    }
    let value = parse_non_negative(field, col)?;
    // `u64::MAX as f64` rounds up to 2^64, so the bound is exclusive.
    if value.fract() != 0.0 || value >= u64::MAX as f64 {
        return Err(column_error(col, field, "is not a whole number"));
    }
    // Checked above: whole, non-negative and below 2^64.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(value as u64)
}

/// Parses a finite, non-negative float (plain or E-notation).
fn parse_non_negative(field: &str, col: usize) -> Result<f64, String> {
    let value: f64 = field
        .parse()
        .map_err(|_| column_error(col, field, "is not a number"))?;
    if !value.is_finite() {
        return Err(column_error(col, field, "is not finite"));
    }
    if value < 0.0 {
        return Err(column_error(col, field, "is negative"));
    }
    Ok(value)
}

/// Rounds a finite non-negative float to u64 (saturating at `u64::MAX`).
fn round_to_u64(value: f64) -> u64 {
    // Float-to-int `as` casts saturate and never panic.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let v = value.round() as u64;
    v
}

fn column_error(col: usize, field: &str, problem: &str) -> String {
    let name = COLUMN_NAMES.get(col).copied().unwrap_or("?");
    let mut quoted: String = field.chars().take(MAX_QUOTED_FIELD_CHARS).collect();
    if field.chars().nth(MAX_QUOTED_FIELD_CHARS).is_some() {
        quoted.push_str("...");
    }
    format!("column {} ({name}): {quoted:?} {problem}", col + 1)
}

/// Most frequent value; the largest value among equally frequent ones. `None` for no values.
fn mode_largest_on_tie<T: Copy + Ord + Hash>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: HashMap<T, usize> = HashMap::new();
    for value in values {
        *counts.entry(value).or_insert(0) += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(value, count)| (count, value))
        .map(|(value, _)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixture directory (shared with the integration tests).
    const FIXTURE_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/bitbrains-excerpt");

    /// Full 25-VM subset; the test using it is skipped when it is absent.
    const FULL_TRACE_DIR: &str = "/work/shared/traces/bitbrains-rnd/2013-7";

    const HEADER: &str = "Timestamp [ms];\tCPU cores;\tCPU capacity provisioned [MHZ];\tCPU usage [MHZ];\tCPU usage [%];\tMemory capacity provisioned [KB];\tMemory usage [KB];\tDisk read throughput [KB/s];\tDisk write throughput [KB/s];\tNetwork received throughput [KB/s];\tNetwork transmitted throughput [KB/s]";

    fn fixture(name: &str) -> TraceVm {
        let path = Path::new(FIXTURE_DIR).join(format!("{name}.csv"));
        match load_trace_file(&path) {
            Ok(vm) => vm,
            Err(err) => panic!("fixture {}: {err}", path.display()),
        }
    }

    /// A data row: ts; cores; capacity MHz; usage MHz; usage %; mem cap KiB; mem usage KiB; 4 zeros.
    fn row(
        t_s: u64,
        cores: u32,
        cap_mhz: f64,
        usage_mhz: f64,
        mem_cap: f64,
        mem_used: f64,
    ) -> String {
        format!(
            "{t_s};\t{cores};\t{cap_mhz};\t{usage_mhz};\t0.0;\t{mem_cap};\t{mem_used};\t0.0;\t0.0;\t0.0;\t0.0"
        )
    }

    fn parse(text: &str) -> Result<TraceVm, TraceError> {
        parse_trace("t", text, Path::new("t.csv"))
    }

    fn assert_sorted_unique(vm: &TraceVm) {
        assert!(
            vm.samples.windows(2).all(|w| w[0].t_s < w[1].t_s),
            "{}: samples not strictly increasing",
            vm.name
        );
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

        let text = format!(
            "{HEADER}\n{}\n",
            row(
                100,
                4,
                1.1703996664E4,
                4.954691921093334E2,
                1.6703488E7,
                1.0513712E6
            )
        );
        let vm = parse(&text).expect("E-notation row");
        assert_eq!(vm.mem_capacity_kib, 16_703_488);
        assert_eq!(vm.samples[0].mem_active_kib, Some(1_051_371));
        // Whole-number columns written as integral floats are accepted too.
        let text = format!(
            "{HEADER}\n1.0E2;\t4.0;\t8.0E3;\t2.0E3;\t25.0;\t1.0E3;\t5.0E2;\t0;\t0;\t0;\t0\n"
        );
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
        assert_eq!(
            vm.at(1_373_975_137 + 299, 600).map(|s| s.t_s),
            Some(1_373_975_137)
        );
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
        let got: Vec<(u64, Option<u64>)> = vm
            .samples
            .iter()
            .map(|s| (s.t_s, s.mem_active_kib))
            .collect();
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
        assert_eq!(
            vm.at(before_gap + 599, 600).map(|s| s.t_s),
            Some(before_gap)
        );
        assert!(vm.at(before_gap + 600, 600).is_none());
        assert!(vm.at(1_374_000_000, 600).is_none());
        assert!(vm.at(after_gap - 1, 600).is_none());
        assert_eq!(vm.at(after_gap, 600).map(|s| s.t_s), Some(after_gap));
        assert_eq!(vm.at(after_gap + 150, 600).map(|s| s.t_s), Some(after_gap));
        // Before the first sample.
        assert!(vm.at(1_373_976_937 - 1, 600).is_none());
        assert_eq!(
            vm.at(1_373_976_937, 600).map(|s| s.t_s),
            Some(1_373_976_937)
        );
        // A gap shorter than max_gap_s is bridged by the previous sample.
        assert_eq!(
            vm.at(1_374_000_000, 200_000).map(|s| s.t_s),
            Some(before_gap)
        );

        // 25.csv excerpt has a 601 s gap: covered with max_gap 900, not with 600.
        let vm = fixture("25");
        assert_eq!(vm.at(1_372_660_106 + 600, 600).map(|s| s.t_s), None);
        assert_eq!(
            vm.at(1_372_660_106 + 600, 900).map(|s| s.t_s),
            Some(1_372_660_106)
        );
    }

    #[test]
    fn at_edge_cases() {
        let empty = TraceVm {
            name: "e".into(),
            vcpus: 0,
            mem_capacity_kib: 0,
            samples: vec![],
        };
        assert!(empty.at(0, 600).is_none());
        assert!(empty.at(u64::MAX, u64::MAX).is_none());
        assert_eq!((empty.start_s(), empty.end_s()), (None, None));

        let text = [
            HEADER.to_owned(),
            row(100, 1, 1000.0, 10.0, 1.0, 1.0),
            row(400, 1, 1000.0, 20.0, 1.0, 1.0),
        ]
        .join("\n");
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
        assert_eq!(
            vm.samples
                .iter()
                .filter(|s| s.mem_active_kib.is_none())
                .count(),
            2
        );
        assert_eq!(vm.samples[0].mem_active_kib, Some(1_034_593)); // 1034592.8 KiB rounded
        let vm = fixture("25");
        assert_eq!(
            vm.samples
                .iter()
                .filter(|s| s.mem_active_kib.is_none())
                .count(),
            113
        );
        assert_eq!(vm.samples[0].mem_active_kib, None);

        let text = [
            HEADER.to_owned(),
            row(1, 1, 1000.0, 0.0, 4096.0, 0.0),
            row(2, 1, 1000.0, 0.0, 4096.0, 0.2),
        ]
        .join("\n");
        let vm = parse(&text).expect("valid");
        assert_eq!(vm.samples[0].mem_active_kib, None);
        assert_eq!(
            vm.samples[1].mem_active_kib,
            Some(1),
            "a tiny non-zero reading stays Some"
        );
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
        assert!(
            vm.samples
                .iter()
                .all(|s| s.cpu_demand_cores >= 0.0 && s.cpu_demand_cores <= 2.0)
        );

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
        assert_eq!(
            vm.mem_capacity_kib, 2000,
            "zero capacities ignored, tie -> max"
        );
        assert_eq!(mode_largest_on_tie([3u32, 5, 3, 5].into_iter()), Some(5));
        assert_eq!(mode_largest_on_tie(std::iter::empty::<u32>()), None);
    }

    #[test]
    fn crlf_and_missing_trailing_newline() {
        let lf = [
            HEADER.to_owned(),
            row(1, 1, 1000.0, 500.0, 64.0, 32.0),
            row(301, 1, 1000.0, 250.0, 64.0, 16.0),
        ]
        .join("\n");
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
            (
                format!(
                    "{HEADER}\r\n{good}\r\n{good}\r\n2;\t1;\t1000;\tabc;\t0;\t1;\t1;\t0;\t0;\t0;\t0"
                ),
                4,
                "column 4",
            ),
            (
                format!("{HEADER}\n\n{good}\n2;\t1;\t1000;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0;\t\n"),
                4,
                "found 12",
            ),
            (
                format!("{HEADER}\n-5;\t1;\t1000;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"),
                2,
                "column 1",
            ),
            (
                format!("{HEADER}\n5.5;\t1;\t1000;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"),
                2,
                "whole number",
            ),
            (
                format!("{HEADER}\n5;\t1;\t1000;\t-1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"),
                2,
                "negative",
            ),
            (
                format!("{HEADER}\n5;\t1;\t1000;\tNaN;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"),
                2,
                "not finite",
            ),
            (
                format!("{HEADER}\n5;\t1;\t1000;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\tinf\n"),
                2,
                "column 11",
            ),
            (
                format!("{HEADER}\n5;\t1;\t0.0;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"),
                2,
                "must be > 0",
            ),
            (
                format!("{HEADER}\n5;\t99999999999;\t1;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"),
                2,
                "too large",
            ),
            (
                format!("{HEADER}\n5;\t;\t1;\t1;\t0;\t1;\t1;\t0;\t0;\t0;\t0\n"),
                2,
                "column 2",
            ),
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
        assert!(
            err.to_string().starts_with("/some/where/3.csv:2: "),
            "{err}"
        );
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
                assert!(
                    vm.samples
                        .iter()
                        .all(|s| s.cpu_demand_cores.is_finite() && s.cpu_demand_cores >= 0.0)
                );
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
        assert!(matches!(
            load_trace_dir(dir.path()),
            Err(TraceError::Empty(_))
        ));
        let err = load_trace_dir(dir.path()).expect_err("empty");
        assert_eq!(
            err.to_string(),
            format!("No trace files (*.csv) in {}", dir.path().display())
        );

        // All files without live rows: not an error, just no VMs.
        std::fs::write(dir.path().join("1.csv"), HEADER).expect("write");
        assert!(load_trace_dir(dir.path()).expect("ok").is_empty());

        let missing = dir.path().join("does-not-exist");
        assert!(matches!(
            load_trace_dir(&missing),
            Err(TraceError::Io { .. })
        ));
        assert!(matches!(
            load_trace_file(&missing.join("1.csv")),
            Err(TraceError::Io { .. })
        ));
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
            let zeros = vm
                .samples
                .iter()
                .filter(|s| s.mem_active_kib.is_none())
                .count();
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
        assert_eq!(
            total,
            206_848 - 12_077 - 8,
            "all rows minus the cores == 0 rows"
        );

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
}
