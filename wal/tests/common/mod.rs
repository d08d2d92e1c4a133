//! Helpers shared by the WAL's integration tests on the simulated
//! filesystem.

#![allow(dead_code)] // each test file uses its own subset

use wal::WalOptions;

/// Where the tests keep the WAL on the simulated filesystem.
pub const WAL_DIR: &str = "/state/wal";
/// Bytes of a record's header (`len`, `crc`, `lsn`, `type`).
pub const RECORD_HEADER: u64 = 17;

/// Options with segments of `segment_bytes_max` and records up to 1,000 bytes.
pub fn opts(segment_bytes_max: u64) -> WalOptions {
    WalOptions {
        segment_bytes_max,
        record_bytes_max: 1000,
    }
}

/// A payload `len` bytes long (at least the tag) starting with `tag`.
pub fn payload(tag: &str, len: usize) -> Vec<u8> {
    let mut p = tag.as_bytes().to_vec();
    p.resize(len.max(tag.len()), b'.');
    p
}
