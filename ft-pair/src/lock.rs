//! Arbitration: the test-and-set on a lock block that decides, when a pair loses its channel,
//! which side goes on (DESIGN.md section 6). Split brain is impossible because only the side
//! whose test-and-set succeeds in the current epoch may emit anything unacknowledged, and the
//! test-and-set is atomic (docs/FAILOVER.md argues it case by case).
//!
//! The lock holds an epoch, an owner and a state. A pair forms at epoch E (the primary holds the
//! lock at E; the backup learns E at attach). When either side loses its peer it tries
//! `test_and_set(E)`: move the epoch to E+1 with itself as owner, only if the epoch is still E.
//! One side wins; the other finds E+1 and stops.
//!
//! Two backends, one trait ([`Arbiter`]):
//! - [`FileLock`] (`--lock file:PATH`): a 512-byte block in a file (or block device) on storage
//!   both hosts see; read-check-write under an open-file-description lock (`F_OFD_SETLKW`) and
//!   `fsync`. Which shared filesystems make that atomic across hosts is in docs/FAILOVER.md.
//! - [`EtcdLock`] (`--lock etcd:HOST:PORT[,HOST:PORT...]/KEY`): the same test-and-set as an etcd
//!   transaction (compare the epoch key's value, then put), with the owner under a lease that
//!   expires when the owner stops renewing it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// Errors of arbitration. A side that gets one must not emit anything it cannot prove safe.
#[derive(Debug, Error)]
pub enum LockError {
    /// The lock cannot be reached (file missing, storage or etcd down).
    #[error("lock {spec} is unreachable: {why}")]
    Unreachable {
        /// The lock as `--lock` named it (`file:PATH`, `etcd:...`).
        spec: String,
        /// What the file system or etcd said.
        why: String,
    },
    /// The lock block holds something that is not a valid lock: it is left as it is.
    #[error(
        "lock {spec} is corrupt ({why}); it was not overwritten: repair or recreate it by hand"
    )]
    Corrupt {
        /// The lock as `--lock` named it (`file:PATH`, `etcd:...`).
        spec: String,
        /// What is wrong with the block.
        why: String,
    },
    /// Another owner holds the lock.
    #[error("lock {spec} is held by {owner} at epoch {epoch}")]
    Held {
        /// The lock as `--lock` named it (`file:PATH`, `etcd:...`).
        spec: String,
        /// Who holds it (role, host, process).
        owner: String,
        /// The epoch it holds it at.
        epoch: u64,
    },
    /// A `--lock` value that is not `file:PATH` or `etcd:ENDPOINTS/KEY`.
    #[error("--lock {0}: expected file:PATH or etcd:HOST:PORT[,HOST:PORT...]/KEY")]
    Spec(String),
}

/// What the lock holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockState {
    /// Raised by every successful test-and-set.
    pub epoch: u64,
    /// Who won the last one (a name that says host and process).
    pub owner: String,
    /// Whether the owner is live (false after a clean release).
    pub active: bool,
}

/// The outcome of a test-and-set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Race {
    /// This side won: it owns the lock at this epoch.
    Won(u64),
    /// Another side got there first (or the epoch had already moved on).
    Lost(LockState),
}

/// A lock that a pair arbitrates on.
pub trait Arbiter: Send + Sync {
    /// What the lock holds now.
    fn read(&self) -> Result<LockState, LockError>;
    /// Takes the lock for a primary starting fresh: only if it is free (never taken, released,
    /// or its owner's claim expired). Returns the new epoch.
    fn claim(&self, owner: &str) -> Result<u64, LockError>;
    /// Atomically: if the epoch is `expected`, raise it by one with `owner` as owner.
    fn test_and_set(&self, expected: u64, owner: &str) -> Result<Race, LockError>;
    /// Marks the lock free (a clean shutdown), if `owner` still holds it at `epoch`.
    fn release(&self, epoch: u64, owner: &str) -> Result<(), LockError>;
    /// The lock as the user named it.
    fn spec(&self) -> String;
}

