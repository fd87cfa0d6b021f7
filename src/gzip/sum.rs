//! The CRC-32 and length a gzip trailer needs, worked out for many streams at once:
//! CRC-32 is linear, so a viewer's sum follows from the session's (see `gzip`).

use crc32fast::Hasher;

/// The CRC-32 and length (mod 2^32 in the trailer) of a run of bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sum {
    crc: u32,
    len: u64,
}

impl Sum {
    pub fn of(bytes: &[u8]) -> Self {
        let mut sum = Self::default();
        sum.add(bytes);
        sum
    }

    pub fn add(&mut self, bytes: &[u8]) {
        let mut hasher = Hasher::new_with_initial_len(self.crc, self.len);
        hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.crc = hasher.finalize();
    }

    /// As a gzip trailer writes it: the CRC-32, then the length mod 2^32, little-endian.
    pub fn trailer(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.crc.to_le_bytes());
        out[4..].copy_from_slice(&(self.len as u32).to_le_bytes());
        out
    }

    /// The sum of these bytes followed by `after`.
    pub fn then(self, after: Sum) -> Sum {
        let mut hasher = Hasher::new_with_initial_len(self.crc, self.len);
        hasher.combine(&Hasher::new_with_initial_len(after.crc, after.len));
        Sum {
            crc: hasher.finalize(),
            len: self.len + after.len,
        }
    }

    /// The sum of what came after `earlier`, these bytes being `earlier` followed by
    /// more. CRC-32 is linear: crc(a‖b) = shift(crc(a), |b|) ⊕ crc(b), so crc(b) is
    /// crc(a‖b) ⊕ shift(crc(a), |b|), and the shift is a combine with an empty sum.
    pub fn since(self, earlier: Sum) -> Sum {
        let len = self.len - earlier.len;
        let shifted = earlier.then(Sum { crc: 0, len }).crc;
        Sum {
            crc: self.crc ^ shifted,
            len,
        }
    }
}

/// What a viewer's stream carried, as its trailer needs it: the CRC-32 and the length
/// mod 2^32. Half a [`Sum`]: it is kept for every gzip viewer in step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    crc: u32,
    len: u32,
}

impl From<Sum> for Carried {
    fn from(sum: Sum) -> Self {
        Self {
            crc: sum.crc,
            len: sum.len as u32,
        }
    }
}

impl Carried {
    /// As a sum to carry on from: only the trailer reads its length, mod 2^32.
    pub fn sum(self) -> Sum {
        Sum {
            crc: self.crc,
            len: u64::from(self.len),
        }
    }
}

/// The same bytes appended to many streams' CRCs at once. crc(a‖b) = shift(crc(a), |b|)
/// ⊕ crc(b), and the shift by |b| bytes is linear over GF(2): worked out once as the
/// images of the 32 bits, it is 32 XORs at most per stream, where a combine per stream
/// would take a matrix power each.
pub struct Append {
    columns: [u32; 32],
    tail: Sum,
}

impl Append {
    /// Appending bytes that sum to `tail`.
    pub fn new(tail: Sum) -> Self {
        let shift = Sum {
            crc: 0,
            len: tail.len,
        };
        let columns = std::array::from_fn(|bit| {
            Sum {
                crc: 1 << bit,
                len: 0,
            }
            .then(shift)
            .crc
        });
        Self { columns, tail }
    }

    pub fn to(&self, carried: Carried) -> Carried {
        let mut crc = self.tail.crc;
        let mut bits = carried.crc;
        while bits != 0 {
            crc ^= self.columns[bits.trailing_zeros() as usize];
            bits &= bits - 1;
        }
        Carried {
            crc,
            len: carried.len.wrapping_add(self.tail.len as u32),
        }
    }
}
