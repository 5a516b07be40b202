//! The package's generated documentation: the man page vm-balancer(8) and the bash, zsh and
//! fish completions. Both are built from the clap definitions of `cli.rs` (every flag, its
//! help, default and `VM_BALANCER_*` variable), so neither can drift from `--help`.
//! `vm-balancer generate-assets DIR` writes them; `lab/package.sh` runs it before cargo-deb.
//!
//! The page is one page for the whole program, like the README: the usage line of each
//! subcommand (clap's own, as `--help` prints it), what each subcommand does, the flags every
//! subcommand shares once, then the flags of each subcommand. clap_mangen renders the option
//! lists; the few sections clap knows nothing of (files, exit status) are written here.

use std::path::{Path, PathBuf};

use clap::{Args as _, CommandFactory as _};
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use crate::cli::{Cli, Common};

/// The man page, as `write_all` names it (`lab/package.sh` gzips it).
pub const MAN_PAGE: &str = "vm-balancer.8";
/// The completions, named as each shell's completion directory expects.
pub const BASH_COMPLETION: &str = "vm-balancer.bash";
pub const ZSH_COMPLETION: &str = "_vm-balancer";
pub const FISH_COMPLETION: &str = "vm-balancer.fish";

/// A generated file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}")]
pub struct AssetError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The command line as the operator sees it: built (usage lines, bin names), with clap's
/// `help` subcommand and the hidden ones left out.
fn built_cli() -> clap::Command {
    let mut cmd = Cli::command();
    cmd.build();
    cmd
}

fn visible_subcommands(cmd: &clap::Command) -> Vec<&clap::Command> {
    cmd.get_subcommands().filter(|s| !s.is_hide_set() && s.get_name() != "help").collect()
}

/// The ids of the flags every subcommand shares (`Common`).
fn common_ids() -> Vec<clap::Id> {
    Common::augment_args(clap::Command::new("common")).get_arguments().map(|a| a.get_id().clone()).collect()
}

/// An options section titled `heading` listing `args`, rendered by clap_mangen (nothing when
/// `args` is empty).
fn options_section(heading: &str, args: Vec<clap::Arg>) -> Vec<u8> {
    let cmd = clap::Command::new("vm-balancer")
        .disable_help_flag(true)
        .disable_version_flag(true)
        .args(args.into_iter().map(|a| a.help_heading(heading.to_string())));
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = Man::new(cmd).render_options_section(&mut out);
    out
}

/// Text lines of a help string; an empty line starts a new paragraph inside the list item.
fn help_lines(roff: &mut Roff, text: &str) {
    for line in text.lines() {
        if line.trim().is_empty() {
            roff.control("IP", []);
        } else {
            roff.text([roman(line)]);
        }
    }
}