/// Opens the lock named by a `--lock` value.
pub fn open(spec: &str) -> Result<Box<dyn Arbiter>, LockError> {
    if let Some(path) = spec.strip_prefix("file:") {
        if path.is_empty() {
            return Err(LockError::Spec(spec.into()));
        }
        return Ok(Box::new(FileLock::new(path)));
    }
    if let Some(rest) = spec.strip_prefix("etcd:") {
        let (endpoints, key) = rest
            .split_once('/')
            .filter(|(e, k)| !e.is_empty() && !k.is_empty())
            .ok_or_else(|| LockError::Spec(spec.into()))?;
        return Ok(Box::new(EtcdLock::new(
            endpoints.split(',').map(String::from).collect(),
            key.to_string(),
        )?));
    }
    Err(LockError::Spec(spec.into()))
}

/// A name for this side in the lock: role, host name and process id.
pub fn owner_name(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{role}@{host}:{}", std::process::id())
}

/// What follows an owner's name in the lock when it says where it accepts backups.
const LISTEN_TAG: &str = " listen=";

/// The owner record a side writes into the lock: [`owner_name`], and where it accepts backups
/// once it is live (`role@host:pid listen=ADDR`), so that a standby can find the live side
/// from the lock alone. `listen` is left out when it is no address another host can connect
/// to: none, port 0 (picked when bound), or an unspecified address (`0.0.0.0`, `[::]`).
pub fn owner_record(role: &str, listen: Option<&str>) -> String {
    let name = owner_name(role);
    match listen.filter(|l| reachable_listen(l)) {
        Some(l) => format!("{name}{LISTEN_TAG}{l}"),
        None => name,
    }
}

/// Where the owner named by an owner record accepts backups, if the record says
/// (see [`owner_record`]; records written by an older ftvmm do not).
pub fn listen_of(owner: &str) -> Option<&str> {
    let (_, addr) = owner.rsplit_once(LISTEN_TAG)?;
    (!addr.is_empty() && !addr.contains(char::is_whitespace)).then_some(addr)
}

/// Whether `listen` is an address another host can connect to as it is.
fn reachable_listen(listen: &str) -> bool {
    match listen.parse::<std::net::SocketAddr>() {
        Ok(a) => a.port() != 0 && !a.ip().is_unspecified(),
        // A host name: taken as given (port 0 still is no port).
        Err(_) => listen.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
        }),
    }
}

// --- file ---------------------------------------------------------------------------------

/// The lock block's size: one sector.
pub const BLOCK: usize = 512;
const MAGIC: &[u8; 8] = b"FTVMLOCK";
const BLOCK_VERSION: u16 = 1;
const MAX_OWNER: usize = 256;

/// The lock block in a file on shared storage.
///
/// ```text
/// 0   magic "FTVMLOCK"      8 bytes
/// 8   version u16 LE        1
/// 10  state u8              0 free, 1 active
/// 11  reserved u8           0
/// 12  epoch u64 LE
/// 20  owner length u16 LE   at most 256
/// 22  owner                 UTF-8
/// 508 crc32c u32 LE         of bytes 0..508
/// ```
pub struct FileLock {
    path: PathBuf,
}

/// An open-file-description lock on the whole block, released when dropped (with its file).
struct Held(File);

impl FileLock {
    /// The lock block in `path`.
    pub fn new(path: impl AsRef<Path>) -> FileLock {
        FileLock {
            path: path.as_ref().to_path_buf(),
        }
    }

    fn unreachable(&self, why: impl ToString) -> LockError {
        LockError::Unreachable {
            spec: self.spec(),
            why: why.to_string(),
        }
    }

    fn corrupt(&self, why: impl ToString) -> LockError {
        LockError::Corrupt {
            spec: self.spec(),
            why: why.to_string(),
        }
    }

