//! `vspc import --from-vspcpy PREFIX`: read vSPC.py's File-backend store
//! (its `shelve` at PREFIX), print its mappings, and write them as vspc's
//! port map where `vspc -f PREFIX` will read it. The daemon does the same
//! by itself at its first start; this does it on request, shows the result,
//! and can write the map elsewhere. vSPC.py's files are only read.

use clap::Parser;
use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use vspc_backends::file;

/// Import vSPC.py's port map (its File backend's shelve) into vspc's.
///
/// Prints `name:uuid:port` for every VM (vSPC.py's listing format), then
/// writes vspc's map. vSPC.py's files are read, never changed.
#[derive(Debug, Clone, Parser)]
#[command(name = "vspc import", bin_name = "vspc import", version)]
pub struct ImportArgs {
    /// The prefix vSPC.py was given with -f: its store is PREFIX (dbm.gnu)
    /// or PREFIX.dat and PREFIX.dir (dbm.dumb).
    #[arg(long, value_name = "PREFIX")]
    pub from_vspcpy: PathBuf,

    /// Write vspc's map to this file [default: where `vspc -f PREFIX` reads
    /// it, PREFIX.vspc-map.toml].
    #[arg(long, value_name = "FILE")]
    pub to: Option<PathBuf>,

    /// Print the mappings and write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Replace vspc's map if it exists (stop vspc first).
    #[arg(long)]
    pub force: bool,
}

/// Run `vspc import`; `args` starts with the word `import`.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args = match ImportArgs::try_parse_from(args) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vspc import: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &ImportArgs) -> Result<(), String> {
    let started = std::time::Instant::now();
    let prefix = args.from_vspcpy.to_string_lossy().into_owned();
    let target = match &args.to {
        Some(t) => {
            std::path::absolute(t).map_err(|e| format!("cannot use {}: {e}", t.display()))?
        }
        None => file::resolve(&prefix).map_err(|e| e.0)?.map,
    };
    if !args.dry_run && !args.force && target.exists() {
        return Err(format!(
            "vspc's map {} exists already; give --force to replace it (with vspc stopped), \
             --to FILE to write elsewhere, or --dry-run to only print",
            target.display()
        ));
    }
    let got = vspc_backends::vspcpy::read(&args.from_vspcpy)?;
    let took = started.elapsed();
    let mut out = std::io::stdout().lock();
    for r in &got.records {
        let port = r.port.map(|p| p.to_string()).unwrap_or_default();
        writeln!(out, "{}:{}:{port}", r.name, r.uuid)
            .map_err(|e| format!("cannot print the mappings: {e}"))?;
    }
    out.flush()
        .map_err(|e| format!("cannot print the mappings: {e}"))?;
    let files: Vec<String> = got.files.iter().map(|f| f.display().to_string()).collect();
    if args.dry_run {
        eprintln!(
            "vspc import: read {} VMs from vSPC.py's {} store {} in {} ms; --dry-run: wrote nothing",
            got.records.len(),
            got.format,
            files.join(" and "),
            took.as_millis()
        );
        return Ok(());
    }
    file::write_map(&target, &got.records)
        .map_err(|e| format!("cannot write vspc's map {}: {e}", target.display()))?;
    eprintln!(
        "vspc import: imported {} VMs from vSPC.py's {} store {} into {} in {} ms",
        got.records.len(),
        got.format,
        files.join(" and "),
        target.display(),
        started.elapsed().as_millis()
    );
    Ok(())
}