/// The roff source of vm-balancer(8).
pub fn man_page() -> Vec<u8> {
    let cmd = built_cli();
    let version = cmd.get_version().unwrap_or_default().to_string();
    let man = Man::new(cmd.clone())
        .title("VM-BALANCER")
        .section("8")
        .manual("System Administration")
        .source(format!("vm-balancer {version}"));
    let subs = visible_subcommands(&cmd);
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);

    let mut roff = Roff::default();
    roff.control("SH", ["SYNOPSIS"]);
    for (i, sub) in subs.iter().enumerate() {
        if i > 0 {
            roff.control("br", []);
        }
        let usage = (*sub).clone().render_usage().to_string();
        let usage = usage.trim().trim_start_matches("Usage:").trim();
        let name = format!("vm-balancer {}", sub.get_name());
        let rest = usage.strip_prefix(name.as_str()).unwrap_or(usage);
        roff.text([bold(name.as_str()), roman(rest)]);
    }

    roff.control("SH", ["DESCRIPTION"]);
    roff.text([roman(cmd.get_about().map(|a| a.to_string()).unwrap_or_default() + ".")]);
    roff.text([
        roman("It runs as a service ("),
        bold("vm-balancer.service"),
        roman(") that starts "),
        bold("vm-balancer run"),
        roman(". Every option below can also be set by the environment variable named with it, or by a "),
        roman("line VARIABLE=value in the settings file (see FILES). An option on the command line wins over "),
        roman("its variable, which wins over the settings file, which wins over the default. "),
        roman("SIGHUP makes "),
        bold("run"),
        roman(" read the settings file again."),
    ]);

    roff.control("SH", ["COMMANDS"]);
    for sub in &subs {
        roff.control("TP", []);
        roff.text([bold(format!("vm-balancer {}", sub.get_name()))]);
        let about = sub.get_long_about().or_else(|| sub.get_about()).map(|a| a.to_string()).unwrap_or_default();
        help_lines(&mut roff, &about);
    }
    let _ = roff.to_writer(&mut out);

    // -h and -V of the program itself.
    let _ = man.render_options_section(&mut out);
    let common = common_ids();
    if let Some(first) = subs.first() {
        let shared: Vec<clap::Arg> = first.get_arguments().filter(|a| common.contains(a.get_id())).cloned().collect();
        out.extend(options_section("Common options", shared));
    }
    for sub in &subs {
        let own: Vec<clap::Arg> = sub
            .get_arguments()
            .filter(|a| !common.contains(a.get_id()) && !a.is_hide_set() && a.get_id() != "help")
            .cloned()
            .collect();
        out.extend(options_section(&format!("Options of vm-balancer {}", sub.get_name()), own));
    }

    let mut roff = Roff::default();
    roff.control("SH", ["FILES"]);
    roff.control("TP", []);
    roff.text([italic(crate::settings::DEFAULT_PATH)]);
    roff.text([roman(
        "The settings file: VM_BALANCER_X=value lines, read by the agent itself (also at a reload). \
         Read when it exists; --config names another one.",
    )]);
    roff.control("TP", []);
    roff.text([italic("/lib/systemd/system/vm-balancer.service")]);
    roff.text([roman("The systemd unit.")]);
    roff.control("TP", []);
    roff.text([italic("/usr/share/doc/vm-balancer/README.md")]);
    roff.text([roman("How the balancers work, the flags in depth, the simulator.")]);
    roff.control("SH", ["EXIT STATUS"]);
    roff.text([roman(
        "0 on success, 1 on a failure at run time, 2 for a bad flag or setting (the service is then not restarted).",
    )]);
    roff.control("SH", ["SEE ALSO"]);
    roff.text([bold("systemctl"), roman("(1), "), bold("journalctl"), roman("(1), "), bold("virsh"), roman("(1)")]);
    let _ = roff.to_writer(&mut out);
    let _ = man.render_version_section(&mut out);
    once_preamble(&out)
}

/// Each rendering by clap_mangen starts with the same two-line preamble (it defines the
/// apostrophe string); the page needs it once, at the top.
fn once_preamble(page: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(page);
    let mut seen: Vec<&str> = Vec::new();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with(".ie \\n(.g .ds Aq") || line.starts_with(".el .ds Aq") {
            if seen.contains(&line) {
                continue;
            }
            seen.push(line);
        }
        out.push_str(line);
        out.push('\n');
    }
    out.into_bytes()
}

/// The completion script of `shell`. Without the hidden subcommands: not every generator
/// leaves them out by itself (zsh's offers them).
pub fn completion(shell: clap_complete::Shell) -> Vec<u8> {
    let full = Cli::command();
    let mut cmd = clap::Command::new("vm-balancer")
        .subcommand_required(full.is_subcommand_required_set())
        .subcommands(full.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
    if let Some(v) = full.get_version() {
        cmd = cmd.version(v.to_string());
    }
    if let Some(a) = full.get_about() {
        cmd = cmd.about(a.clone());
    }
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, BIN, &mut out);
    if shell == clap_complete::Shell::Bash { fix_bash_hyphen(&out) } else { out }
}

const BIN: &str = "vm-balancer";

/// clap_complete's bash script names the state of a subcommand two ways when the program's
/// name has a hyphen (`vm__balancer__subcmd__run` where it is set, `vm__subcmd__balancer__subcmd__run`
/// where it is matched), so no subcommand's flags complete (clap-rs/clap#6421). Spells the
/// matched labels as the set ones.
fn fix_bash_hyphen(script: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(script);
    let wrong = format!("{}__subcmd__", BIN.replace('-', "__subcmd__"));
    let right = format!("{}__subcmd__", BIN.replace('-', "__"));
    text.replace(&wrong, &right).into_bytes()
}