    /// Opens the file and takes the OFD write lock on the block (blocking until other holders
    /// let go). `create` makes a missing file (a primary's first start).
    fn lock(&self, create: bool) -> Result<Held, LockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| self.unreachable(e))?;
        let fl = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: BLOCK as libc::off_t,
            l_pid: 0,
        };
        loop {
            // SAFETY: F_OFD_SETLKW reads one `struct flock`, which `fl` is, and the fd is open
            // for the lifetime of `file`. The lock belongs to this open file description and
            // goes with it.
            let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLKW, &fl) };
            if r == 0 {
                return Ok(Held(file));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(self.unreachable(format!("cannot lock it: {e}")));
            }
        }
    }

    /// Reads the block: `None` when the file is empty (never written).
    fn read_block(&self, held: &Held) -> Result<Option<LockState>, LockError> {
        let len = held.0.metadata().map_err(|e| self.unreachable(e))?.len();
        if len == 0 {
            return Ok(None);
        }
        let mut b = [0u8; BLOCK];
        held.0
            .read_exact_at(&mut b, 0)
            .map_err(|e| self.corrupt(format!("shorter than a {BLOCK}-byte block: {e}")))?;
        decode_block(&b).map(Some).map_err(|why| self.corrupt(why))
    }

    /// Writes the block as held by `owner` at `epoch`.
    fn write_owner(&self, held: &Held, epoch: u64, owner: &str) -> Result<(), LockError> {
        let state = LockState {
            epoch,
            owner: owner.into(),
            active: true,
        };
        self.write_block(held, &state)
    }

    fn write_block(&self, held: &Held, state: &LockState) -> Result<(), LockError> {
        let b = encode_block(state).map_err(|why| self.corrupt(why))?;
        held.0
            .write_all_at(&b, 0)
            .and_then(|_| held.0.sync_data())
            .map_err(|e| self.unreachable(format!("cannot write it: {e}")))
    }
}

/// Why a block is not a lock block, or a state cannot be written as one.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BlockError {
    /// Encoding: the owner name does not fit in the block (more than 256 bytes of UTF-8).
    #[error("owner name longer than {MAX_OWNER} bytes")]
    OwnerTooLong,
    /// Decoding: the first 8 bytes are not `FTVMLOCK`, so the file or key holds something else
    /// (or nothing was ever written there).
    #[error("no FTVMLOCK magic: not an ftvmm lock block")]
    NoMagic,
    /// Decoding: the CRC32C in the last 4 bytes does not match the rest (a torn or corrupted
    /// write).
    #[error("checksum mismatch")]
    Checksum,
    /// Decoding: the block was written in a layout version this build does not read (the number
    /// is the block's version).
    #[error("block version {0}, this ftvmm knows {BLOCK_VERSION}")]
    Version(u16),
    /// Decoding: the checksum holds but the owner length exceeds 256 or the active flag is
    /// neither 0 nor 1.
    #[error("impossible owner length or state")]
    Impossible,
    /// Decoding: the owner bytes are not valid UTF-8.
    #[error("owner is not UTF-8")]
    OwnerNotUtf8,
}

