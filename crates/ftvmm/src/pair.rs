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
use ft_pair::standby::{self, Outcome, StandbyConfig};
use ft_pair::status::StandbyFigures;
use ft_pair::{End, Ending, Finished, PairError};
use logging_channel::{ChannelConfig, Psk};
use std::ffi::OsString;
use std::io::Write;
use std::sync::Arc;
use vmm::Vm;

/// Exit status of a backup whose primary is lost and which does not take over.
const PRIMARY_LOST_STATUS: u8 = 4;
/// Exit status of a side that lost the arbitration (or could not reach the lock) and stopped.
const FENCED_STATUS: u8 = 5;
/// Exit status of a run stopped by SIGTERM or SIGINT.
const SIGNAL_STATUS: u8 = 130;

/// Runs the primary role; returns the exit status.
pub(crate) fn run_primary(args: &Args) -> Result<u8, Failure> {
    let machine = machine_config(args)?;
    refuse_flags(args, "primary")?;
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
    refuse_flags(args, "backup")?;
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

/// Runs the standby role (`ft_pair::standby`); returns the exit status. A run that ends with
/// the pair still running elsewhere (this side lost its primary, or was fenced, or handed the
/// guest over with `--then backup`) starts this process again as a standby.
pub(crate) fn run_standby(args: &Args) -> Result<u8, Failure> {
    let machine = machine_config(args)?;
    refuse_flags(args, "standby")?;
    let listen = args.listen.clone().ok_or(
        "--role standby needs --listen ADDR (where it accepts a backup once it goes live; the \
         lock's owner record tells the next standby)",
    )?;
    if args.lock.is_none() {
        return Err(
            "--role standby needs --lock (the lock's owner says which side is live)".into(),
        );
    }
    let cfg = StandbyConfig {
        backup: BackupConfig {
            machine,
            pair: pair_config(args)?,
            live: live_config(args),
            primary: String::new(),
            listen: Some(listen),
        },
        poll: args.standby_poll,
    };
    let figures = standby::carried(std::env::var(standby::STANDBY_ENV).ok().as_deref());
    match standby::run(&cfg, host(args), figures)? {
        Outcome::Stopped => {
            eprintln!("ftvmm: standby: stopped while waiting (no guest ran here)");
            Ok(SIGNAL_STATUS)
        }
        Outcome::Ran(finished, figures) => end_standby(args, *finished, &figures),
    }
}

/// The end of a standby's run as a backup, or as the primary it became: as a backup's or a
/// primary's, but where those would leave the pair for an operator to re-protect, it waits
/// again as a standby (a fenced side attaches to the live side as its backup, never runs as a
/// primary: docs/OPERATIONS.md).
fn end_standby(args: &Args, finished: Finished, figures: &StandbyFigures) -> Result<u8, Failure> {
    let Finished {
        mut vm,
        result,
        end,
    } = finished;
    let again = |status: u8, why: &str| -> Result<u8, Failure> {
        if vmm::kick::stop_was_requested() {
            return Ok(status);
        }
        Err(standby_again(why, figures, None))
    };
    match end {
        End::Primary(ending) => {
            if let Some(why) = &ending.fenced {
                let _ = report::finish_because(
                    args,
                    &mut vm,
                    result,
                    &format!("error: this primary stopped: {why}"),
                );
                return again(
                    FENCED_STATUS,
                    "fenced as the primary: waiting to attach to the live side as its backup",
                );
            }
            let status = report::finish(args, &mut vm, result).map(|s| ending.status(s))?;
            match &ending.handed_over {
                Some(to) if to.then == Then::Backup => again(
                    status,
                    &format!(
                        "switchover done: waiting to attach to the new primary {}",
                        to.addr
                    ),
                ),
                _ => Ok(status),
            }
        }
        End::Backup => report::finish(args, &mut vm, result),
        End::PrimaryLost { reason } => {
            let _ = report::finish_because(args, &mut vm, result, &reason);
            again(
                PRIMARY_LOST_STATUS,
                "the primary is lost and this side did not take over",
            )
        }
        End::Reattach { primary, reason } => {
            tracing::warn!("attaching to {primary} again to heal this side's copy of the disk");
            Err(standby_again(
                "healing this side's copy",
                figures,
                Some(&reason),
            ))
        }
        End::Fenced { why } => {
            let reason =
                format!("error: the primary is lost but this backup may not take over: {why}");
            let _ = report::finish_because(args, &mut vm, result, &reason);
            again(
                FENCED_STATUS,
                "fenced as a backup: waiting for the live side",
            )
        }
    }
}

/// Replaces this process with the same command (`ftvmm --role standby ...`, same PID): a fresh
/// standby that waits for the live side, with its figures carried over (and, to heal a
/// mirrored copy, the divergence). Returns only when that fails.
fn standby_again(why: &str, figures: &StandbyFigures, healing: Option<&str>) -> Failure {
    use std::os::unix::process::CommandExt;
    let argv: Vec<String> = std::env::args().collect();
    tracing::warn!("standby again: {why}");
    let exe = std::env::current_exe().unwrap_or_else(|_| argv[0].clone().into());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(&argv[1..])
        .env(standby::STANDBY_ENV, standby::carry(figures));
    match healing {
        Some(reason) => cmd.env(ft_pair::backup::HEALING_ENV, reason),
        None => cmd.env_remove(ft_pair::backup::HEALING_ENV),
    };
    let err = cmd.exec();
    Failure {
        message: format!("cannot wait again as a standby: {err}"),
        status: 2,
    }
}

/// Refuses the flags given that `args.role` does not take ([`crate::cli::Role::refuses`]).
fn refuse_flags(args: &Args, role: &str) -> Result<(), Failure> {
    for flag in args.role.refuses() {
        let set = match *flag {
            "record" => args.record.is_some(),
            "log" => args.log.is_some(),
            "primary" => args.primary.is_some(),
            "restore" => args.restore.is_some(),
            "snapshot-on-exit" => args.snapshot_on_exit.is_some(),
            "stop-at-exit" => args.stop_at_exit.is_some(),
            _ => false,
        };
        if set {
            return Err(format!("--{flag} is not for --role {role}").into());
        }
    }
    Ok(())
}

fn pair_config(args: &Args) -> Result<PairConfig, Failure> {
    let path = args
        .key_file
        .as_ref()
        .ok_or("--role primary, backup and standby need --key-file PATH (a pre-shared key)")?;
    let psk = Psk::from_file(path).map_err(|e| Failure::from(e.to_string()))?;
    logging_channel::set_network_nice(args.channel_nice);
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
        drop_lagging_after: (!args.drop_lagging_after.is_zero()).then_some(args.drop_lagging_after),
        batch: ft_pair::link::BatchPolicy {
            run: args.batch_run,
            age: args.batch_age,
        },
        ack_timer: match args.ack_timer {
            crate::cli::AckTimerArg::Behind => ft_pair::config::AckTimer::Behind,
            crate::cli::AckTimerArg::Always => ft_pair::config::AckTimer::Always,
        },
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
        End::Reattach { primary, reason } => Err(attach_again(args, &primary, &reason)),
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
        Some(to) if to.then == Then::Backup => Err(become_backup(args, &to.addr)),
        _ => Ok(status),
    }
}

