//! The one source of settings for every subcommand: a flag wins over its `VM_BALANCER_*`
//! environment variable, which wins over the settings file, which wins over the default.
//!
//! The settings file (`/etc/default/vm-balancer`, lines of `VM_BALANCER_X=value` as in an
//! environment file) is read by every subcommand, so `vm-balancer diagnose` run from a shell
//! sees the settings the daemon runs with (the unit does not load it as its environment: a
//! variable would win over the file at a reload). `--config PATH` (or `VM_BALANCER_CONFIG`) chooses another file; a missing
//! default file is fine, a missing chosen file is an error. Each value of the file is checked by
//! the flag's own parser, and becomes that flag's default: clap then applies the environment
//! and the command line over it, as for any default.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use clap::{CommandFactory as _, FromArgMatches as _};

use crate::cli::Cli;

/// The settings file read when none is named.
pub const DEFAULT_PATH: &str = "/etc/default/vm-balancer";
/// The variable (and `--config`) naming another settings file.
pub const CONFIG_VAR: &str = "VM_BALANCER_CONFIG";

/// A settings file that cannot be used: one line naming the file, the line and the variable.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read the settings file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {msg}")]
    Line { path: String, line: usize, msg: String },
    #[error("the settings file {path} is empty (being written?)")]
    Empty { path: String },
}

/// One `VM_BALANCER_X=value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub line: usize,
    pub key: String,
    pub value: String,
}

/// A settings file, read and split into entries (not yet checked against the flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsFile {
    pub path: PathBuf,
    pub entries: Vec<Entry>,
}

impl SettingsFile {
    /// Reads `path`. `required`: a missing file is an error (it was named); otherwise it is an
    /// empty settings file.
    pub fn read(path: &Path, required: bool) -> Result<SettingsFile, SettingsError> {
        match std::fs::read_to_string(path) {
            Ok(text) => SettingsFile::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(SettingsFile { path: path.to_path_buf(), entries: vec![] })
            }
            Err(source) => Err(SettingsError::Read { path: path.display().to_string(), source }),
        }
    }

    /// Splits the text of an environment file: `KEY=value` lines (`export KEY=value` too),
    /// `#` comments, blank lines; a value may be quoted with `"` or `'`. Keys that are not
    /// `VM_BALANCER_*` are skipped (another program's variables), except those that look like
    /// one misspelt (`vm_balancer_high`, `VM_BALANCR_HIGH`): an error, not a setting silently
    /// not in force.
    pub fn parse(path: &Path, text: &str) -> Result<SettingsFile, SettingsError> {
        let mut first = None;
        let file = SettingsFile::parse_lines(path, text, &mut |e| {
            first.get_or_insert(e);
        });
        first.map_or(Ok(file), Err)
    }

    /// [`SettingsFile::parse`] that leaves out each bad line (the first of a key set twice is
    /// kept), handing each error to `bad`.
    pub fn parse_lines(path: &Path, text: &str, bad: &mut dyn FnMut(SettingsError)) -> SettingsFile {
        let err = |line: usize, msg: String| SettingsError::Line { path: path.display().to_string(), line, msg };
        let mut entries: Vec<Entry> = Vec::new();
        // An editor's byte-order mark is not part of the first key.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
                continue;
            }
            let Some((key, value)) = l.split_once('=') else {
                bad(err(line, format!("expected VARIABLE=value, found {l:?}")));
                continue;
            };
            let key = key.trim();
            let key = key.strip_prefix("export").filter(|k| k.starts_with([' ', '\t'])).map_or(key, str::trim_start);
            if !key.starts_with("VM_BALANCER_") {
                if looks_like_ours(key) {
                    let msg =
                        format!("{key} is not a setting of vm-balancer: settings are spelt VM_BALANCER_X, in capitals");
                    bad(err(line, msg));
                }
                continue;
            }
            let Some(value) = unquote(value.trim()) else {
                bad(err(line, format!("{key}: unbalanced quotes in {value:?}")));
                continue;
            };
            if let Some(prev) = entries.iter().find(|e| e.key == key) {
                bad(err(line, format!("{key} is already set on line {}", prev.line)));
                continue;
            }
            entries.push(Entry { line, key: key.to_string(), value });
        }
        SettingsFile { path: path.to_path_buf(), entries }
    }
}

/// A key meant for the agent but misspelt: `VM_BALANCER_` in other letters or with a letter
/// or an underscore missing.
fn looks_like_ours(key: &str) -> bool {
    let k: String = key.chars().filter(|c| *c != '_').collect::<String>().to_ascii_uppercase();
    k.starts_with("VMBALANC") || k.starts_with("VMBALNC")
}

