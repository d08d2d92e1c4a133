//! Record framing: the bytes of one record and their checksum.
//!
//! See the crate documentation for the layout. Encoding writes straight into
//! the caller's batch buffer so a payload is copied once, from the encoder into
//! the buffer that `write(2)` sees.

/// Bytes of a record header: `len u32 | crc u32 | lsn u64 | type u8`.
pub const RECORD_HEADER_BYTES: usize = 17;

/// What a record holds. The WAL does not interpret payloads; the type lets
/// readers skip kinds they do not know and lets a zeroed header (type 0) be
/// told apart from a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// A log frame (logd: a prost-encoded `LogFrame` with its final seq).
    Frame = 1,
}

impl RecordType {
    /// The type for a stored byte, if it names one.
    pub fn from_byte(b: u8) -> Option<Self> {
        match b {
            1 => Some(RecordType::Frame),
            _ => None,
        }
    }
}

/// LevelDB's CRC mask: a stored CRC of data that itself contains CRCs stays
/// a good checksum, and an all-zero record never has a matching CRC.
const MASK_DELTA: u32 = 0xa282_ead8;

/// The masked CRC32 of `lsn || type || payload`, as stored in a header.
pub fn record_crc(lsn: u64, kind: u8, payload: &[u8]) -> u32 {
    let mut h = record_crc_start(lsn, kind);
    h.update(payload);
    mask(h.finalize())
}

/// A hasher that has taken `lsn || type`: feed it a payload and pass it to
/// [`record_crc_of`] to check one length after another.
pub(crate) fn record_crc_start(lsn: u64, kind: u8) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(&lsn.to_le_bytes());
    h.update(&[kind]);
    h
}

/// The stored (masked) CRC for what `h` has taken so far.
pub(crate) fn record_crc_of(h: &crc32fast::Hasher) -> u32 {
    mask(h.clone().finalize())
}

fn mask(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(MASK_DELTA)
}

/// Appends a record to `buf`, encoding the payload in place with `encode`.
/// Returns the total bytes appended (header + payload).
pub fn encode_with(buf: &mut Vec<u8>, lsn: u64, kind: RecordType, encode: impl FnOnce(&mut Vec<u8>)) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    encode(buf);
    let payload_len = buf.len() - start - RECORD_HEADER_BYTES;
    let len = u32::try_from(payload_len).expect("payload length fits u32 (checked by caller)");
    let crc = record_crc(lsn, kind as u8, &buf[start + RECORD_HEADER_BYTES..]);
    let header = &mut buf[start..start + RECORD_HEADER_BYTES];
    header[0..4].copy_from_slice(&len.to_le_bytes());
    header[4..8].copy_from_slice(&crc.to_le_bytes());
    header[8..16].copy_from_slice(&lsn.to_le_bytes());
    header[16] = kind as u8;
    buf.len() - start
}

/// A parsed record header (not yet checked against its payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Payload length in bytes.
    pub len: u32,
    /// The stored (masked) CRC.
    pub crc: u32,
    /// The record's log sequence number.
    pub lsn: u64,
    /// The stored type byte.
    pub kind: u8,
}

impl Header {
    /// Parses the first [`RECORD_HEADER_BYTES`] of `b`.
    pub fn parse(b: &[u8]) -> Header {
        assert!(
            b.len() >= RECORD_HEADER_BYTES,
            "a header is {RECORD_HEADER_BYTES} bytes"
        );
        Header {
            len: u32::from_le_bytes(b[0..4].try_into().unwrap()),
            crc: u32::from_le_bytes(b[4..8].try_into().unwrap()),
            lsn: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            kind: b[16],
        }
    }

    /// True iff every header byte is zero: unwritten space, not a record.
    pub fn is_zero(&self) -> bool {
        self.len == 0 && self.crc == 0 && self.lsn == 0 && self.kind == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The encoder's bytes are the on-disk format: any change here is a format
    /// change and must bump the segment version.
    #[test]
    fn encoder_matches_golden_bytes() {
        let mut buf = Vec::new();
        let n = encode_with(&mut buf, 0x0102_0304_0506_0708, RecordType::Frame, |b| {
            b.extend_from_slice(b"hello")
        });
        assert_eq!(n, RECORD_HEADER_BYTES + 5);
        let golden: [u8; 22] = [
            0x05, 0x00, 0x00, 0x00, // len = 5
            0x1a, 0xc8, 0x0a, 0x97, // masked crc32(lsn || type || payload), computed with Python zlib
            0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // lsn, little endian
            0x01, // type = Frame
            b'h', b'e', b'l', b'l', b'o',
        ];
        assert_eq!(buf, golden, "record encoding changed: {buf:02x?}");
    }

    #[test]
    fn a_zeroed_header_never_carries_a_valid_crc() {
        assert_ne!(record_crc(0, 0, &[]), 0);
        assert!(Header::parse(&[0u8; RECORD_HEADER_BYTES]).is_zero());
    }
}
