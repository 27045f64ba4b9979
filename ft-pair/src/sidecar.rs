//! A mirrored copy's sidecar (`IMAGE.ftvmm`, JSON, next to the image): which history the copy
//! holds (a generation id that a primary gives its copy and a backup takes over at its
//! attach), whether it is current or stale, at which epoch of the lock, and which side wrote
//! it last. A side that stops behind the side that is live (it lost the lock or was fenced, its
//! replay diverged, it handed the guest over, its attach broke off) marks its copy stale
//! before it stops; a primary refuses to start on a stale copy, or on one last current at an
//! epoch before the lock's (another side was live since: the copy's own side died without
//! saying so). Attaching it as a backup makes it current again. A copy without a sidecar (its
//! first use) counts as current. docs/FAILOVER.md argues the rule; docs/OPERATIONS.md is the
//! operator's view.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Whether a copy holds the guest's latest disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CopyState {
    /// As the live side has it (or had it when the pair stopped cleanly).
    Current,
    /// Behind the live side's, or half-written: attach it as a backup to bring it up to date.
    Stale,
}

/// The sidecar's contents.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sidecar {
    /// The history this copy holds: minted by a primary starting on a copy that has none, taken
    /// over by a backup from its primary at the attach.
    pub generation: String,
    /// `current` or `stale`.
    pub state: CopyState,
    /// The lock's epoch when it was last written.
    pub epoch: u64,
    /// The side that wrote it (`primary@host:pid`, `backup@host:pid`).
    pub side: String,
    /// Unix time it was written, seconds.
    pub updated_unix_s: u64,
    /// Why a stale copy is stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// What is wrong with a sidecar.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// Reading or writing it failed.
    #[error("sidecar {path}: {source}")]
    Io {
        /// The sidecar.
        path: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// It is not a sidecar ftvmm wrote (not JSON, a field missing or of the wrong type).
    #[error("sidecar {path} does not read ({why}): fix or delete it")]
    Parse {
        /// The sidecar.
        path: String,
        /// serde_json's error.
        why: String,
    },
}

/// The sidecar of the copy at `image`: `IMAGE.ftvmm`.
pub fn path_of(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".ftvmm");
    PathBuf::from(p)
}

