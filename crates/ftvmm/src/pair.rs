//! `--role primary` and `--role backup`: the flags become typed configurations
//! ([`ft_pair::config`]), the node runs ([`ft_pair::primary::run`], [`ft_pair::backup::run`]),
//! and how it ended becomes the report and the exit status. The pair itself is ft-pair's.

use crate::cli::{machine_config, open_net, serial_sink, serial_source, AckArg, Args, Failure};
use crate::report;
use ft_core::live::{NetQueue, SerialSource};
use ft_pair::api::{ApiFn, StatusFn, Then};
use ft_pair::config::{BackupConfig, Host, LiveConfig, PairConfig, PrimaryConfig};
use ft_pair::console::Console;
use ft_pair::link::AckMode;
use ft_pair::serve::ApiServer;
use ft_pair::{End, Ending, Finished, PairError};
use logging_channel::{ChannelConfig, Psk};
use std::io::Write;
use std::sync::Arc;
use vmm::Vm;

/// Exit status of a backup whose primary is lost and which does not take over.
const PRIMARY_LOST_STATUS: u8 = 4;
/// Exit status of a side that lost the arbitration (or could not reach the lock) and stopped.
const FENCED_STATUS: u8 = 5;

/// Runs the primary role; returns the exit status.
pub(crate) fn run_primary(args: &Args) -> Result<u8, Failure> {
    let machine = machine_config(args)?;
    for (flag, set) in [
        ("--record", args.record.is_some()),
        ("--log", args.log.is_some()),
        ("--primary", args.primary.is_some()),
        ("--stop-at-exit", args.stop_at_exit.is_some()),
    ] {
        if set {
            return Err(format!("{flag} is not for --role primary").into());
        }
    }
    let listen = args
        .listen
        .clone()
        .ok_or("--role primary needs --listen ADDR (where backups attach)")?;
    let cfg = PrimaryConfig {
        machine,
        pair: pair_config(args)?,
        live: live_config(args),
        listen,
        restore: args.restore.clone(),
    };
    let finished = ft_pair::primary::run(&cfg, host(args))?;
    end(args, finished)
}

/// Runs the backup role; returns the exit status.
pub(crate) fn run_backup(args: &Args) -> Result<u8, Failure> {
    let machine = machine_config(args)?;
    for (flag, set) in [
        ("--record", args.record.is_some()),
        ("--log", args.log.is_some()),
        ("--restore", args.restore.is_some()),
        ("--snapshot-on-exit", args.snapshot_on_exit.is_some()),
        ("--stop-at-exit", args.stop_at_exit.is_some()),
    ] {
        if set {
            return Err(format!("{flag} is not for --role backup").into());
        }
    }
    let primary = args
        .primary
        .clone()
        .ok_or("--role backup needs --primary ADDR (the primary's --listen address)")?;
    let cfg = BackupConfig {
        machine,
        pair: pair_config(args)?,
        live: live_config(args),
        primary,
        listen: args.listen.clone(),
    };
    let finished = ft_pair::backup::run(&cfg, host(args))?;
    end(args, finished)
}

fn pair_config(args: &Args) -> Result<PairConfig, Failure> {
    let path = args
        .key_file
        .as_ref()
        .ok_or("--role primary and --role backup need --key-file PATH (a pre-shared key)")?;
    let psk = Psk::from_file(path).map_err(|e| Failure::from(e.to_string()))?;
    let mut channel = ChannelConfig::new(psk);
    channel.log_buffer = usize::try_from(args.log_buffer).unwrap_or(usize::MAX);
    channel.timeout = args.failover_timeout;
    channel.unacked_timeout = args.unacked_timeout;
    Ok(PairConfig {
        channel,
        ack: match args.ack {
            AckArg::Received => AckMode::Received,
            AckArg::Executed => AckMode::Executed,
        },
        max_lag: args.max_lag,
        lock: args.lock.clone(),
        disk: args.disk_mode,
    })
}

fn live_config(args: &Args) -> LiveConfig {
    LiveConfig {
        clock: args.clock,
        checkpoint_bound: args.checkpoint_bound,
        input_after: args
            .serial_input_after
            .as_ref()
            .map(|m| m.as_bytes().to_vec()),
        checkpoint_delta: args.checkpoint_delta == crate::cli::OnOff::On,
    }
}

/// What a node opens on this host, as the flags say: with `--api-socket`, the guest's console
/// is served there too.
struct FlagsHost(Args, Option<Arc<Console>>);

fn host(args: &Args) -> Arc<dyn Host> {
    let console = args.api_socket.as_ref().map(|_| Console::new());
    Arc::new(FlagsHost(args.clone(), console))
}

impl Host for FlagsHost {
    fn serial_input(&self) -> Result<SerialSource, PairError> {
        let source = serial_source(&self.0).map_err(|e| PairError::Host(e.into()))?;
        Ok(match &self.1 {
            Some(console) => console.input(source),
            None => source,
        })
    }

    fn serial_output(&self) -> Result<Box<dyn Write + Send>, PairError> {
        let sink = serial_sink(&self.0).map_err(|e| PairError::Host(e.into()))?;
        Ok(match &self.1 {
            Some(console) => console.output(sink),
            None => sink,
        })
    }

    fn serial_released(&self) -> Option<ft_core::replay::SerialTap> {
        let console = self.1.clone()?;
        Some(Box::new(move |bytes| console.released(bytes)))
    }

