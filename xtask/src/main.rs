//! `cargo xtask gen`: write vspc's man pages and shell completions into
//! `packaging/` from the clap definitions the binaries parse with.
//! `cargo xtask check`: fail if those files, or the README's flag tables,
//! are behind the clap definitions. The tests below run the check, so
//! `cargo test --workspace` fails on drift and says how to fix it.
//!
//! The files are kept in the repository so that packaging (`cargo deb`)
//! needs no build step of its own and a change to a flag shows in review as
//! a change to the man page.

use clap::{Command, CommandFactory};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// vspc-client's flags, from its own source file (a binary's module), so
/// the man page is made from exactly what the client parses.
#[allow(dead_code)]
#[path = "../../vspc/src/bin/vspc-client/cli.rs"]
mod client_cli;

const FILES_SECTION: &str = "\
Files (as the Debian package installs them):
  /etc/vspc/vspc.toml          the settings, one key per long flag (a conffile)
  /var/lib/vspc/               the File backend's port map (StateDirectory=vspc)
  /var/log/vspc/               transcripts of the Logging backend (LogsDirectory=vspc)
  /usr/lib/systemd/system/vspc.service  the unit; `vspc --check-config` runs before each start

Commands:
  vspc import --from-vspcpy PREFIX   import vSPC.py's port map (see vspc-import(1))

See also: vspc-import(1), vspc-client(1).";

/// `vspc` as the man page and the completions describe it.
fn vspc() -> Command {
    vspc::config::Config::command()
        .about("the virtual Serial Port Concentrator daemon for VMware ESXi")
        .long_about(
            "ESXi hosts connect each VM's network serial port to the proxy port; every VM gets \
             its own console port, kept across reboots, vMotions and (with the File backend) \
             restarts, where any number of telnet users and tools attach. A drop-in replacement \
             for vSPC.py's server: the same flags and defaults. Settings come from the flags and \
             from a TOML file (--config), whose keys are the long flag names.",
        )
        .after_long_help(FILES_SECTION)
}

/// `vspc import`, a command of its own.
fn vspc_import() -> Command {
    vspc::import_cmd::ImportArgs::command()
        .name("vspc-import")
        .bin_name("vspc import")
}

fn vspc_client() -> Command {
    client_cli::Cli::command()
}

/// Every generated file: its path under the repository and its bytes.
fn generated() -> Result<Vec<(PathBuf, Vec<u8>)>, String> {
    let mut out = Vec::new();
    for (name, cmd) in [
        ("vspc", vspc()),
        ("vspc-import", vspc_import()),
        ("vspc-client", vspc_client()),
    ] {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut buf)
            .map_err(|e| format!("cannot render the {name} man page: {e}"))?;
        out.push((PathBuf::from(format!("packaging/man/{name}.1")), buf));
    }
    out.push((
        PathBuf::from("packaging/vspc.toml"),
        conffile(&vspc()).into_bytes(),
    ));
    use clap_complete::Shell;
    for (name, mut cmd) in [
        // The completions know `vspc import` as a subcommand.
        (
            "vspc",
            vspc().subcommand(vspc::import_cmd::ImportArgs::command().name("import")),
        ),
        ("vspc-client", vspc_client()),
    ] {
        for (shell, file) in [
            (Shell::Bash, format!("{name}.bash")),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, name, &mut buf);
            out.push((PathBuf::from(format!("packaging/completions/{file}")), buf));
        }
    }
    Ok(out)
}

/// Settings the package sets, unlike the flags' defaults.
const PACKAGE_SETTINGS: &[(&str, &str)] = &[("persist-file", "\"/var/lib/vspc\"")];

