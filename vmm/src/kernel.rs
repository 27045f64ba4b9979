//! The `--kernel` file as a user has it: an ELF (`vmlinux`, a test guest), or a bzImage
//! (`/boot/vmlinuz-*`), whose compressed payload is that same ELF, stripped.
//!
//! A bzImage is not run through its own decompressor: the VMM unpacks the payload (the boot
//! protocol's `payload_offset`/`payload_length`; xz, zstd or gzip, the methods distributions
//! use) and boots the ELF inside at `startup_64`, exactly as it boots a vmlinux (boot.rs), so
//! the guest runs the bytes the distribution shipped. That ELF has no symbol table; the symbols
//! the VMM needs (tsc.rs, window.rs) come from the kernel's own kallsyms table instead
//! ([`kallsyms`]), as tools like vmlinux-to-elf recover it.
//!
//! An unpacked image is kept while something holds it ([`open`]): the boot, the RDTSC sites
//! and the window sites of one VM share one decompression.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Instant;

/// Why a kernel file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The file cannot be read.
    #[error("cannot read kernel {path}: {source}")]
    Io {
        /// The `--kernel` path as given.
        path: String,
        /// The read's error.
        source: std::io::Error,
    },
    /// A bzImage whose header or payload is not what the boot protocol says.
    #[error("kernel {path} is a bzImage, but {why}")]
    BzImage {
        /// The `--kernel` path as given.
        path: String,
        /// What is wrong with it.
        why: String,
    },
}

/// How the payload of a bzImage is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// xz (with the x86 BCJ filter, as the kernel's `xz_wrap.sh` makes it): Debian.
    Xz,
    /// zstd: Ubuntu, Fedora, Arch.
    Zstd,
    /// gzip.
    Gzip,
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Gzip => "gzip",
        })
    }
}

/// A bzImage unpacked: the ELF inside, and its kallsyms table once asked for.
pub struct BzImage {
    /// The ELF the payload unpacked to.
    pub elf: Vec<u8>,
    /// How the payload was compressed.
    pub compression: Compression,
    /// The bzImage file's size.
    pub file_size: u64,
    /// How long the unpacking took.
    pub unpack_ms: u128,
    symbols: OnceLock<Result<Arc<kallsyms::Table>, kallsyms::KallsymsError>>,
}

impl BzImage {
    /// The kernel's kallsyms table (found and decoded at the first call).
    pub fn kallsyms(&self) -> Result<Arc<kallsyms::Table>, kallsyms::KallsymsError> {
        self.symbols
            .get_or_init(|| {
                let start = Instant::now();
                let table = kallsyms::Table::find(&self.elf).map(Arc::new);
                if let Ok(t) = &table {
                    tracing::info!(
                        "kernel: {} symbols from its kallsyms table in {} ms",
                        t.symbols.len(),
                        start.elapsed().as_millis()
                    );
                }
                table
            })
            .clone()
    }
}

/// What a `--kernel` file is.
pub enum KernelImage {
    /// An ELF file: read from the file as it is.
    Elf,
    /// A bzImage, unpacked.
    BzImage(Arc<BzImage>),
}

/// Whether the first bytes of a file are a bzImage's (the boot sector's signature and the setup
/// header's `HdrS`).
pub fn is_bzimage(head: &[u8]) -> bool {
    head.len() >= 0x206 && head[0x1fe..0x200] == [0x55, 0xaa] && head[0x202..0x206] == *b"HdrS"
}

/// The last bzImage unpacked, while something holds it.
static CACHE: Mutex<Option<(PathBuf, Weak<BzImage>)>> = Mutex::new(None);

/// Opens `--kernel`: an ELF is left to be read from the file; a bzImage is unpacked (or the
/// unpacked image another part of this VM holds is shared).
pub fn open(path: &Path) -> Result<KernelImage, KernelError> {
    let io = |source| KernelError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let mut head = Vec::with_capacity(0x400);
    file.by_ref()
        .take(0x400)
        .read_to_end(&mut head)
        .map_err(io)?;
    if !is_bzimage(&head) {
        return Ok(KernelImage::Elf);
    }
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((cached, weak)) = cache.as_ref() {
        if cached == path {
            if let Some(image) = weak.upgrade() {
                return Ok(KernelImage::BzImage(image));
            }
        }
    }
    let mut bytes = head;
    file.read_to_end(&mut bytes).map_err(io)?;
    let image = Arc::new(unpack(path, &bytes)?);
    tracing::info!(
        "kernel: {} is a bzImage: {} payload unpacked to {} bytes of ELF in {} ms",
        path.display(),
        image.compression,
        image.elf.len(),
        image.unpack_ms
    );
    *cache = Some((path.to_path_buf(), Arc::downgrade(&image)));
    Ok(KernelImage::BzImage(image))
}