fn unquote(v: &str) -> Option<String> {
    for q in ['"', '\''] {
        if let Some(rest) = v.strip_prefix(q) {
            return rest.strip_suffix(q).map(str::to_string);
        }
    }
    (!v.starts_with(['"', '\''])).then(|| v.to_string())
}

/// The settings file a command line names (`--config PATH`, `--config=PATH`), else the one
/// `VM_BALANCER_CONFIG` names, else the default; and whether it was named (then it must exist).
pub fn config_path(argv: &[OsString]) -> (PathBuf, bool) {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            if let Some(p) = it.next() {
                return (PathBuf::from(p), true);
            }
        } else if let Some(p) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return (PathBuf::from(p), true);
        }
    }
    match std::env::var_os(CONFIG_VAR) {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => (PathBuf::from(DEFAULT_PATH), false),
    }
}

/// The command-line definition with the settings file's values as the defaults of their
/// flags, in every subcommand that has them. Each value is checked by its flag's parser.
pub fn command_with(file: &SettingsFile) -> Result<clap::Command, SettingsError> {
    let mut cmd = Cli::command();
    let path = file.path.display().to_string();
    let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_string()).collect();
    for e in &file.entries {
        if e.key == CONFIG_VAR {
            let msg = format!("{CONFIG_VAR} names the settings file; it cannot be set inside one");
            return Err(SettingsError::Line { path, line: e.line, msg });
        }
        let mut known = false;
        for sub in &names {
            let Some(sc) = cmd.find_subcommand(sub) else { continue };
            let Some(arg) = sc.get_arguments().find(|a| a.get_env() == Some(OsStr::new(&e.key))) else { continue };
            known = true;
            let id = arg.get_id().clone();
            // The flag's own parser checks the value: a one-flag command whose default it is.
            let check = clap::Command::new("vm-balancer")
                .no_binary_name(true)
                .arg(arg.clone().env(None).required(false).default_value(e.value.clone()));
            if let Err(err) = check.try_get_matches_from(Vec::<OsString>::new()) {
                let msg = err.render().to_string();
                let msg = msg.lines().next().unwrap_or("").trim_start_matches("error: ").to_string();
                return Err(SettingsError::Line { path, line: e.line, msg: format!("{}: {msg}", e.key) });
            }
            let value = e.value.clone();
            cmd = cmd.mut_subcommand(sub, |sc| sc.mut_arg(id, |a| a.default_value(value)));
        }
        if !known {
            return Err(SettingsError::Line {
                path,
                line: e.line,
                msg: format!("{} is not a setting of vm-balancer (see `vm-balancer run --help`)", e.key),
            });
        }
    }
    Ok(cmd)
}

/// Why parsing a command line with its settings failed.
#[derive(Debug)]
pub enum ParseError {
    Settings(SettingsError),
    /// clap's own error (bad flag, `--help`, `--version`): `exit()` prints it as clap does.
    Clap(clap::Error),
}

/// Parses a command line with its settings file: the one place settings are read.
pub fn parse(argv: &[OsString]) -> Result<Cli, ParseError> {
    let (path, required) = config_path(argv);
    parse_with(argv, SettingsFile::read(&path, required).map_err(ParseError::Settings)?)
}

/// [`parse`] at a reload (SIGHUP), where a settings file that is missing or empty (0 bytes) is
/// an error, so the settings in force are kept: a file being rewritten (truncated, then
/// written) or moved aside must not read as "every default" (dry run off, no exclusions). A
/// file of comments only does bring the defaults back.
pub fn parse_reload(argv: &[OsString]) -> Result<Cli, ParseError> {
    let (path, _) = config_path(argv);
    let shown = path.display().to_string();
    // Judged on the text read, not on a second look at the file (it may be refilled between).
    let text = std::fs::read_to_string(&path)
        .map_err(|source| ParseError::Settings(SettingsError::Read { path: shown.clone(), source }))?;
    if text.is_empty() {
        return Err(ParseError::Settings(SettingsError::Empty { path: shown }));
    }
    parse_with(argv, SettingsFile::parse(&path, &text).map_err(ParseError::Settings)?)
}

