//! Serde helpers for the byte strings of the wire formats.
//!
//! Serde hands a `Vec<u8>` to postcard one byte at a time; `serde_bytes` hands it over whole.
//! Postcard writes both the same way (the length as a varint, then the bytes), so a field
//! switched to them reads and writes exactly the bytes it did: the formats do not change, only
//! the time they take (a checkpoint's pages: ~5 ms less on the vCPU thread for 1 MiB).

/// `Vec<(u64, Vec<u8>)>` (numbered pages or blocks) with each byte string handed over whole:
/// `#[serde(with = "ft_core::wire::numbered_bytes")]`.
pub mod numbered_bytes {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    /// Serializes as a sequence of `(u64, bytes)`.
    pub fn serialize<S: Serializer>(items: &[(u64, Vec<u8>)], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(items.len()))?;
        for (n, data) in items {
            seq.serialize_element(&(n, Bytes::new(data)))?;
        }
        seq.end()
    }

    /// Reads what [`serialize`] wrote (or a plain `Vec<(u64, Vec<u8>)>`: the same bytes).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(u64, Vec<u8>)>, D::Error> {
        let items: Vec<(u64, ByteBuf)> = Vec::deserialize(d)?;
        Ok(items.into_iter().map(|(n, b)| (n, b.into_vec())).collect())
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Plain {
        items: Vec<(u64, Vec<u8>)>,
        one: Vec<u8>,
        maybe: Option<Vec<u8>>,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Whole {
        #[serde(with = "super::numbered_bytes")]
        items: Vec<(u64, Vec<u8>)>,
        #[serde(with = "serde_bytes")]
        one: Vec<u8>,
        #[serde(with = "serde_bytes")]
        maybe: Option<Vec<u8>>,
    }

    #[test]
    fn byte_strings_handed_over_whole_encode_as_before() {
        let items = vec![
            (7, vec![1u8; 300]),
            (0x1_0000_0000, vec![]),
            (3, vec![0, 255]),
        ];
        let plain = Plain {
            items: items.clone(),
            one: vec![9; 200],
            maybe: Some(vec![4, 5]),
        };
        let whole = Whole {
            items,
            one: vec![9; 200],
            maybe: Some(vec![4, 5]),
        };
        let a = postcard::to_stdvec(&plain).unwrap();
        let b = postcard::to_stdvec(&whole).unwrap();
        assert_eq!(a, b, "the wire bytes must not change");
        let back: Whole = postcard::from_bytes(&a).unwrap();
        assert_eq!(back, whole);
        let back: Plain = postcard::from_bytes(&b).unwrap();
        assert_eq!(back, plain);
    }

    #[test]
    fn a_byte_string_longer_than_its_input_is_an_error() {
        // A length that claims more bytes than follow: an error, not an allocation.
        let mut bytes = postcard::to_stdvec(&Whole {
            items: vec![(1, vec![1, 2, 3])],
            one: vec![],
            maybe: None,
        })
        .unwrap();
        bytes[2] = 0x7f;
        assert!(postcard::from_bytes::<Whole>(&bytes).is_err());
    }
}