/// Writes the man page and the completions into `dir` (created when missing); returns the
/// files written.
pub fn write_all(dir: &Path) -> Result<Vec<PathBuf>, AssetError> {
    use clap_complete::Shell;
    std::fs::create_dir_all(dir).map_err(|source| AssetError { path: dir.to_path_buf(), source })?;
    let files = [
        (MAN_PAGE, man_page()),
        (BASH_COMPLETION, completion(Shell::Bash)),
        (ZSH_COMPLETION, completion(Shell::Zsh)),
        (FISH_COMPLETION, completion(Shell::Fish)),
    ];
    let mut written = Vec::new();
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|source| AssetError { path: path.clone(), source })?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every long flag of every visible subcommand, `--help` aside.
    fn every_flag() -> Vec<(String, String)> {
        let cmd = built_cli();
        visible_subcommands(&cmd)
            .iter()
            .flat_map(|s| {
                s.get_arguments()
                    .filter(|a| !a.is_hide_set())
                    .filter_map(|a| a.get_long())
                    .filter(|l| *l != "help")
                    .map(|l| (s.get_name().to_string(), format!("--{l}")))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// roff escapes `-` as `\-`; the page as a reader would search it.
    fn page_text() -> String {
        String::from_utf8(man_page()).unwrap().replace("\\-", "-")
    }

    #[test]
    fn the_man_page_documents_every_subcommand_and_flag() {
        let page = page_text();
        assert!(page.lines().any(|l| l.starts_with(".TH VM-BALANCER 8 ")), "{}", &page[..200]);
        for sub in ["run", "diagnose", "simulate", "release"] {
            assert!(page.contains(&format!("vm-balancer {sub}")), "{sub}");
            assert!(page.contains(&format!("OPTIONS OF VM-BALANCER {}", sub.to_uppercase())), "{sub}");
        }
        let flags = every_flag();
        assert!(flags.len() > 30, "{flags:?}");
        for (sub, flag) in flags {
            assert!(page.contains(&format!("\\fB{flag}\\fR")), "{flag} of {sub} missing from the page");
        }
        // Defaults and variables come from clap.
        assert!(page.contains("[default: 2s]"));
        assert!(page.contains("VM_BALANCER_QUANTUM"));
        assert!(!page.contains("generate-assets"), "hidden subcommand documented");
        assert_eq!(page.matches(".ds Aq").count(), 2, "one preamble");
    }

    #[test]
    fn shared_flags_are_listed_once() {
        let page = page_text();
        assert_eq!(page.matches("\\fB--quantum\\fR").count(), 1);
        assert_eq!(page.matches("\\fB--dry-run\\fR").count(), 1);
        // diagnose has its own --json, simulate has another: each under its subcommand.
        assert_eq!(page.matches("\\fB--json\\fR").count(), 2);
    }

    #[test]
    fn completions_know_the_subcommands_and_flags() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let text = String::from_utf8(completion(shell)).unwrap();
            // fish names a long flag `-l quantum`.
            let (quantum, cpus) = match shell {
                clap_complete::Shell::Fish => ("-l quantum", "-l cpus"),
                _ => ("--quantum", "--cpus"),
            };
            for word in ["diagnose", "simulate", "release", quantum, cpus] {
                assert!(text.contains(word), "{shell}: {word}");
            }
            assert!(!text.contains("generate-assets"), "{shell}: hidden subcommand offered");
        }
    }

    /// What bash offers for the words typed so far (the last one being completed), through the
    /// generated script's completion function.
    fn bash_offers(words: &[&str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("vm-balancer.bash");
        std::fs::write(&script, completion(clap_complete::Shell::Bash)).unwrap();
        let func = {
            let text = std::fs::read_to_string(&script).unwrap();
            let line = text.lines().find(|l| l.contains("complete -F")).unwrap().to_string();
            line.split_whitespace().skip_while(|w| *w != "-F").nth(1).unwrap().to_string()
        };
        let cword = words.len() - 1;
        let prev = if cword > 0 { words[cword - 1] } else { "" };
        let cmd = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={cword}; {func} vm-balancer '{}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            words.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" "),
            words[cword],
        );
        let out = std::process::Command::new("bash").arg("-c").arg(&cmd).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.is_empty()).map(str::to_string).collect()
    }

    #[test]
    fn bash_completes_subcommands_and_their_flags() {
        assert_eq!(bash_offers(&["vm-balancer", "r"]), ["run", "release"]);
        assert_eq!(bash_offers(&["vm-balancer", "run", "--qu"]), ["--quantum"]);
        assert_eq!(bash_offers(&["vm-balancer", "diagnose", "--js"]), ["--json"]);
        assert!(bash_offers(&["vm-balancer", "simulate", "--scenario", ""]).contains(&"bursty".to_string()));
    }

    #[test]
    fn write_all_writes_every_file_and_names_a_bad_directory() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_all(&dir.path().join("assets")).unwrap();
        assert_eq!(written.len(), 4);
        for p in &written {
            assert!(std::fs::metadata(p).unwrap().len() > 100, "{}", p.display());
        }
        let file = dir.path().join("a-file");
        std::fs::write(&file, "").unwrap();
        let e = write_all(&file).unwrap_err();
        assert_eq!(e.path, file);
    }
}