/// The largest ELF a payload may unpack to.
const MAX_ELF: usize = 512 << 20;

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Unpacks the payload of the bzImage `bytes`.
pub fn unpack(path: &Path, bytes: &[u8]) -> Result<BzImage, KernelError> {
    let bad = |why: String| KernelError::BzImage {
        path: path.display().to_string(),
        why,
    };
    if bytes.len() < 0x250 {
        return Err(bad(format!(
            "its setup header is truncated ({} bytes)",
            bytes.len()
        )));
    }
    let version = u16::from_le_bytes([bytes[0x206], bytes[0x207]]);
    if version < 0x208 {
        return Err(bad(format!(
            "of boot protocol {}.{:02}: its payload's place is given from 2.08 on (kernel 2.6.26)",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match bytes[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let (offset, length) = match (le32(bytes, 0x248), le32(bytes, 0x24c)) {
        (Some(o), Some(l)) => (o as usize, l as usize),
        _ => return Err(bad("its setup header is truncated".into())),
    };
    let start = (setup_sects + 1) * 512 + offset;
    let payload = bytes
        .get(start..start.saturating_add(length))
        .ok_or_else(|| {
            bad(format!(
                "its payload ({length} bytes at {start:#x}) is past the end of the file ({} bytes)",
                bytes.len()
            ))
        })?;
    let compression = if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Compression::Xz
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else {
        return Err(bad(format!(
            "its payload is compressed with a method ftvmm does not unpack (it starts {:02x?}; xz, zstd and gzip are unpacked): boot the vmlinux ELF instead (the kernel's scripts/extract-vmlinux gets it)",
            &payload[..payload.len().min(6)]
        )));
    };
    // xz and zstd payloads end with the unpacked size (the kernel's `size_append`), gzip's
    // trailer holds it: a hint for the buffer only.
    let hint = payload
        .len()
        .checked_sub(4)
        .and_then(|at| le32(payload, at))
        .map_or(0, |n| (n as usize).min(MAX_ELF));
    let started = Instant::now();
    let mut elf = Vec::with_capacity(hint);
    let read = match compression {
        Compression::Xz => lzma_rust2::XzReader::new(payload, false)
            .take(MAX_ELF as u64 + 1)
            .read_to_end(&mut elf),
        Compression::Zstd => match ruzstd::decoding::StreamingDecoder::new(payload) {
            Ok(d) => d.take(MAX_ELF as u64 + 1).read_to_end(&mut elf),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        },
        Compression::Gzip => flate2::read::GzDecoder::new(payload)
            .take(MAX_ELF as u64 + 1)
            .read_to_end(&mut elf),
    };
    read.map_err(|e| bad(format!("its {compression} payload does not unpack: {e}")))?;
    if elf.len() > MAX_ELF {
        return Err(bad(format!(
            "its payload unpacks to more than {} MiB",
            MAX_ELF >> 20
        )));
    }
    if !elf.starts_with(b"\x7fELF") {
        return Err(bad(format!(
            "its {compression} payload unpacked to {} bytes that are not an ELF file",
            elf.len()
        )));
    }
    Ok(BzImage {
        elf,
        compression,
        file_size: bytes.len() as u64,
        unpack_ms: started.elapsed().as_millis(),
        symbols: OnceLock::new(),
    })
}

pub mod kallsyms {
    //! The kernel's own symbol table, `kallsyms`, read out of its image (a stripped vmlinux has
    //! it in `.rodata`): what `/proc/kallsyms` shows, without a running kernel.
    //!
    //! The layout is scripts/kallsyms.c's (6.1, with `CONFIG_KALLSYMS_BASE_RELATIVE`), each
    //! table aligned to 8 bytes:
    //!
    //! ```text
    //! kallsyms_offsets        u32 x num_syms   (signed with KALLSYMS_ABSOLUTE_PERCPU, an SMP x86-64)
    //! kallsyms_relative_base  u64
    //! kallsyms_num_syms       u32
    //! kallsyms_names          per symbol: length (1 byte, or 2 with bit 7 set), token numbers
    //! kallsyms_markers        u32 per 256 symbols: where their names start
    //! kallsyms_seqs_of_names  3 bytes x num_syms (6.2, and 6.1 stable kernels since 6.1.?)
    //! kallsyms_token_table    256 NUL-terminated tokens
    //! kallsyms_token_index    u16 x 256: where each token starts
    //! ```
    //!
    //! None of these has a symbol in a stripped image: the token table is found by its shape
    //! (the single-character tokens "0".."9" one after the other, as every kernel has them), the
    //! token index after it by its values, and the names by walking back to a `num_syms` whose
    //! names end exactly where their markers say. Every step is checked against the next, so a
    //! wrong guess is refused rather than decoded into wrong symbols.

    /// Why no kallsyms table was found.
    #[derive(Clone, Debug, thiserror::Error)]
    pub enum KallsymsError {
        /// The image is not an ELF64 file the reader understands.
        #[error("{0}")]
        Elf(String),
        /// No table of the 6.1 layout was found.
        #[error("{0}")]
        NotFound(String),
    }

    /// One symbol as `/proc/kallsyms` shows it.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct KSymbol {
        /// Its address (as linked: before KASLR, which ftvmm's direct boot does not do).
        pub addr: u64,
        /// Its type letter (`T`, `t`, `D`, ...).
        pub kind: char,
        /// Its name.
        pub name: String,
    }

    /// The decoded table, and where each part was found (virtual addresses).
    #[derive(Clone, Debug)]
    pub struct Table {
        /// The symbols, in the table's order (by address).
        pub symbols: Vec<KSymbol>,
        /// `kallsyms_token_table`.
        pub token_table: u64,
        /// `kallsyms_names`.
        pub names: u64,
        /// `kallsyms_offsets`.
        pub offsets: u64,
        /// `kallsyms_relative_base`'s value.
        pub relative_base: u64,
        /// Whether the offsets are signed (`KALLSYMS_ABSOLUTE_PERCPU`).
        pub absolute_percpu: bool,
    }

    /// An ELF's loaded bytes by virtual address: its `PT_LOAD` segments' file contents.
    struct Image<'a> {
        elf: &'a [u8],
        /// (vaddr, file offset, file size) of each loaded segment.
        segments: Vec<(u64, usize, usize)>,
    }

    fn rd<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
        b.get(at..at.checked_add(N)?)?.try_into().ok()
    }

    impl<'a> Image<'a> {
        fn new(elf: &'a [u8]) -> Result<Image<'a>, KallsymsError> {
            let bad = |w: &str| KallsymsError::Elf(format!("the kernel image {w}"));
            if elf.get(..6) != Some(b"\x7fELF\x02\x01") {
                return Err(bad("is not a little-endian ELF64 file"));
            }
            let phoff = rd::<8>(elf, 0x20).map(u64::from_le_bytes);
            let phentsize = rd::<2>(elf, 0x36).map(u16::from_le_bytes);
            let phnum = rd::<2>(elf, 0x38).map(u16::from_le_bytes);
            let (Some(phoff), Some(phentsize), Some(phnum)) = (phoff, phentsize, phnum) else {
                return Err(bad("has a truncated ELF header"));
            };
            let mut segments = Vec::new();
            for i in 0..usize::from(phnum) {
                let h = usize::try_from(phoff)
                    .unwrap_or(usize::MAX)
                    .saturating_add(i * usize::from(phentsize));
                let field = |at: usize| rd::<8>(elf, h.checked_add(at)?).map(u64::from_le_bytes);
                let kind = rd::<4>(elf, h).map(u32::from_le_bytes);
                match (kind, field(8), field(16), field(32)) {
                    (Some(1), Some(off), Some(vaddr), Some(filesz)) => {
                        let (off, size) = (off as usize, filesz as usize);
                        if off.checked_add(size).is_some_and(|end| end <= elf.len())
                            && vaddr.checked_add(filesz).is_some()
                        {
                            segments.push((vaddr, off, size));
                        }
                    }
                    (Some(_), Some(_), Some(_), Some(_)) => {}
                    _ => return Err(bad("has a truncated program header")),
                }
            }
            if segments.is_empty() {
                return Err(bad("has no loadable segment"));
            }
            Ok(Image { elf, segments })
        }

        /// The virtual address of file offset `off`.
        fn vaddr(&self, off: usize) -> Option<u64> {
            self.segments
                .iter()
                .find(|(_, o, s)| off >= *o && off < o + s)
                .map(|(v, o, _)| v + (off - o) as u64)
        }

        /// The file offset of virtual address `vaddr`.
        fn offset(&self, vaddr: u64) -> Option<usize> {
            self.segments
                .iter()
                .find(|(v, _, s)| vaddr >= *v && vaddr < v + *s as u64)
                .map(|(v, o, _)| o + (vaddr - v) as usize)
        }

        fn u32_at(&self, vaddr: u64) -> Option<u32> {
            rd::<4>(self.elf, self.offset(vaddr)?).map(u32::from_le_bytes)
        }

        fn u64_at(&self, vaddr: u64) -> Option<u64> {
            rd::<8>(self.elf, self.offset(vaddr)?).map(u64::from_le_bytes)
        }

        /// `len` bytes at `vaddr`, within one segment.
        fn bytes(&self, vaddr: u64, len: usize) -> Option<&'a [u8]> {
            let (v, o, s) = self
                .segments
                .iter()
                .find(|(v, _, s)| vaddr >= *v && vaddr < v + *s as u64)?;
            let at = o + (vaddr - v) as usize;
            if at + len > o + s {
                return None;
            }
            self.elf.get(at..at + len)
        }
    }

    const fn align8(v: u64) -> u64 {
        (v + 7) & !7
    }

    /// The 256 tokens at `start`, and where the table ends; None if a token is empty or runs
    /// off the image.
    fn tokens(img: &Image<'_>, start: u64) -> Option<(Vec<Vec<u8>>, u64)> {
        let off = img.offset(start)?;
        let mut at = off;
        let mut out = Vec::with_capacity(256);
        for _ in 0..256 {
            let len = img.elf.get(at..)?.iter().take(256).position(|&b| b == 0)?;
            if len == 0 {
                return None;
            }
            out.push(img.elf[at..at + len].to_vec());
            at += len + 1;
        }
        Some((out, start + (at - off) as u64))
    }

    /// The token table, from a candidate "0\01\0...9\0" at `digits`: where it starts (its
    /// index, which follows it, says where token 0x30 is) and its tokens, checked against every
    /// entry of the index.
    fn token_table_at(img: &Image<'_>, digits: u64) -> Option<(u64, Vec<Vec<u8>>)> {
        // Tokens 0x30..=0xff from here; the index follows the last one, 8-aligned.
        let mut at = img.offset(digits)?;
        for _ in 0x30..0x100 {
            let len = img.elf.get(at..)?.iter().take(256).position(|&b| b == 0)?;
            if len == 0 {
                return None;
            }
            at += len + 1;
        }
        let table_end = img.vaddr(at - 1)? + 1;
        let index = align8(table_end);
        let idx = |i: u64| {
            img.bytes(index + 2 * i, 2)
                .map(|b| u64::from(u16::from_le_bytes([b[0], b[1]])))
        };
        let start = digits.checked_sub(idx(0x30)?)?;
        if idx(0)? != 0 || start % 8 != 0 {
            return None;
        }
        let (table, end) = tokens(img, start)?;
        if end != table_end {
            return None;
        }
        let mut off = 0u64;
        for (i, t) in table.iter().enumerate() {
            if idx(i as u64)? != off {
                return None;
            }
            off += t.len() as u64 + 1;
        }
        Some((start, table))
    }

    /// The names table starting at `names` holds `num` symbols whose every 256th starts where
    /// the markers after it say: returns the names' end and each symbol's token numbers.
    fn names_at(
        img: &Image<'_>,
        names: u64,
        num: usize,
        limit: u64,
    ) -> Option<(u64, Vec<(usize, usize)>)> {
        let mut at = img.offset(names)?;
        let limit = img.offset(limit)?;
        let start = at;
        let mut spans = Vec::with_capacity(num);
        let mut marks = Vec::with_capacity(num / 256 + 1);
        for i in 0..num {
            if i % 256 == 0 {
                marks.push((at - start) as u64);
            }
            let b0 = *img.elf.get(at)?;
            let (len, head) = if b0 & 0x80 != 0 {
                let b1 = *img.elf.get(at + 1)?;
                (usize::from(b0 & 0x7f) | usize::from(b1) << 7, 2)
            } else {
                (usize::from(b0), 1)
            };
            if len == 0 {
                return None;
            }
            spans.push((at + head, len));
            at += head + len;
            if at > limit {
                return None;
            }
        }
        let end = img.vaddr(at - 1)? + 1;
        let markers = align8(end);
        for (i, m) in marks.iter().enumerate() {
            if u64::from(img.u32_at(markers + 4 * i as u64)?) != *m {
                return None;
            }
        }
        Some((end, spans))
    }

    impl Table {
        /// Finds and decodes the kallsyms table of the ELF kernel image `elf`.
        pub fn find(elf: &[u8]) -> Result<Table, KallsymsError> {
            let img = Image::new(elf)?;
            const DIGITS: &[u8] = b"0\x001\x002\x003\x004\x005\x006\x007\x008\x009\x00";
            let mut tried = 0;
            let mut from = 0;
            while let Some(pos) = find_bytes(&elf[from..], DIGITS) {
                let off = from + pos;
                from = off + 1;
                let Some(digits) = img.vaddr(off) else {
                    continue;
                };
                // The byte before "0" ends token 0x2f.
                if off == 0 || elf[off - 1] != 0 {
                    continue;
                }
                tried += 1;
                let Some((token_table, tokens)) = token_table_at(&img, digits) else {
                    continue;
                };
                if let Some(table) = Self::before(&img, token_table, &tokens) {
                    return Ok(table);
                }
            }
            Err(KallsymsError::NotFound(if tried == 0 {
                "the kernel image has no kallsyms table (built without CONFIG_KALLSYMS)".into()
            } else {
                format!("no kallsyms table of the layout of Linux 6.1 in the kernel image ({tried} places looked like its token table)")
            }))
        }

        /// The rest of the table, before its token table at `token_table`.
        fn before(img: &Image<'_>, token_table: u64, tokens: &[Vec<u8>]) -> Option<Table> {
            // kallsyms_num_syms is 8-aligned, its 4 bytes of padding zero, and its names end
            // where the markers say; walk back from the token table (at most 64 MiB).
            let mut num_at = token_table.checked_sub(16)? & !7;
            let lowest = token_table.saturating_sub(64 << 20);
            while num_at > lowest {
                let here = num_at;
                num_at -= 8;
                let Some(num) = img.u32_at(here) else {
                    continue;
                };
                if !(64..=4_000_000).contains(&num) || img.u32_at(here + 4) != Some(0) {
                    continue;
                }
                let num = num as usize;
                // The markers, then (6.2, stable 6.1) the sequence numbers, then the tokens.
                let markers_len = num.div_ceil(256) as u64 * 4;
                let names = here + 8;
                let Some((end, spans)) = names_at(img, names, num, token_table) else {
                    continue;
                };
                let after_markers = align8(align8(end) + markers_len);
                let seqs_end = align8(after_markers + 3 * num as u64);
                if token_table != after_markers && token_table != seqs_end {
                    continue;
                }
                let base_at = here.checked_sub(8)?;
                let relative_base = img.u64_at(base_at)?;
                let offsets = base_at.checked_sub(align8(4 * num as u64))?;
                let raw = img.bytes(offsets, 4 * num)?;
                let values: Vec<i32> = raw
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                // Text is below the base with KALLSYMS_ABSOLUTE_PERCPU: negative offsets.
                let absolute_percpu = values.iter().any(|&v| v < 0);
                let mut symbols = Vec::with_capacity(num);
                for (v, (at, len)) in values.iter().zip(&spans) {
                    let mut name = Vec::with_capacity(32);
                    for &t in img.elf.get(*at..at + len)? {
                        name.extend_from_slice(&tokens[usize::from(t)]);
                    }
                    let (&kind, rest) = name.split_first()?;
                    let addr = if !absolute_percpu {
                        relative_base.wrapping_add(u64::from(*v as u32))
                    } else if *v >= 0 {
                        *v as u64
                    } else {
                        relative_base.wrapping_sub(1).wrapping_sub(*v as i64 as u64)
                    };
                    symbols.push(KSymbol {
                        addr,
                        kind: char::from(kind),
                        name: String::from_utf8_lossy(rest).into_owned(),
                    });
                }
                return Some(Table {
                    symbols,
                    token_table,
                    names,
                    offsets,
                    relative_base,
                    absolute_percpu,
                });
            }
            None
        }
    }

    /// The file offset of virtual address `vaddr` in the ELF image `elf` (tests).
    #[cfg(test)]
    pub(super) fn find_offset(elf: &[u8], vaddr: u64) -> Option<usize> {
        Image::new(elf).ok()?.offset(vaddr)
    }

    fn find_bytes(hay: &[u8], needle: &[u8]) -> Option<usize> {
        let first = needle[0];
        let mut from = 0;
        while let Some(p) = hay.get(from..)?.iter().position(|&b| b == first) {
            let at = from + p;
            if hay.get(at..at + needle.len())? == needle {
                return Some(at);
            }
            from = at + 1;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the workspace root")
            .to_path_buf()
    }

    #[test]
    fn a_bzimage_unpacks_and_its_kallsyms_are_found() {
        // The stock lane's host kernel is Debian's bzImage (images/build-stock-host).
        let p = root().join("images/out/stock-host/vmlinuz");
        if !p.exists() {
            eprintln!("{} missing: skipping", p.display());
            return;
        }
        let KernelImage::BzImage(bz) = open(&p).unwrap() else {
            panic!("{} is not taken for a bzImage", p.display());
        };
        assert!(bz.elf.starts_with(b"\x7fELF"));
        // Shared while held.
        let KernelImage::BzImage(again) = open(&p).unwrap() else {
            panic!("not a bzImage the second time");
        };
        assert!(Arc::ptr_eq(&bz, &again));
        let t = bz.kallsyms().unwrap();
        assert!(t.absolute_percpu, "an SMP x86-64 kernel");
        assert!(t.symbols.len() > 50_000, "{}", t.symbols.len());
        let text = t.symbols.iter().find(|s| s.name == "_text").unwrap();
        assert_eq!(text.addr, 0xffff_ffff_8100_0000);
        assert!(t
            .symbols
            .iter()
            .any(|s| s.name == "add_interrupt_randomness" && s.kind == 'T'));
    }

    #[test]
    fn an_elf_is_not_a_bzimage_and_a_bad_bzimage_says_why() {
        let elf = root().join("images/out/test-guests/hello.elf");
        if elf.exists() {
            assert!(matches!(open(&elf).unwrap(), KernelImage::Elf));
        }
        let mut bz = vec![0u8; 0x800];
        bz[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        bz[0x1f1] = 1;
        bz[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&16u32.to_le_bytes());
        let e = unpack(Path::new("k"), &bz).err().unwrap().to_string();
        assert!(e.contains("method ftvmm does not unpack"), "{e}");
        bz[0x24c..0x250].copy_from_slice(&0x1000u32.to_le_bytes());
        let e = unpack(Path::new("k"), &bz).err().unwrap().to_string();
        assert!(e.contains("past the end of the file"), "{e}");
        bz[0x206..0x208].copy_from_slice(&0x205u16.to_le_bytes());
        let e = unpack(Path::new("k"), &bz).err().unwrap().to_string();
        assert!(e.contains("boot protocol 2.05"), "{e}");
        // Not a kernel image with a kallsyms table at all.
        let e = kallsyms::Table::find(b"\x7fELF\x02\x01")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("truncated"), "{e}");
    }

    /// A damaged image gives an error, never a panic: truncated anywhere, a symbol's length or
    /// a token's end changed (the structure no longer checks out).
    #[test]
    fn a_damaged_image_is_refused_not_misread() {
        let p = root().join("images/out/linux/vmlinux");
        if !p.exists() {
            eprintln!("{} missing: skipping", p.display());
            return;
        }
        let elf = std::fs::read(&p).unwrap();
        let good = kallsyms::Table::find(&elf).unwrap();
        for cut in [0, 5, 64, 4096, elf.len() / 3, elf.len() / 2, elf.len() - 1] {
            if let Ok(t) = kallsyms::Table::find(&elf[..cut]) {
                assert_eq!(t.symbols, good.symbols, "cut at {cut}");
            }
        }
        // The token index: found by its values, so a wrong one is no table at all.
        let img = kallsyms::find_offset(&elf, good.token_table).unwrap();
        let mut bad = elf.clone();
        let mut names = elf.clone();
        let n = kallsyms::find_offset(&elf, good.names).unwrap();
        names[n] ^= 0x01;
        if let Ok(t) = kallsyms::Table::find(&names) {
            assert_ne!(t.names, good.names, "a damaged length byte was decoded");
        }
        // A token's terminator gone: the lengths no longer match the index.
        let nul = bad[img..].iter().position(|&b| b == 0).unwrap() + img;
        bad[nul] = b'x';
        if let Ok(t) = kallsyms::Table::find(&bad) {
            assert_ne!(
                t.token_table, good.token_table,
                "a damaged token table was decoded"
            );
        }
    }
}