/// Parses a sidecar's text (`path` names it in the error).
pub fn parse(text: &str, path: &Path) -> Result<Sidecar, SidecarError> {
    serde_json::from_str(text).map_err(|e| SidecarError::Parse {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// The sidecar of the copy at `image`, or None if it has none.
pub fn read(image: &Path) -> Result<Option<Sidecar>, SidecarError> {
    let path = path_of(image);
    match std::fs::read(&path) {
        Ok(bytes) => parse(&String::from_utf8_lossy(&bytes), &path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(SidecarError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Writes the sidecar of the copy at `image`, durably (a temporary file, fsynced, renamed
/// over it, the directory fsynced).
pub fn write(image: &Path, sidecar: &Sidecar) -> Result<(), SidecarError> {
    use std::io::Write;
    let path = path_of(image);
    let err = |source| SidecarError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut tmp = path.clone().into_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_string_pretty(sidecar).unwrap_or_default();
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.write_all(b"\n").map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Why a primary may not start on a copy, if it may not: its sidecar says stale, or it was
/// last current at an epoch before the lock's (`lock_epoch`: another side has been live
/// since).
pub fn refuse_as_primary(image: &Path, sidecar: &Sidecar, lock_epoch: u64) -> Option<String> {
    let path = path_of(image);
    let what = "attach this copy as a backup of the pair's current primary (the attach brings it up to date and makes it current); if no other copy survives, delete the sidecar to start from this one anyway";
    match sidecar.state {
        CopyState::Stale => Some(format!(
            "this copy of the disk is stale ({}: written by {} at epoch {}: {}): {what}",
            path.display(),
            sidecar.side,
            sidecar.epoch,
            sidecar.why.as_deref().unwrap_or("no reason given")
        )),
        CopyState::Current if sidecar.epoch < lock_epoch => Some(format!(
            "this copy of the disk was last current at epoch {} ({}, written by {}), and the lock is at epoch {lock_epoch}: another side has been live since, so this copy is behind: {what}",
            sidecar.epoch,
            path.display(),
            sidecar.side
        )),
        CopyState::Current => None,
    }
}

/// One side's handle on its copy's sidecar: writes it as the side's state changes, logging
/// (not failing on) a write that does not succeed.
#[derive(Debug)]
pub struct CopyMeta {
    image: PathBuf,
    side: String,
    generation: Mutex<String>,
    /// The epoch the sidecar had when opened (0 without one).
    epoch: u64,
}

impl CopyMeta {
    /// The sidecar of the copy at `image`, written by `side`, with the generation its sidecar
    /// has (a new one if it has none or it does not read).
    pub fn open(image: &Path, side: &str) -> CopyMeta {
        let (generation, epoch) = match read(image) {
            Ok(Some(s)) => (s.generation, s.epoch),
            _ => (new_generation(), 0),
        };
        CopyMeta {
            image: image.to_path_buf(),
            side: side.to_string(),
            generation: Mutex::new(generation),
            epoch,
        }
    }

    /// The epoch the sidecar had when opened (0 without one).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The copy's generation.
    pub fn generation(&self) -> String {
        self.generation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The copy now holds generation `g` (a backup's, from its primary at the attach).
    pub fn adopt(&self, g: &str) {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner()) = g.to_string();
    }

    /// The copy is current at `epoch`.
    pub fn current(&self, epoch: u64) {
        self.put(CopyState::Current, epoch, None);
    }

    /// The copy is stale from now on (this side stops behind the live one), at `epoch`.
    pub fn stale(&self, epoch: u64, why: &str) {
        tracing::warn!(
            "marking this side's copy of the disk stale in {}: {why}",
            path_of(&self.image).display()
        );
        self.put(CopyState::Stale, epoch, Some(why.to_string()));
    }

    fn put(&self, state: CopyState, epoch: u64, why: Option<String>) {
        let sidecar = Sidecar {
            generation: self.generation(),
            state,
            epoch,
            side: self.side.clone(),
            updated_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            why,
        };
        if let Err(e) = write(&self.image, &sidecar) {
            tracing::error!("cannot write this copy's sidecar: {e}");
        }
    }
}

/// A new generation id: 16 random bytes, hex.
fn new_generation() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    ft_core::disk::hex(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sidecars_parse_and_bad_ones_are_refused_with_their_path() {
        let p = Path::new("/copies/disk.img");
        assert_eq!(path_of(p), Path::new("/copies/disk.img.ftvmm"));
        let s = parse(
            r#"{"generation": "ab12", "state": "stale", "epoch": 4, "side": "primary@a:1",
                "updated_unix_s": 9, "why": "lost the lock"}"#,
            &path_of(p),
        )
        .unwrap();
        assert_eq!(
            (s.state, s.epoch, s.why.as_deref()),
            (CopyState::Stale, 4, Some("lost the lock"))
        );
        // Without `why` (a current copy), and with fields this build does not know.
        let s = parse(
            r#"{"generation": "ab12", "state": "current", "epoch": 4, "side": "b", "updated_unix_s": 9, "later": 1}"#,
            &path_of(p),
        )
        .unwrap();
        assert_eq!((s.state, s.why), (CopyState::Current, None));
        for bad in [
            "",
            "not json",
            r#"{"generation": "ab12", "state": "fresh", "epoch": 4, "side": "b", "updated_unix_s": 9}"#,
            r#"{"generation": "ab12", "state": "current", "epoch": -1, "side": "b", "updated_unix_s": 9}"#,
            r#"{"state": "current", "epoch": 4, "side": "b", "updated_unix_s": 9}"#,
            "[1, 2]",
        ] {
            let e = parse(bad, &path_of(p)).unwrap_err().to_string();
            assert!(
                e.contains("/copies/disk.img.ftvmm") && e.contains("delete it"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_primary_refuses_a_stale_copy_or_one_behind_the_lock() {
        let dir = std::env::temp_dir().join(format!("ftvmm-sidecar-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        assert!(read(&image).unwrap().is_none(), "no sidecar: first use");
        let meta = CopyMeta::open(&image, "primary@a:1");
        let g = meta.generation();
        assert_eq!(g.len(), 32);
        meta.current(3);
        let s = read(&image).unwrap().unwrap();
        assert_eq!(
            (s.state, s.epoch, s.generation.as_str()),
            (CopyState::Current, 3, g.as_str())
        );
        assert_eq!(refuse_as_primary(&image, &s, 3), None);
        let behind = refuse_as_primary(&image, &s, 4).unwrap();
        assert!(
            behind.contains("epoch 3") && behind.contains("attach this copy as a backup"),
            "{behind}"
        );
        meta.stale(3, "lost the lock at epoch 4");
        let s = read(&image).unwrap().unwrap();
        let why = refuse_as_primary(&image, &s, 3).unwrap();
        assert!(
            why.contains("stale")
                && why.contains("disk.img.ftvmm")
                && why.contains("lost the lock"),
            "{why}"
        );
        // A backup takes over its primary's generation; the sidecar keeps it.
        let b = CopyMeta::open(&image, "backup@b:2");
        assert_eq!(b.generation(), g);
        b.adopt("ffff");
        b.current(5);
        assert_eq!(read(&image).unwrap().unwrap().generation, "ffff");
        std::fs::write(path_of(&image), "{").unwrap();
        assert!(matches!(read(&image), Err(SidecarError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
