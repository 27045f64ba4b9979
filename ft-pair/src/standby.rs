//! A standby (`--role standby`): a side that knows the pair's lock and key, waits, and attaches
//! as the backup of whichever side is live, as the lock's owner record names it
//! ([`crate::lock::owner_record`]: `role@host:pid listen=ADDR`). Once attached it is an
//! ordinary backup ([`crate::backup::run`]): it follows, and takes over when its primary is
//! lost. When that run ends without the guest ending (the primary lost and the lock lost to
//! another side, a stream that ended, a switchover that made it a backup again), the binary
//! starts it again as a standby: the pair is protected again with no command typed.
//!
//! Exactly one backup attaches at a time: the primary refuses a second one (`Refused`), and a
//! refused standby waits quietly until the lock changes (every takeover, and every backup a
//! primary loses, moves the epoch: docs/FAILOVER.md) or [`REFUSED_RETRY`] passes. Other
//! failures (nothing listens yet: a side that just won the lock binds its listener a moment
//! later) are retried with a backoff from [`FIRST_RETRY`] to [`MAX_RETRY`], at once whenever
//! the lock changes.

use crate::api::{status_only, ApiFn, Request, StatusFn, SwappableApi};
use crate::config::{BackupConfig, Host};
use crate::error::PairError;
use crate::lock::{self, Arbiter, LockState};
use crate::status::{LiveSide, StandbyFigures, StandbyStatus, Status};
use crate::Finished;
use ft_core::live::{NetQueue, SerialSource};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The first wait after a failed attempt (nothing listening yet, a connection lost).
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest wait between failed attempts against an unchanged lock.
pub const MAX_RETRY: Duration = Duration::from_secs(5);
/// After a refusal (the live side has a backup), the next attempt against an unchanged lock.
pub const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// The environment variable through which a standby started again (the same process, the same
/// flags: see the binary) carries its figures over.
pub const STANDBY_ENV: &str = "FTVMM_STANDBY";

/// A standby: the backup it becomes, and how it watches the lock.
#[derive(Clone)]
pub struct StandbyConfig {
    /// The backup it becomes: the pair, the machine, its `--listen` (required: where it
    /// accepts backups once it goes live, and what its owner record says). Its `primary` is
    /// taken from the lock at each attempt.
    pub backup: BackupConfig,
    /// How often it reads the lock while it waits.
    pub poll: Duration,
}

/// How a standby's run ended.
pub enum Outcome {
    /// SIGTERM or SIGINT while it waited: no VM was running.
    Stopped,
    /// It attached, and its run as a backup (or as the primary it became) ended.
    Ran(Box<Finished>, StandbyFigures),
}

/// The figures as [`STANDBY_ENV`] carries them: `attempts,refusals,attaches`.
pub fn carry(f: &StandbyFigures) -> String {
    format!("{},{},{}", f.attach_attempts, f.refusals, f.attaches)
}

/// The figures a standby started again carries (see [`carry`]); zero when there are none or
/// they do not read.
pub fn carried(value: Option<&str>) -> StandbyFigures {
    let n: Vec<u64> = value
        .unwrap_or_default()
        .split(',')
        .map_while(|v| v.trim().parse().ok())
        .collect();
    match n.as_slice() {
        [attempts, refusals, attaches] => StandbyFigures {
            attach_attempts: *attempts,
            refusals: *refusals,
            attaches: *attaches,
            last_attempt: None,
        },
        _ => StandbyFigures::default(),
    }
}

/// What a waiting standby knows, for its status.
struct View {
    state: &'static str,
    waiting_for: String,
    live: Option<LiveSide>,
    since: Instant,
}

/// A standby's state, shared with its status and the host it lends the backup.
struct Shared {
    figures: Mutex<StandbyFigures>,
    view: Mutex<View>,
    lock: String,
    listen: String,
}