/// `/etc/vspc/vspc.toml`: every setting, its help as a comment, commented
/// out at its default (or an example), but for the few the package sets.
fn conffile(cmd: &Command) -> String {
    let mut out = String::from(
        "# vspc's settings: one key per long flag of vspc(1); a flag on the command line\n\
         # wins. `vspc --check-config /etc/vspc/vspc.toml` checks this file, and the\n\
         # unit runs that before every start. A commented line shows the default.\n\
         # Backend options go in backend-args, e.g. the Logging backend's transcripts:\n\
         #   backend = \"File,Logging\"\n\
         #   backend-args = \"-l /var/log/vspc -m 0640\"\n",
    );
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if matches!(
            long,
            "help" | "version" | "config" | "check-config" | "backend-help"
        ) {
            continue;
        }
        out.push('\n');
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(|h| h.to_string())
            .unwrap_or_default();
        let mut line = String::from("#");
        for word in help.split_whitespace() {
            if line.len() + word.len() + 1 > 78 {
                out.push_str(&line);
                out.push('\n');
                line = String::from("#");
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
        if let Some((_, v)) = PACKAGE_SETTINGS.iter().find(|(k, _)| *k == long) {
            out.push_str(&format!("{long} = {v}\n"));
            continue;
        }
        let takes = arg.get_action().takes_values();
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let value = if !takes {
            "true".to_string()
        } else if let [only] = defaults.as_slice() {
            if only.parse::<f64>().is_ok() {
                only.clone()
            } else {
                format!("{only:?}")
            }
        } else {
            let name = arg
                .get_value_names()
                .and_then(|n| n.first())
                .map(|n| n.to_string())
                .unwrap_or_else(|| "VALUE".into());
            format!("{name:?}")
        };
        out.push_str(&format!("# {long} = {value}\n"));
    }
    out
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The problems with the README's "## Flags" tables: every long flag of
/// `vspc` must have a row, every flag in a row must exist, and a default
/// in a row must be clap's default.
fn readme_problems(readme: &str, cmd: &Command) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(start) = readme.find("\n## Flags\n") else {
        return vec!["README.md has no \"## Flags\" section".into()];
    };
    let section = &readme[start + 1..];
    let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
    let section = &section[..end];
    // long flag -> the default column of its row.
    let mut rows: Vec<(String, String)> = Vec::new();
    for line in section.lines() {
        if !line.starts_with("| `") {
            continue;
        }
        // `\|` inside a cell is a literal bar.
        let line = line.replace("\\|", "\u{0}");
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // "", flag, default, meaning, "".
        if cells.len() < 4 {
            continue;
        }
        let default = cells[2].replace('\u{0}', "|");
        let cells = &cells[1..];
        for part in cells[0].split('`') {
            if let Some(rest) = part.strip_prefix("--") {
                let long: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                    .collect();
                rows.push((long, default.clone()));
            }
        }
    }
    for arg in cmd.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        if arg.is_hide_set() || long == "help" || long == "version" {
            continue;
        }
        let Some((_, default)) = rows.iter().find(|(l, _)| l == long) else {
            problems.push(format!(
                "README.md's flag tables have no row for --{long} (add one under \"## Flags\")"
            ));
            continue;
        };
        let clap_default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        if let [only] = clap_default.as_slice() {
            if default != only {
                problems.push(format!(
                    "README.md's row for --{long} gives the default {default:?}, but the flag's \
                     default is {only:?}"
                ));
            }
        }
    }
    for (long, _) in &rows {
        if !cmd.get_arguments().any(|a| a.get_long() == Some(long)) {
            problems.push(format!(
                "README.md's flag tables have a row for --{long}, which vspc does not have"
            ));
        }
    }
    problems
}

/// Everything that is behind the clap definitions.
fn check(root: &Path) -> Result<Vec<String>, String> {
    let mut problems = Vec::new();
    for (path, bytes) in generated()? {
        let on_disk = std::fs::read(root.join(&path)).ok();
        if on_disk.as_deref() != Some(bytes.as_slice()) {
            problems.push(format!(
                "{} is behind the clap definitions: run `cargo xtask gen` and commit it",
                path.display()
            ));
        }
    }
    let readme = std::fs::read_to_string(root.join("README.md"))
        .map_err(|e| format!("cannot read README.md: {e}"))?;
    problems.extend(readme_problems(&readme, &vspc::config::Config::command()));
    Ok(problems)
}

fn gen(root: &Path) -> Result<(), String> {
    for (path, bytes) in generated()? {
        let full = root.join(&path);
        if let Some(dir) = full.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        std::fs::write(&full, bytes)
            .map_err(|e| format!("cannot write {}: {e}", full.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let root = repo_root();
    let result = match std::env::args().nth(1).as_deref() {
        Some("gen") => gen(&root),
        Some("check") => check(&root).and_then(|p| {
            if p.is_empty() {
                Ok(())
            } else {
                Err(p.join("\n"))
            }
        }),
        _ => Err("usage: cargo xtask gen | cargo xtask check".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_completions_and_readme_flags_follow_clap() {
        let problems = check(&repo_root()).expect("the check runs");
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn a_readme_row_missing_or_wrong_is_named() {
        let cmd = vspc::config::Config::command();
        let readme = "x\n## Flags\n\n| flag | default | meaning |\n| --- | --- | --- |\n\
                      | `--proxy-port P` | 1337 | port |\n| `--bogus` | | nothing |\n## Next\n";
        let p = readme_problems(readme, &cmd).join("\n");
        assert!(
            p.contains("default \"1337\"") && p.contains("\"13370\""),
            "{p}"
        );
        assert!(p.contains("row for --bogus"), "{p}");
        assert!(p.contains("no row for --admin-port"), "{p}");
    }

    #[test]
    fn the_man_pages_say_what_they_document() {
        let all = generated().expect("generated");
        let page = |name: &str| {
            let (_, b) = all.iter().find(|(p, _)| p.ends_with(name)).expect("page");
            String::from_utf8(b.clone()).expect("roff is text")
        };
        assert!(page("vspc.1").contains("check\\-config"));
        assert!(page("vspc-import.1").contains("from\\-vspcpy"));
        assert!(page("vspc-client.1").contains("client\\-lock\\-mode"));
        assert!(String::from_utf8_lossy(
            &all.iter()
                .find(|(p, _)| p.ends_with("vspc.bash"))
                .expect("bash")
                .1
        )
        .contains("import"));
    }
}