/// [`parse`] for `release`, the safety net the unit runs after every stop (a crash included):
/// a settings file it cannot read, or a line of it that is bad, must not keep it from giving
/// the pins back. Such lines are left out (each named in the warnings returned), the others
/// are read; the command line is parsed as usual.
pub fn parse_leniently(argv: &[OsString]) -> (Result<Cli, ParseError>, Vec<String>) {
    let (path, required) = config_path(argv);
    let mut warnings = Vec::new();
    // Read as bytes: a comment in another encoding must not cost the other lines.
    let text = match std::fs::read(&path).map(|b| String::from_utf8_lossy(&b).into_owned()) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
        Err(source) => {
            let e = SettingsError::Read { path: path.display().to_string(), source };
            warnings.push(format!("{}; going on without it", crate::host::chain(&e)));
            String::new()
        }
    };
    let file = SettingsFile::parse_lines(&path, &text, &mut |e| warnings.push(format!("{e}; left out")));
    let mut good = SettingsFile { path: file.path.clone(), entries: Vec::new() };
    for e in file.entries {
        let one = SettingsFile { path: file.path.clone(), entries: vec![e.clone()] };
        match command_with(&one) {
            Ok(_) => good.entries.push(e),
            Err(err) => warnings.push(format!("{err}; left out")),
        }
    }
    (parse_with(argv, good), warnings)
}

/// The subcommand a command line names (its first word that is not a flag).
pub fn subcommand(argv: &[OsString]) -> Option<&str> {
    argv.iter().skip(1).filter_map(|a| a.to_str()).find(|a| !a.starts_with('-'))
}