/// The block for `state` (an owner longer than 256 bytes is an error).
pub fn encode_block(state: &LockState) -> Result<[u8; BLOCK], BlockError> {
    let owner = state.owner.as_bytes();
    if owner.len() > MAX_OWNER {
        return Err(BlockError::OwnerTooLong);
    }
    let mut b = [0u8; BLOCK];
    b[..8].copy_from_slice(MAGIC);
    b[8..10].copy_from_slice(&BLOCK_VERSION.to_le_bytes());
    b[10] = u8::from(state.active);
    b[12..20].copy_from_slice(&state.epoch.to_le_bytes());
    b[20..22].copy_from_slice(&(owner.len() as u16).to_le_bytes());
    b[22..22 + owner.len()].copy_from_slice(owner);
    let crc = crc32c::crc32c(&b[..BLOCK - 4]);
    b[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}

/// The state a block holds, or why it is not a lock block.
pub fn decode_block(b: &[u8; BLOCK]) -> Result<LockState, BlockError> {
    if &b[..8] != MAGIC {
        return Err(BlockError::NoMagic);
    }
    let crc = u32::from_le_bytes([b[508], b[509], b[510], b[511]]);
    if crc32c::crc32c(&b[..BLOCK - 4]) != crc {
        return Err(BlockError::Checksum);
    }
    let version = u16::from_le_bytes([b[8], b[9]]);
    if version != BLOCK_VERSION {
        return Err(BlockError::Version(version));
    }
    let len = u16::from_le_bytes([b[20], b[21]]) as usize;
    if len > MAX_OWNER || b[10] > 1 {
        return Err(BlockError::Impossible);
    }
    let owner = std::str::from_utf8(&b[22..22 + len])
        .map_err(|_| BlockError::OwnerNotUtf8)?
        .to_string();
    let mut epoch = [0u8; 8];
    epoch.copy_from_slice(&b[12..20]);
    Ok(LockState {
        epoch: u64::from_le_bytes(epoch),
        owner,
        active: b[10] == 1,
    })
}

impl Arbiter for FileLock {
    fn read(&self) -> Result<LockState, LockError> {
        let held = self.lock(false)?;
        Ok(self.read_block(&held)?.unwrap_or(LockState {
            epoch: 0,
            owner: String::new(),
            active: false,
        }))
    }

    fn claim(&self, owner: &str) -> Result<u64, LockError> {
        let held = self.lock(true)?;
        let now = self.read_block(&held)?;
        if let Some(s) = &now {
            if s.active && s.owner != owner {
                return Err(LockError::Held {
                    spec: self.spec(),
                    owner: s.owner.clone(),
                    epoch: s.epoch,
                });
            }
        }
        let epoch = now.map_or(0, |s| s.epoch) + 1;
        self.write_owner(&held, epoch, owner)?;
        Ok(epoch)
    }

    fn test_and_set(&self, expected: u64, owner: &str) -> Result<Race, LockError> {
        let held = self.lock(false)?;
        let now = self
            .read_block(&held)?
            .ok_or_else(|| self.corrupt("empty: no pair was ever formed on it"))?;
        if now.epoch != expected {
            return Ok(Race::Lost(now));
        }
        let epoch = expected + 1;
        self.write_owner(&held, epoch, owner)?;
        Ok(Race::Won(epoch))
    }

    fn release(&self, epoch: u64, owner: &str) -> Result<(), LockError> {
        let held = self.lock(false)?;
        if let Some(mut s) = self.read_block(&held)? {
            if s.epoch == epoch && s.owner == owner {
                s.active = false;
                self.write_block(&held, &s)?;
            }
        }
        Ok(())
    }

    fn spec(&self) -> String {
        format!("file:{}", self.path.display())
    }
}

// --- etcd ---------------------------------------------------------------------------------

/// How long an owner's claim survives without renewal.
const LEASE_TTL: i64 = 5;

/// The lock as two etcd keys: `KEY/epoch` (the epoch, never expires) and `KEY/owner` (the
/// owner, under a lease its holder renews; gone when the holder dies).
pub struct EtcdLock {
    endpoints: Vec<String>,
    key: String,
    rt: tokio::runtime::Runtime,
    lease: std::sync::Mutex<Option<i64>>,
}

impl EtcdLock {
    /// The lock at `key` on the etcd cluster at `endpoints` (host:port each).
    pub fn new(endpoints: Vec<String>, key: String) -> Result<EtcdLock, LockError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-lock")
            .enable_all()
            .build()
            .map_err(|e| LockError::Unreachable {
                spec: format!("etcd:{}/{key}", endpoints.join(",")),
                why: format!("cannot start a runtime: {e}"),
            })?;
        Ok(EtcdLock {
            endpoints,
            key,
            rt,
            lease: std::sync::Mutex::new(None),
        })
    }

    fn unreachable(&self, why: impl ToString) -> LockError {
        LockError::Unreachable {
            spec: self.spec(),
            why: why.to_string(),
        }
    }

    fn keys(&self) -> (String, String) {
        (format!("{}/epoch", self.key), format!("{}/owner", self.key))
    }

    async fn client(&self) -> Result<etcd_client::Client, LockError> {
        let opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(3));
        etcd_client::Client::connect(&self.endpoints, Some(opts))
            .await
            .map_err(|e| self.unreachable(e))
    }

    async fn read_async(
        &self,
        client: &mut etcd_client::Client,
    ) -> Result<(Option<u64>, LockState), LockError> {
        let (ek, ok) = self.keys();
        let epoch = client
            .get(ek.as_str(), None)
            .await
            .map_err(|e| self.unreachable(e))?;
        let owner = client
            .get(ok.as_str(), None)
            .await
            .map_err(|e| self.unreachable(e))?;
        let epoch = match epoch.kvs().first() {
            None => None,
            Some(kv) => Some(
                kv.value_str()
                    .ok()
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or_else(|| LockError::Corrupt {
                        spec: self.spec(),
                        why: format!("{ek} is not a number"),
                    })?,
            ),
        };
        let owner = owner
            .kvs()
            .first()
            .and_then(|kv| kv.value_str().ok().map(String::from));
        Ok((
            epoch,
            LockState {
                epoch: epoch.unwrap_or(0),
                active: owner.is_some(),
                owner: owner.unwrap_or_default(),
            },
        ))
    }

    /// Compare the epoch key with `expected` (absent when `expected` is None), then put the new
    /// epoch and the owner under a fresh lease; keeps the lease alive from then on.
    async fn swap(
        &self,
        client: &mut etcd_client::Client,
        expected: Option<u64>,
        epoch: u64,
        owner: &str,
    ) -> Result<bool, LockError> {
        use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
        let (ek, ok) = self.keys();
        let lease = client
            .lease_grant(LEASE_TTL, None)
            .await
            .map_err(|e| self.unreachable(e))?
            .id();
        let cmp = match expected {
            Some(e) => Compare::value(ek.as_str(), CompareOp::Equal, e.to_string()),
            None => Compare::version(ek.as_str(), CompareOp::Equal, 0),
        };
        let txn = Txn::new().when([cmp]).and_then([
            TxnOp::put(ek.as_str(), epoch.to_string(), None),
            TxnOp::put(
                ok.as_str(),
                owner,
                Some(PutOptions::new().with_lease(lease)),
            ),
        ]);
        let resp = client.txn(txn).await.map_err(|e| self.unreachable(e))?;
        if resp.succeeded() {
            self.keep_alive(lease);
            Ok(true)
        } else {
            let _ = client.lease_revoke(lease).await;
            Ok(false)
        }
    }

    /// Renews `lease` every third of its life on a task of the lock's runtime, until the
    /// process ends or the lock is released.
    fn keep_alive(&self, lease: i64) {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(lease);
        let endpoints = self.endpoints.clone();
        self.rt.spawn(async move {
            let Ok(mut client) = etcd_client::Client::connect(&endpoints, None).await else {
                tracing::error!("etcd lock: cannot keep the lease alive: no connection");
                return;
            };
            let Ok((mut keeper, mut stream)) = client.lease_keep_alive(lease).await else {
                tracing::error!("etcd lock: cannot keep the lease alive");
                return;
            };
            loop {
                tokio::time::sleep(Duration::from_millis((LEASE_TTL as u64) * 1000 / 3)).await;
                if keeper.keep_alive().await.is_err() {
                    tracing::error!("etcd lock: lease renewal failed");
                    return;
                }
                match stream.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    _ => {
                        tracing::error!("etcd lock: the lease expired");
                        return;
                    }
                }
            }
        });
    }
}