impl Shared {
    fn figures(&self) -> StandbyFigures {
        self.figures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut StandbyFigures)) {
        f(&mut self.figures.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Says why it waits; a reason that changed is a warning, the same one again is not.
    fn waiting(&self, state: &'static str, why: String) {
        let mut v = self.view.lock().unwrap_or_else(|e| e.into_inner());
        if v.waiting_for != why {
            tracing::warn!("standby: waiting: {why}");
        }
        v.state = state;
        v.waiting_for = why;
    }

    fn status(self: &Arc<Self>) -> StatusFn {
        let me = self.clone();
        Arc::new(move || {
            let v = me.view.lock().unwrap_or_else(|e| e.into_inner());
            Status::Standby(Box::new(StandbyStatus {
                role: "standby",
                host: vmm::host::status(),
                state: v.state,
                waiting_for: v.waiting_for.clone(),
                lock: me.lock.clone(),
                listen: me.listen.clone(),
                live: v.live.clone(),
                waiting_s: v.since.elapsed().as_secs_f64(),
                figures: me.figures(),
            }))
        })
    }
}

/// Waits for a live side and attaches to it; returns once SIGTERM/SIGINT came while it
/// waited, or once its run as a backup (or as the primary it became) ended.
pub fn run(
    cfg: &StandbyConfig,
    host: Arc<dyn Host>,
    figures: StandbyFigures,
) -> Result<Outcome, PairError> {
    let spec = cfg.backup.pair.lock.clone().ok_or_else(|| {
        PairError::Config(
            "--role standby needs --lock: the lock tells it which side is live".into(),
        )
    })?;
    let listen = cfg.backup.listen.clone().ok_or_else(|| {
        PairError::Config(
            "--role standby needs --listen ADDR: where it accepts a backup once it goes live"
                .into(),
        )
    })?;
    if lock::listen_of(&lock::owner_record("standby", Some(&listen))).is_none() {
        return Err(PairError::Config(format!(
            "--role standby: --listen {listen} is no address another host can reach (a port, \
             and not 0.0.0.0): the lock's owner record must tell the next standby where to attach"
        )));
    }
    cfg.backup.pair.check()?;
    let arbiter = lock::open(&spec)?;
    vmm::kick::stop_on_signals().map_err(PairError::io("cannot install signal handlers"))?;

    let shared = Arc::new(Shared {
        figures: Mutex::new(figures),
        view: Mutex::new(View {
            state: "waiting",
            waiting_for: String::new(),
            live: None,
            since: Instant::now(),
        }),
        lock: arbiter.spec(),
        listen: listen.clone(),
    });
    let own_status = shared.status();
    let own_api = status_only(own_status.clone(), "standby");
    let api = SwappableApi::new(own_api.clone());
    let status = Arc::new(Mutex::new(own_status.clone()));
    let dynamic_status: StatusFn = {
        let current = status.clone();
        Arc::new(move || {
            let f = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
            f()
        })
    };
    let _served = host.serve(api.api(), dynamic_status)?;
    let lent: Arc<dyn Host> = Arc::new(StandbyHost {
        inner: host,
        api,
        status,
        own_api,
        own_status,
        shared: shared.clone(),
    });
    tracing::warn!(
        "standby: watching lock {} for the live side; will accept backups on {listen} once live",
        arbiter.spec()
    );

    let mut retry = Retry::new();
    loop {
        if vmm::kick::stop_was_requested() {
            tracing::warn!("standby: stopped on a signal while waiting");
            return Ok(Outcome::Stopped);
        }
        let Some((addr, live)) = live_side(arbiter.as_ref(), &listen, &shared) else {
            std::thread::sleep(cfg.poll);
            continue;
        };
        if !retry.due(&live) {
            std::thread::sleep(cfg.poll);
            continue;
        }
        shared.update(|f| f.attach_attempts += 1);
        {
            let mut v = shared.view.lock().unwrap_or_else(|e| e.into_inner());
            v.state = "attaching";
            v.waiting_for = format!("attaching to {addr}");
        }
        tracing::info!(
            "standby: attaching to {addr} ({} at epoch {})",
            live.owner,
            live.epoch
        );
        let mut backup = cfg.backup.clone();
        backup.primary = addr.clone();
        match crate::backup::run(&backup, lent.clone()) {
            Ok(finished) => return Ok(Outcome::Ran(Box::new(finished), shared.figures())),
            Err(e) => {
                let refused = matches!(e, PairError::Refused { .. });
                let wait = retry.failed(&live, refused);
                shared.update(|f| {
                    f.refusals += u64::from(refused);
                    f.last_attempt = Some(e.to_string());
                });
                let next = if refused {
                    format!("the lock changes or {} s pass", wait.as_secs())
                } else {
                    format!("the lock changes or {} ms pass", wait.as_millis())
                };
                // A refusal, or the same failure again, is said once: the standby waits quietly.
                let why = match &e {
                    PairError::Refused { reason, .. } => {
                        format!("{addr} refused this standby ({reason}); trying again when {next}")
                    }
                    other => format!("cannot attach to {addr}: {other}; trying again when {next}"),
                };
                shared.waiting("waiting", why);
            }
        }
    }
}

/// The live side's address and the lock's state as a standby reads them, or None (and why
/// it waits, in the status) when there is none it can attach to.
fn live_side(arbiter: &dyn Arbiter, own: &str, shared: &Shared) -> Option<(String, LiveSide)> {
    let state = match arbiter.read() {
        Ok(s) => s,
        Err(e) => {
            shared.view.lock().unwrap_or_else(|e| e.into_inner()).live = None;
            shared.waiting("waiting", format!("{e}"));
            return None;
        }
    };
    let LockState {
        epoch,
        owner,
        active,
    } = state;
    let listen = lock::listen_of(&owner).map(String::from);
    let live = LiveSide {
        owner: owner.clone(),
        epoch,
        listen: listen.clone(),
    };
    shared.view.lock().unwrap_or_else(|e| e.into_inner()).live = Some(live.clone());
    let why = match (&listen, active) {
        (_, false) => format!(
            "no side is live: the lock is free at epoch {epoch} (a primary is started by hand)"
        ),
        (None, true) => format!(
            "the live side {owner} (epoch {epoch}) does not say where it accepts backups: it \
             was started without a reachable --listen, or by an older ftvmm"
        ),
        (Some(addr), true) if addr == own => format!(
            "the lock names this standby's own address {addr} as the live side (epoch {epoch}): \
             a side on this host that is gone; waiting for the lock to move"
        ),
        (Some(addr), true) => return Some((addr.clone(), live)),
    };
    shared.waiting("waiting", why);
    None
}

/// When the next attempt is due: at once when the lock's epoch or owner changed since the
/// last failure, else after that failure's wait.
struct Retry {
    /// The lock's epoch and owner the last failure was against.
    against: Option<(u64, String)>,
    not_before: Instant,
    delay: Duration,
}

impl Retry {
    fn new() -> Retry {
        Retry {
            against: None,
            not_before: Instant::now(),
            delay: FIRST_RETRY,
        }
    }

    fn due(&mut self, live: &LiveSide) -> bool {
        if self
            .against
            .as_ref()
            .is_some_and(|(e, o)| (*e, o.as_str()) != (live.epoch, live.owner.as_str()))
        {
            // The lock moved: a takeover, or a backup lost. Try at once, with a fresh backoff.
            *self = Retry::new();
        }
        Instant::now() >= self.not_before
    }

    /// A failed attempt against `live`: how long until the next one unless the lock moves.
    fn failed(&mut self, live: &LiveSide, refused: bool) -> Duration {
        self.against = Some((live.epoch, live.owner.clone()));
        let wait = if refused {
            REFUSED_RETRY
        } else {
            let d = self.delay;
            self.delay = (self.delay * 2).min(MAX_RETRY);
            d
        };
        self.not_before = Instant::now() + wait;
        wait
    }
}

/// The host a standby lends the backup it becomes: the same serial line, tap and so on, but
/// the backup's API socket and metrics are served by the standby's own servers (which go on
/// answering across the attach), with the standby's figures in them.
struct StandbyHost {
    inner: Arc<dyn Host>,
    api: SwappableApi,
    status: Arc<Mutex<StatusFn>>,
    own_api: ApiFn,
    own_status: StatusFn,
    shared: Arc<Shared>,
}

/// Gives the standby's servers back to the standby when the backup's run ends.
struct Lent {
    api: SwappableApi,
    status: Arc<Mutex<StatusFn>>,
    own_api: ApiFn,
    own_status: StatusFn,
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.api.set(self.own_api.clone());
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = self.own_status.clone();
    }
}