fn parse_with(argv: &[OsString], file: SettingsFile) -> Result<Cli, ParseError> {
    let cmd = command_with(&file).map_err(ParseError::Settings)?;
    let matches = cmd.try_get_matches_from(argv).map_err(ParseError::Clap)?;
    Cli::from_arg_matches(&matches).map_err(ParseError::Clap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn argv(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    fn file(text: &str) -> SettingsFile {
        SettingsFile::parse(Path::new("/etc/default/vm-balancer"), text).unwrap()
    }

    fn common_of(cli: Cli) -> crate::cli::Common {
        match cli.command {
            Command::Run { common, .. } | Command::Diagnose { common, .. } | Command::Simulate { common, .. } => common,
            #[allow(unreachable_patterns)]
            _ => unreachable!(),
        }
    }

    #[test]
    fn file_values_become_defaults_and_flags_win() {
        let f = file(
            "# comment\n\nVM_BALANCER_QUANTUM=5s\nVM_BALANCER_CPUS=\"0-1\"\nVM_BALANCER_NO_MEMORY=true\nOTHER=x\n",
        );
        let cmd = command_with(&f).unwrap();
        let m = cmd.clone().try_get_matches_from(["vm-balancer", "diagnose"]).unwrap();
        let c = common_of(Cli::from_arg_matches(&m).unwrap());
        assert_eq!(c.quantum, std::time::Duration::from_secs(5));
        assert_eq!(c.cpus.unwrap().0, vec![0, 1]);
        assert!(c.no_memory);
        let m = cmd.try_get_matches_from(["vm-balancer", "run", "--quantum", "1s"]).unwrap();
        let c = common_of(Cli::from_arg_matches(&m).unwrap());
        assert_eq!(c.quantum, std::time::Duration::from_secs(1), "a flag wins over the file");
    }

    #[test]
    fn a_bad_line_names_the_file_the_line_and_the_variable() {
        let e = command_with(&file("VM_BALANCER_HIGH=0.8\nVM_BALANCER_QUANTUM=5ms\n")).unwrap_err().to_string();
        assert!(e.starts_with("/etc/default/vm-balancer:2: VM_BALANCER_QUANTUM:"), "{e}");
        assert!(e.contains("allowed 100ms to 1h"), "{e}");
        let e = command_with(&file("VM_BALANCER_CONFIG=/etc/other\n")).unwrap_err().to_string();
        assert!(e.contains(":1: VM_BALANCER_CONFIG names the settings file"), "{e}");
        let e = command_with(&file("VM_BALANCER_QUANTUMM=5s\n")).unwrap_err().to_string();
        assert!(e.contains(":1: VM_BALANCER_QUANTUMM is not a setting"), "{e}");
        let e = SettingsFile::parse(Path::new("f"), "VM_BALANCER_HIGH\n").unwrap_err().to_string();
        assert_eq!(e, "f:1: expected VARIABLE=value, found \"VM_BALANCER_HIGH\"");
        let e = SettingsFile::parse(Path::new("f"), "VM_BALANCER_HIGH=\"0.8\n").unwrap_err().to_string();
        assert!(e.contains("unbalanced quotes"), "{e}");
        let e = SettingsFile::parse(Path::new("f"), "VM_BALANCER_HIGH=0.8\nVM_BALANCER_HIGH=0.9\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("already set on line 1"), "{e}");
    }

    #[test]
    fn export_lines_and_a_byte_order_mark_are_read_and_misspelt_keys_refused() {
        let f = file(
            "\u{feff}VM_BALANCER_HIGH=0.8\nexport VM_BALANCER_EXCLUDE=db1\nexport\tVM_BALANCER_DRY_RUN=true\nPATH=/x\n",
        );
        let keys: Vec<&str> = f.entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["VM_BALANCER_HIGH", "VM_BALANCER_EXCLUDE", "VM_BALANCER_DRY_RUN"]);
        for bad in ["vm_balancer_high=0.8", "VM_BALANCR_HIGH=0.8", "VMBALANCER_HIGH=0.8", "export Vm_Balancer_High=1"] {
            let e = SettingsFile::parse(Path::new("f"), bad).unwrap_err().to_string();
            assert!(e.starts_with("f:1: ") && e.contains("is not a setting of vm-balancer"), "{bad}: {e}");
        }
        // Another program's variables, and a key merely starting with "export".
        assert!(file("EXPORTED=1\nVM_BALLOON=1\n").entries.is_empty());
    }

    #[test]
    fn release_leaves_out_bad_lines_and_reads_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings");
        std::fs::write(
            &path,
            "VM_BALANCER_HIGH=0.85 # busier\nVM_BALANCER_KEEP_PINS_ON_EXIT=true\nVM_BALANCER_BOGUS=1\nVM_BALANCER_KEEP_PINS_ON_EXIT=false\noops\n",
        )
        .unwrap();
        let a = argv(&["vmb", "release", "--config", path.to_str().unwrap()]);
        assert!(parse(&a).is_err(), "the strict parse refuses the file");
        assert_eq!(subcommand(&a), Some("release"));
        let (cli, warnings) = parse_leniently(&a);
        let Ok(Cli { command: Command::Release { common, .. }, .. }) = cli else { panic!("release not parsed") };
        assert!(common.keep_pins_on_exit, "the good line is read, the first of a key set twice kept");
        assert_eq!(warnings.len(), 4, "{warnings:?}");
        let lines = [
            ":4: VM_BALANCER_KEEP_PINS_ON_EXIT is already set",
            ":5: expected",
            ":1: VM_BALANCER_HIGH",
            ":3: VM_BALANCER_BOGUS",
        ];
        for (w, what) in warnings.iter().zip(lines) {
            assert!(w.contains(what), "{what}: {warnings:?}");
        }
        // A named file that is missing: going on with the defaults.
        let a = argv(&["vmb", "release", "--config", "/nonexistent/settings"]);
        let (cli, warnings) = parse_leniently(&a);
        assert!(cli.is_ok() && warnings[0].contains("cannot read the settings file"), "{warnings:?}");
    }

    #[test]
    fn release_reads_a_file_with_a_comment_in_another_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings");
        // "# réglages" in Latin-1: not UTF-8.
        std::fs::write(&path, b"# r\xe9glages\nVM_BALANCER_KEEP_PINS_ON_EXIT=true\n").unwrap();
        let a = argv(&["vmb", "release", "--config", path.to_str().unwrap()]);
        let (cli, warnings) = parse_leniently(&a);
        let Ok(Cli { command: Command::Release { common, .. }, .. }) = cli else { panic!("release not parsed") };
        assert!(common.keep_pins_on_exit && warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn the_config_file_is_found_on_the_command_line() {
        assert_eq!(config_path(&argv(&["vmb", "run", "--config", "/x"])), (PathBuf::from("/x"), true));
        assert_eq!(config_path(&argv(&["vmb", "run", "--config=/y"])), (PathBuf::from("/y"), true));
        // Without --config: the variable, else the default (not required). Not asserted here:
        // the test process's environment is shared between threads.
    }

    #[test]
    fn a_missing_default_file_is_fine_and_a_named_one_is_not() {
        let p = Path::new("/nonexistent/vm-balancer");
        assert!(SettingsFile::read(p, false).unwrap().entries.is_empty());
        assert!(matches!(SettingsFile::read(p, true), Err(SettingsError::Read { .. })));
    }

    #[test]
    fn the_shipped_example_parses_with_every_line_uncommented() {
        let text = include_str!("../systemd/vm-balancer.default");
        let uncommented: String = text
            .lines()
            .map(|l| if l.starts_with("#VM_BALANCER_") { &l[1..] } else { l })
            .collect::<Vec<_>>()
            .join("\n");
        let f = file(&uncommented);
        assert!(f.entries.len() > 20);
        let cmd = command_with(&f).unwrap();
        // One file for every subcommand: a setting only the daemon has (the metrics listener)
        // does not stop diagnose.
        for sub in ["run", "diagnose", "simulate", "release"] {
            cmd.clone().try_get_matches_from(["vm-balancer", sub]).unwrap();
        }
    }
}