impl Arbiter for EtcdLock {
    fn read(&self) -> Result<LockState, LockError> {
        self.rt.block_on(async {
            let mut c = self.client().await?;
            Ok(self.read_async(&mut c).await?.1)
        })
    }

    fn claim(&self, owner: &str) -> Result<u64, LockError> {
        self.rt.block_on(async {
            let mut c = self.client().await?;
            let (raw, now) = self.read_async(&mut c).await?;
            if now.active && now.owner != owner {
                return Err(LockError::Held {
                    spec: self.spec(),
                    owner: now.owner,
                    epoch: now.epoch,
                });
            }
            let epoch = now.epoch + 1;
            if self.swap(&mut c, raw, epoch, owner).await? {
                Ok(epoch)
            } else {
                let now = self.read_async(&mut c).await?.1;
                Err(LockError::Held {
                    spec: self.spec(),
                    owner: now.owner,
                    epoch: now.epoch,
                })
            }
        })
    }

    fn test_and_set(&self, expected: u64, owner: &str) -> Result<Race, LockError> {
        self.rt.block_on(async {
            let mut c = self.client().await?;
            if self
                .swap(&mut c, Some(expected), expected + 1, owner)
                .await?
            {
                Ok(Race::Won(expected + 1))
            } else {
                Ok(Race::Lost(self.read_async(&mut c).await?.1))
            }
        })
    }