impl Host for StandbyHost {
    fn serial_input(&self) -> Result<SerialSource, PairError> {
        self.inner.serial_input()
    }

    fn serial_output(&self) -> Result<Box<dyn Write + Send>, PairError> {
        self.inner.serial_output()
    }

    fn net(
        &self,
        config: &vmm::VmConfig,
    ) -> Result<Option<(vmm::tap::Tap, Arc<NetQueue>)>, PairError> {
        self.inner.net(config)
    }

    /// The backup serves once it received the VM: this standby is attached from here.
    fn serve(&self, api: ApiFn, status: StatusFn) -> Result<Box<dyn Send>, PairError> {
        let addr = self
            .shared
            .view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .live
            .as_ref()
            .and_then(|l| l.listen.clone())
            .unwrap_or_default();
        self.shared.update(|f| {
            f.attaches += 1;
            f.last_attempt = Some(format!("attached to {addr}"));
        });
        let shared = self.shared.clone();
        let with_figures: StatusFn = Arc::new(move || status().with_standby(shared.figures()));
        let answer_status = with_figures.clone();
        self.api.set(Arc::new(move |req| match req {
            Request::Status => answer_status().to_json(),
            other => api(other),
        }));
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = with_figures;
        Ok(Box::new(Lent {
            api: self.api.clone(),
            status: self.status.clone(),
            own_api: self.own_api.clone(),
            own_status: self.own_status.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(epoch: u64, owner: &str) -> LiveSide {
        LiveSide {
            owner: owner.into(),
            epoch,
            listen: lock::listen_of(owner).map(String::from),
        }
    }

    #[test]
    fn a_refused_standby_waits_until_the_lock_moves() {
        let mut r = Retry::new();
        let a = live(2, "primary@a:1 listen=10.0.0.1:7000");
        assert!(r.due(&a));
        assert_eq!(r.failed(&a, true), REFUSED_RETRY);
        assert!(
            !r.due(&a),
            "tried again against the same lock right after a refusal"
        );
        // A takeover: the next epoch, another owner: at once.
        let b = live(3, "backup@b:2 listen=10.0.0.2:7000");
        assert!(r.due(&b));
        // Nothing listens there yet: backoff, doubling up to the limit.
        let waits: Vec<Duration> = (0..8).map(|_| r.failed(&b, false)).collect();
        assert_eq!(waits[0], FIRST_RETRY);
        assert_eq!(waits[1], FIRST_RETRY * 2);
        assert_eq!(*waits.last().unwrap(), MAX_RETRY);
        // The primary lost its backup and won the next epoch itself: at once again.
        assert!(r.due(&live(4, "backup@b:2 listen=10.0.0.2:7000")));
    }

    #[test]
    fn figures_are_carried_over() {
        let f = StandbyFigures {
            attach_attempts: 7,
            refusals: 3,
            attaches: 2,
            last_attempt: Some("x".into()),
        };
        let back = carried(Some(&carry(&f)));
        assert_eq!(
            (back.attach_attempts, back.refusals, back.attaches),
            (7, 3, 2)
        );
        assert_eq!(carried(None).attach_attempts, 0);
        assert_eq!(carried(Some("1,2")).attach_attempts, 0);
        assert_eq!(carried(Some("a,b,c")).attaches, 0);
    }
}
