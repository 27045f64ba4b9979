//! The storage behind the virtio-blk device: the [`Disk`] trait the device reads and writes
//! through, and [`ImageFile`], a raw disk image.
//!
//! The device takes any [`Disk`]. A standalone run hands it the image file; under fault
//! tolerance the determinism boundary wraps the image first (ft-core's recording, replaying
//! and takeover disks, ft-pair's held disk), because disk contents are an input and disk
//! writes are outputs. Those wrappers implement this same trait, so the device gets them as
//! they are.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Storage a virtio-blk device reads and writes. Offsets and lengths are whole sectors
/// ([`crate::virtio::block::SECTOR_SIZE`]).
pub trait Disk: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from byte `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at byte `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes the writes so far durable.
    fn flush(&mut self) -> io::Result<()>;
}

/// A raw disk image file, opened for reading and writing or for reading only.
#[derive(Debug)]
pub struct ImageFile {
    file: File,
    size: u64,
    read_only: bool,
}

impl ImageFile {
    /// Opens the image at `path` for reading and writing.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, false)
    }

    /// Opens the image at `path` for reading only: writes fail, flushes do nothing.
    pub fn open_read_only(path: &Path) -> io::Result<Self> {
        Self::open_with(path, true)
    }

    fn open_with(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let size = file.metadata()?.len();
        Ok(ImageFile {
            file,
            size,
            read_only,
        })
    }

    /// A second handle on the same image (for the thread that releases held writes).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(ImageFile {
            file: self.file.try_clone()?,
            size: self.size,
            read_only: self.read_only,
        })
    }
}

impl Disk for ImageFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk image opened read-only",
            ));
        }
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
}