    fn release(&self, epoch: u64, owner: &str) -> Result<(), LockError> {
        self.rt.block_on(async {
            let mut c = self.client().await?;
            let now = self.read_async(&mut c).await?.1;
            if now.epoch == epoch && now.owner == owner {
                let lease = self.lease.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(l) = lease {
                    let _ = c.lease_revoke(l).await;
                }
            }
            Ok(())
        })
    }

    fn spec(&self) -> String {
        format!("etcd:{}/{}", self.endpoints.join(","), self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ftvmm-lock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&d);
        d
    }

    #[test]
    fn block_round_trip_and_corruption() {
        let s = LockState {
            epoch: 7,
            owner: "backup@b:12".into(),
            active: true,
        };
        let b = encode_block(&s).unwrap();
        assert_eq!(decode_block(&b).unwrap(), s);
        for i in [0, 9, 10, 12, 20, 25, 508] {
            let mut bad = b;
            bad[i] ^= 0x40;
            assert!(
                decode_block(&bad).is_err(),
                "byte {i} flipped went unnoticed"
            );
        }
    }

    #[test]
    fn exactly_one_side_wins_a_race() {
        let p = tmp("race");
        let lock = FileLock::new(&p);
        let e = lock.claim("primary").unwrap();
        assert_eq!(e, 1);
        // Both sides race from epoch 1, from many threads: exactly one wins.
        let winners: Vec<_> = (0..8)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || FileLock::new(&p).test_and_set(1, &format!("side{i}")))
            })
            .map(|t| t.join().unwrap().unwrap())
            .filter(|r| matches!(r, Race::Won(2)))
            .collect();
        assert_eq!(winners.len(), 1);
        assert_eq!(lock.read().unwrap().epoch, 2);
        // A stale side (epoch 1) loses and learns who owns it.
        match lock.test_and_set(1, "late").unwrap() {
            Race::Lost(s) => assert_eq!(s.epoch, 2),
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn a_held_lock_is_not_claimed_and_a_corrupt_one_not_overwritten() {
        let p = tmp("held");
        let lock = FileLock::new(&p);
        lock.claim("a").unwrap();
        assert!(matches!(lock.claim("b"), Err(LockError::Held { .. })));
        lock.release(1, "a").unwrap();
        assert_eq!(lock.claim("b").unwrap(), 2);
        std::fs::write(&p, vec![0x55u8; BLOCK]).unwrap();
        let err = lock.test_and_set(2, "c").unwrap_err();
        assert!(matches!(err, LockError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), vec![0x55u8; BLOCK]);
        let _ = std::fs::remove_file(&p);
        let gone = FileLock::new(tmp("missing"));
        assert!(matches!(
            gone.test_and_set(1, "x"),
            Err(LockError::Unreachable { .. })
        ));
    }

    #[test]
    fn an_owner_record_says_where_the_owner_listens() {
        let r = owner_record("primary", Some("10.0.0.1:7000"));
        assert!(r.starts_with("primary@"), "{r}");
        assert_eq!(listen_of(&r), Some("10.0.0.1:7000"));
        assert_eq!(
            listen_of(&owner_record("backup", Some("ha-b.example:7000"))),
            Some("ha-b.example:7000")
        );
        // No address another host can use: the record says nothing.
        for l in [
            None,
            Some("0.0.0.0:7000"),
            Some("127.0.0.1:0"),
            Some("[::]:7000"),
        ] {
            let r = owner_record("backup", l);
            assert_eq!(listen_of(&r), None, "{l:?}: {r}");
        }
        // An older ftvmm's record, and a record that fits the block.
        assert_eq!(listen_of("primary@a:12"), None);
        let s = LockState {
            epoch: 3,
            owner: owner_record("backup", Some("[fd00::2]:7000")),
            active: true,
        };
        let back = decode_block(&encode_block(&s).unwrap()).unwrap();
        assert_eq!(listen_of(&back.owner), Some("[fd00::2]:7000"));
    }

    #[test]
    fn specs() {
        assert!(open("file:/tmp/x").is_ok());
        assert!(open("file:").is_err());
        assert!(open("nfs:/x").is_err());
        assert!(open("etcd:127.0.0.1:2379").is_err());
    }
}
