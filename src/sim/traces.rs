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
    let parse_error = |line: usize, msg: String| TraceError::Parse { path: path.to_path_buf(), line, msg };
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut lines = text.lines().enumerate().map(|(idx, line)| (idx + 1, line));

    let Some((header_line_no, header)) = lines.next() else {
        return Err(parse_error(1, "empty file: missing header line".to_owned()));
    };
    let header_fields = split_fields(header).map_err(|msg| parse_error(header_line_no, msg))?;
    if header_fields[COL_TIMESTAMP].parse::<f64>().is_ok() {
        return Err(parse_error(
            header_line_no,
            format!("expected the header line (\"{}; ...\"), found a data row", COLUMN_NAMES[COL_TIMESTAMP]),
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
    let mem_capacity_kib =
        mode_largest_on_tie(rows.iter().map(|row| row.mem_capacity_kib).filter(|&kib| kib > 0)).unwrap_or(0);

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
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: path.to_path_buf(), source })?;
    let name =
        path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string());
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
    let io_error = |source: std::io::Error| TraceError::Io { path: dir.to_path_buf(), source };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error)? {
        let path = entry.map_err(io_error)?.path();
        let is_csv = path.extension().is_some_and(|ext| ext.eq_ignore_ascii_case("csv"));
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
    let stem = path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
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
        Err(format!("expected {TRACE_COLUMN_COUNT} fields separated by ';', found {count}"))
    }
}

/// Parses one data line; `Ok(None)` for a valid "absent VM" row (`CPU cores == 0`).
fn parse_row(line: &str) -> Result<Option<LiveRow>, String> {
    let fields = split_fields(line)?;
    let t_s = parse_whole(fields[COL_TIMESTAMP], COL_TIMESTAMP)?;
    let cores_u64 = parse_whole(fields[COL_CPU_CORES], COL_CPU_CORES)?;
    let cores =
        u32::try_from(cores_u64).map_err(|_| column_error(COL_CPU_CORES, fields[COL_CPU_CORES], "is too large"))?;
    let mut values = [0.0f64; TRACE_COLUMN_COUNT];
    for (col, (value, field)) in values.iter_mut().zip(fields).enumerate().skip(2) {
        *value = parse_non_negative(field, col)?;
    }
    if cores == 0 {
        return Ok(None);
    }

    let capacity_mhz = values[COL_CPU_CAPACITY_MHZ];
    if capacity_mhz <= 0.0 {
        return Err(column_error(COL_CPU_CAPACITY_MHZ, fields[COL_CPU_CAPACITY_MHZ], "must be > 0 when CPU cores > 0"));
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
        sample: TraceSample { t_s, cpu_demand_cores, mem_active_kib },
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
    let value: f64 = field.parse().map_err(|_| column_error(col, field, "is not a number"))?;
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
    counts.into_iter().max_by_key(|&(value, count)| (count, value)).map(|(value, _)| value)
}

#[cfg(test)]
mod tests;
