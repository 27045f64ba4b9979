//! The pre-shared key both sides must hold before anything else moves.

use std::fmt;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::ChannelError;

/// The fewest bytes a key file (or [`Psk::from_bytes`] input) may hold.
pub const MIN_KEY_FILE_LEN: usize = 16;

/// A 32-byte Noise pre-shared key: SHA-256 of the key material. `Debug` does not print it.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk([u8; 32]);

impl Psk {
    /// Reads a key file: at least 16 bytes of any content (its whole content is hashed, so a
    /// trailing newline counts).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Psk, ChannelError> {
        let path = path.as_ref();
        let data = std::fs::read(path).map_err(|source| ChannelError::KeyFile {
            path: path.to_owned(),
            source,
        })?;
        if data.len() < MIN_KEY_FILE_LEN {
            return Err(ChannelError::KeyTooShort {
                path: path.to_owned(),
                len: data.len(),
            });
        }
        Ok(Psk::hash(&data))
    }

    /// The key derived from in-memory key material, as [`Psk::from_file`] would from a file
    /// holding these bytes.
    pub fn from_bytes(material: &[u8]) -> Result<Psk, ChannelError> {
        if material.len() < MIN_KEY_FILE_LEN {
            return Err(ChannelError::KeyBytesTooShort(material.len()));
        }
        Ok(Psk::hash(material))
    }

    fn hash(material: &[u8]) -> Psk {
        Psk(Sha256::digest(material).into())
    }

    pub(crate) fn key(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_key_file_is_refused_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("lc-psk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let short = dir.join("short.key");
        std::fs::write(&short, b"0123456789").unwrap();
        let err = Psk::from_file(&short).unwrap_err().to_string();
        assert!(
            err.contains("short.key") && err.contains("10 bytes"),
            "{err}"
        );

        let good = dir.join("good.key");
        std::fs::write(&good, b"0123456789abcdef").unwrap();
        assert_eq!(
            Psk::from_file(&good).unwrap(),
            Psk::from_bytes(b"0123456789abcdef").unwrap()
        );
        let missing = Psk::from_file(dir.join("missing.key")).unwrap_err();
        assert!(missing.to_string().contains("missing.key"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_is_sha256_of_the_material() {
        let psk = Psk::from_bytes(b"abcdefghijklmnop").unwrap();
        let want: [u8; 32] = Sha256::digest(b"abcdefghijklmnop").into();
        assert_eq!(psk.key(), &want);
        assert_eq!(format!("{psk:?}"), "Psk(..)");
    }
}