/// Replaces this process with `ftvmm --role backup --primary ADDR` and the same machine and
/// pair flags (what only a primary takes is left out; a configuration file's keys are written
/// out as flags). Returns only when that fails.
fn become_backup(args: &Args, addr: &str) -> Failure {
    use std::os::unix::process::CommandExt;
    let mut next = backup_argv(&args.argv);
    next.extend(["--role", "backup", "--primary", addr].map(OsString::from));
    tracing::warn!("switchover done: attaching to the new primary {addr} as its backup");
    let exe = std::env::current_exe().unwrap_or_else(|_| self_argv0());
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
fn attach_again(args: &Args, primary: &str, reason: &str) -> Failure {
    use std::os::unix::process::CommandExt;
    tracing::warn!("attaching to {primary} again to heal this side's copy of the disk");
    let exe = std::env::current_exe().unwrap_or_else(|_| self_argv0());
    let err = std::process::Command::new(exe)
        .args(&args.argv)
        .env(ft_pair::backup::HEALING_ENV, reason)
        .exec();
    Failure {
        message: format!("cannot attach to {primary} again: {err}"),
        status: 2,
    }
}

/// How this program was started (`argv[0]`), for when its path cannot be read.
fn self_argv0() -> std::path::PathBuf {
    std::env::args_os()
        .next()
        .unwrap_or_else(|| "ftvmm".into())
        .into()
}

/// A primary's arguments without the flags a backup does not take.
fn backup_argv(args: &[OsString]) -> Vec<OsString> {
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
        let text = a.to_str().unwrap_or_default();
        let flag = text.split('=').next().unwrap_or(text);
        if DROP_WITH_VALUE.contains(&flag) {
            if !text.contains('=') {
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
    use clap::Parser;

    #[test]
    fn a_primary_and_a_backup_refuse_every_flag_their_role_does_not_take() {
        for role in ["primary", "backup"] {
            let base = ["ftvmm", "--role", role, "--kernel", "k"];
            let args = Args::try_parse_from(base).unwrap();
            assert!(refuse_flags(&args, role).is_ok());
            for flag in args.role.refuses() {
                let with =
                    Args::try_parse_from(base.iter().chain(&[&*format!("--{flag}=1")])).unwrap();
                match refuse_flags(&with, role) {
                    Err(f) => assert_eq!(f.message, format!("--{flag} is not for --role {role}")),
                    Ok(()) => panic!("--{flag} accepted by --role {role}"),
                }
            }
        }
    }

    #[test]
    fn a_primary_from_a_config_file_becomes_a_backup_without_its_primary_only_keys() {
        let dir = std::env::temp_dir().join(format!("ftvmm-pair-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("vm1.toml");
        std::fs::write(
            &path,
            "role = \"primary\"\nkernel = \"k\"\nlisten = \"10.0.0.1:7000\"\n\
             primary = \"10.0.0.2:7000\"\nrestore = \"vm.snap\"\nkey-file = \"key\"\n",
        )
        .unwrap();
        let argv = ["ftvmm", "--config", path.to_str().unwrap(), "--memory=512M"];
        let args = crate::config::args_from(argv.map(OsString::from).to_vec()).unwrap();
        assert_eq!(args.restore, Some("vm.snap".into()));
        let next = backup_argv(&args.argv);
        assert_eq!(
            next,
            [
                "--memory=512M",
                "--kernel=k",
                "--key-file=key",
                "--listen=10.0.0.1:7000"
            ]
        );
    }

    #[test]
    fn a_primary_becomes_a_backup_with_its_machine_and_pair_flags() {
        let args: Vec<OsString> = [
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
        .map(OsString::from)
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