    fn net(
        &self,
        config: &vmm::VmConfig,
    ) -> Result<Option<(vmm::tap::Tap, Arc<NetQueue>)>, PairError> {
        open_net(config).map_err(|e| PairError::Host(e.into()))
    }

    fn serve(&self, api: ApiFn, status: StatusFn) -> Result<Box<dyn Send>, PairError> {
        let api = match &self.0.api_socket {
            Some(path) => Some(
                ApiServer::start(path, api, self.1.clone())
                    .map_err(|e| PairError::Host(e.into()))?,
            ),
            None => None,
        };
        let metrics = match &self.0.metrics {
            Some(addr) => {
                Some(ft_pair::metrics::serve(addr, status).map_err(|e| PairError::Host(e.into()))?)
            }
            None => None,
        };
        Ok(Box::new((api, metrics)))
    }
}

impl From<PairError> for Failure {
    fn from(e: PairError) -> Failure {
        Failure {
            message: e.to_string(),
            status: 2,
        }
    }
}

/// The end of a node's run: the report, and the exit status decided from how it ended.
fn end(args: &Args, finished: Finished) -> Result<u8, Failure> {
    let Finished {
        mut vm,
        result,
        end,
    } = finished;
    match end {
        End::Primary(ending) => end_as_primary(args, &mut vm, result, ending),
        End::Backup => report::finish(args, &mut vm, result),
        End::PrimaryLost { reason } => {
            let _ = report::finish_because(args, &mut vm, result, &reason);
            Ok(PRIMARY_LOST_STATUS)
        }
        End::Reattach { primary, reason } => Err(attach_again(&primary, &reason)),
        End::Fenced { why } => {
            let reason =
                format!("error: the primary is lost but this backup may not take over: {why}");
            let _ = report::finish_because(args, &mut vm, result, &reason);
            Ok(FENCED_STATUS)
        }
    }
}

/// The end of a run as a primary (also of a backup that went live): the report, the exit
/// status, and after a switchover with `--then backup`, this process becomes the new
/// primary's backup.
fn end_as_primary(
    args: &Args,
    vm: &mut Vm,
    result: Result<vmm::vcpu::Stop, vmm::VmError>,
    ending: Ending,
) -> Result<u8, Failure> {
    if let Some(why) = &ending.fenced {
        let _ = report::finish_because(
            args,
            vm,
            result,
            &format!("error: this primary stopped: {why}"),
        );
        return Ok(FENCED_STATUS);
    }
    let status = report::finish(args, vm, result).map(|s| ending.status(s))?;
    match &ending.handed_over {
        Some(to) if to.then == Then::Backup => Err(become_backup(&to.addr)),
        _ => Ok(status),
    }
}

/// Replaces this process with `ftvmm --role backup --primary ADDR` and the same machine and
/// pair flags (what only a primary takes is left out). Returns only when that fails.
fn become_backup(addr: &str) -> Failure {
    use std::os::unix::process::CommandExt;
    let argv: Vec<String> = std::env::args().collect();
    let mut next = backup_argv(&argv[1..]);
    next.extend([
        "--role".to_string(),
        "backup".into(),
        "--primary".into(),
        addr.into(),
    ]);
    tracing::warn!("switchover done: attaching to the new primary {addr} as its backup");
    let exe = std::env::current_exe().unwrap_or_else(|_| argv[0].clone().into());
    let err = std::process::Command::new(exe)
        .args(&next)
        .env_remove(ft_pair::backup::HEALING_ENV)
        .exec();
    Failure {
        message: format!("cannot become the new primary's backup: {err}"),
        status: 2,
    }
}

/// A backup whose mirrored copy diverged replaces itself with the same command (`ftvmm --role
/// backup --primary ADDR ...`): the attach brings its copy up to date with the blocks that
/// differ (the divergence goes to the next run's status). Returns only when that fails.
fn attach_again(primary: &str, reason: &str) -> Failure {
    use std::os::unix::process::CommandExt;
    let argv: Vec<String> = std::env::args().collect();
    tracing::warn!("attaching to {primary} again to heal this side's copy of the disk");
    let exe = std::env::current_exe().unwrap_or_else(|_| argv[0].clone().into());
    let err = std::process::Command::new(exe)
        .args(&argv[1..])
        .env(ft_pair::backup::HEALING_ENV, reason)
        .exec();
    Failure {
        message: format!("cannot attach to {primary} again: {err}"),
        status: 2,
    }
}

/// A primary's arguments without the flags a backup does not take.
fn backup_argv(args: &[String]) -> Vec<String> {
    const DROP_WITH_VALUE: [&str; 6] = [
        "--role",
        "--primary",
        "--restore",
        "--snapshot-on-exit",
        "--record",
        "--log",
    ];
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let flag = a.split('=').next().unwrap_or(a);
        if DROP_WITH_VALUE.contains(&flag) {
            if !a.contains('=') {
                it.next();
            }
            continue;
        }
        out.push(a.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_becomes_a_backup_with_its_machine_and_pair_flags() {
        let args: Vec<String> = [
            "--role",
            "primary",
            "--listen",
            "10.0.0.1:7000",
            "--restore",
            "vm.snap",
            "--kernel",
            "k",
            "--snapshot-on-exit=x.snap",
            "--key-file",
            "key",
            "--lock",
            "file:/l",
            "--memory",
            "256M",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            backup_argv(&args),
            [
                "--listen",
                "10.0.0.1:7000",
                "--kernel",
                "k",
                "--key-file",
                "key",
                "--lock",
                "file:/l",
                "--memory",
                "256M"
            ]
        );
    }
}
