//! `--role standalone` (optionally recording) and `--role replay`: one VMM, no peer.

use crate::cli::{machine_config, open_net, serial_sink, serial_source, Args, Failure, Role};
use crate::report;
use devices::disk::{Disk, ImageFile};
use ft_core::disk::DiskMode;
use ft_core::live::{LiveBoundary, NetPort};
use ft_core::log::{Header, LogReader, LogWriter, VERSION};
use ft_core::record::Recorder;
use ft_core::replay::Replayer;
use ft_core::Boundary;
use std::fs::File;
use vmm::vm::kernel_cmdline;
use vmm::{config_identity, Vm};

/// Runs the standalone or replay role; returns the exit status.
pub(crate) fn run(args: &Args) -> Result<u8, Failure> {
    let mut config = machine_config(args)?;
    if let (Role::Replay, Some(path)) = (args.role, &args.log) {
        // A replay uses the recording's mechanisms, or refuses on a host that cannot.
        let file =
            File::open(path).map_err(|e| format!("cannot open log {}: {e}", path.display()))?;
        let (_, header) = LogReader::new(std::io::BufReader::new(file))
            .map_err(|e| format!("cannot replay {}: {e}", path.display()))?;
        config.follow = header.mechanisms;
    }
    let config = config;
    match (args.role, &args.record, &args.log) {
        (Role::Standalone, _, Some(_)) => {
            return Err("--log is for --role replay; to record, use --record"
                .to_string()
                .into())
        }
        (Role::Replay, Some(_), _) => {
            return Err("--record is for --role standalone".to_string().into())
        }
        _ if args.disk_mode != DiskMode::Shared => {
            return Err("--disk-mode is for --role primary and --role backup"
                .to_string()
                .into())
        }
        (Role::Replay, None, None) => {
            return Err("--role replay needs --log PATH".to_string().into())
        }
        _ => {}
    }
    let (hash, summary) = config_identity(&config, &kernel_cmdline(&config))?;
    let live = || -> Result<LiveBoundary, String> {
        let mut live =
            LiveBoundary::with_clock(serial_source(args)?, serial_sink(args)?, args.clock)
                .with_kick_bound(args.checkpoint_bound);
        if let Some((tap, queue)) = open_net(&config)? {
            let tx = tap.writer().map_err(|e| format!("tap: {e}"))?;
            live = live.with_net(NetPort {
                rx: queue,
                tx: Box::new(tx),
            });
        }
        Ok(match &args.serial_input_after {
            Some(marker) => live.input_after(marker.as_bytes()),
            None => live,
        })
    };
    let mut boundary: Box<dyn Boundary> = match (args.role, &args.record, &args.log) {
        (Role::Standalone, Some(path), _) => {
            let file = File::create(path)
                .map_err(|e| format!("cannot create log {}: {e}", path.display()))?;
            let out = std::io::BufWriter::with_capacity(1 << 16, file);
            let mut live = live()?;
            let rtc_epoch = live.rtc_epoch().map_err(|e| e.to_string())?;
            let header = Header {
                version: VERSION,
                config_hash: hash,
                config_summary: summary.clone(),
                rtc_epoch,
                mechanisms: Some(vmm::vm::mechanisms(&config)?),
            };
            let writer =
                LogWriter::new(out, &header).map_err(|e| format!("cannot start recording: {e}"))?;
            Box::new(
                Recorder::new(live, Box::new(writer), rtc_epoch)
                    .map_err(|e| format!("cannot start recording: {e}"))?,
            )
        }
        (Role::Standalone, None, _) => Box::new(live()?),
        (Role::Replay, _, Some(path)) => {
            let file =
                File::open(path).map_err(|e| format!("cannot open log {}: {e}", path.display()))?;
            let mut replayer = Replayer::new(
                std::io::BufReader::with_capacity(1 << 16, file),
                serial_sink(args)?,
            )
            .map_err(|e| format!("cannot replay {}: {e}", path.display()))?;
            replayer.require_end_record();
            replayer
                .check_config(hash, &summary)
                .map_err(|e| e.to_string())?;
            Box::new(replayer)
        }
        _ => unreachable!("checked above"),
    };
    vmm::kick::stop_on_signals().map_err(|e| format!("cannot install signal handlers: {e}"))?;
    let track_dirty = args.record.is_some();
    let image: Option<Box<dyn Disk>> = match (&config.disk, args.role) {
        (Some(path), Role::Standalone) => {
            Some(Box::new(ImageFile::open(path).map_err(|e| {
                format!("cannot open disk image {}: {e}", path.display())
            })?))
        }
        _ => None,
    };
    let mut vm = Vm::new(&config, boundary.as_mut(), track_dirty, image)?;
    vm.set_checkpoint_delta(args.checkpoint_delta == crate::cli::OnOff::On);
    vm.stop_at_exit(args.stop_at_exit);
    tracing::info!("kernel command line: {}", vm.cmdline());
    if let Some(path) = &args.restore {
        let snap = vmm::snapshot::Snapshot::read_file(path).map_err(|e| e.to_string())?;
        vm.restore(&snap)?;
        boundary.restored(vm.now_ns());
        tracing::info!(
            "restored {} (rip {:#x}) state-digest={}",
            path.display(),
            snap.vcpu.rip(),
            vm.state_digest().unwrap_or(0)
        );
        drop(snap);
        vmm::memory::trim_heap();
    }
    let (_handle, control) = vmm::control::channel();
    let result = vm.run(boundary.as_mut(), &control);
    report::finish(args, &mut vm, result)
}
