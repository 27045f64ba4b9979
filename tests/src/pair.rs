//! The fault-tolerant pair: the key its sides share.

use std::path::{Path, PathBuf};

/// A pre-shared key file for a pair, in `dir`.
pub fn key_file(dir: &Path, name: &str, seed: u8) -> PathBuf {
    let p = dir.join(name);
    let key: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(31).wrapping_add(seed))
        .collect();
    std::fs::write(&p, key).expect("write key");
    p
}
