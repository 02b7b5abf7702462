//! `cbtsim serve`: the host as a running service (HTTPS, NBD, a control
//! socket) until SIGINT or SIGTERM. All the work is in the `service` crate;
//! this parses flags, prints where it listens and waits for a signal.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Args;
use service::{Daemon, ServeConfig};
use signal_hook::consts::{SIGINT, SIGTERM};

use super::Ctx;

/// Arguments of `cbtsim serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The HTTPS address (a self-signed certificate is made once per datastore).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Serve plain HTTP instead of HTTPS (for tests).
    #[arg(long)]
    pub plain_http: bool,
    /// The NBD address; exports are VM/DISK (live) and VM/DISK@SNAPSHOT.
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:10809")]
    pub nbd: SocketAddr,
    /// Allow addresses other than loopback (NBD has no authentication).
    #[arg(long)]
    pub allow_remote: bool,
    /// Read the password of user root from this file (first line);
    /// otherwise from CBTSIM_PASSWORD.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Export the points of this backup repository over NBD too, read-only, as
    /// repo:POINT/DISK (read in place from the chunks, each checked).
    #[arg(long, value_name = "DIR")]
    pub repo: Option<PathBuf>,
    /// Print where it listens as one line of JSON.
    #[arg(long)]
    pub json: bool,
    /// The most changed areas one QueryChangedDiskAreas answer of the
    /// vSphere API (/sdk) holds; clients page for the rest (ESXi: 2000).
    #[arg(long, value_name = "N", default_value_t = service::vsphere::DEFAULT_MAX_AREAS as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_areas: u32,
}

fn password(a: &ServeArgs) -> anyhow::Result<String> {
    let p = match &a.password_file {
        Some(f) => {
            let text =
                std::fs::read_to_string(f).with_context(|| format!("cannot read --password-file {}", f.display()))?;
            text.lines().next().unwrap_or("").trim_end_matches('\r').to_owned()
        }
        None => std::env::var("CBTSIM_PASSWORD").unwrap_or_default(),
    };
    Ok(p)
}

/// Runs `cbtsim serve`.
pub fn run(ctx: &Ctx, a: &ServeArgs) -> anyhow::Result<()> {
    let Some(datastore) = ctx.datastore.clone() else {
        bail!("no datastore: pass --datastore DIR or set CBTSIM_DATASTORE");
    };
    // Signals are caught before anything starts, so a signal during the
    // start still shuts down cleanly.
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).context("cannot handle signals")?;
    let config = ServeConfig {
        datastore,
        listen: a.listen,
        plain_http: a.plain_http,
        nbd: a.nbd,
        allow_remote: a.allow_remote,
        password: password(a)?,
        repository: a.repo.clone(),
        max_areas: a.max_areas as usize,
    };
    let daemon = Daemon::start(config)?;
    let s = daemon.status().clone();
    for (what, addr) in [("HTTP", a.listen), ("NBD", a.nbd)] {
        if !addr.ip().is_loopback() {
            eprintln!(
                "cbtsim: warning: {what} listens on {addr}, reachable from other machines (NBD has no authentication)"
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        println!("serving datastore {} (pid {})", s.datastore.display(), s.pid);
        println!("  web:     {} (user root)", s.web);
        println!(
            "  nbd:     {} and {}",
            s.nbd_uri("VM/DISK"),
            s.nbd_uri("VM/DISK@SNAPSHOT")
        );
        if let Some(r) = &s.repository {
            println!(
                "  backups: {} (points of {})",
                s.nbd_uri("repo:POINT/DISK"),
                r.display()
            );
        }
        println!("  control: {}", s.control.display());
        println!("SIGINT (Ctrl-C) or SIGTERM stops it");
    }
    std::io::Write::flush(&mut std::io::stdout())?;
    let signal = signals.forever().next();
    eprintln!(
        "cbtsim serve: {}, stopping: guest workloads stop, VMs close",
        match signal {
            Some(SIGINT) => "SIGINT",
            Some(SIGTERM) => "SIGTERM",
            _ => "signal",
        }
    );
    if let Some(w) = daemon.shutdown() {
        bail!("{w}");
    }
    eprintln!("cbtsim serve: stopped");
    Ok(())
}
