//! `ftvmm`: a fault-tolerant KVM hypervisor for one single-vCPU guest.
//!
//! Diagnostics go to stderr; stdout carries only the guest's serial output (with
//! `--serial stdio`). The last line on stderr of every run that built a VM is
//! `ftvmm: exits=<N> exit-digest=<hex>`.
//!
//! [`standalone`] runs the standalone and replay roles; [`pair`] turns the flags of a primary
//! or a backup into a configuration and runs the node (the pair itself is the `ft-pair`
//! crate); `ftvmm ctl` talks to a running one through its API socket ([`ctl`], served by
//! [`status`]).

mod cli;
mod ctl;
mod metrics;
mod pair;
mod report;
mod standalone;
mod status;

use clap::Parser;
use cli::{Args, Role};
use std::process::ExitCode;

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("ctl") {
        return ctl::main();
    }
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match args.log_format {
        cli::LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        cli::LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    let result = match args.role {
        Role::Standalone | Role::Replay => standalone::run(&args),
        Role::Primary => pair::run_primary(&args),
        Role::Backup => pair::run_backup(&args),
    };
    match result {
        Ok(status) => ExitCode::from(status),
        Err(f) => {
            eprintln!("ftvmm: error: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}
