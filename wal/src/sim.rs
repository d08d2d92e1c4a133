//! A deterministic simulated filesystem for power-loss testing, in the spirit
//! of FoundationDB's `AsyncFileNonDurable` and RocksDB's
//! `FaultInjectionTestFS`.
//!
//! # Model
//! [`SimFs`] keeps two views of one in-memory filesystem:
//! - the **volatile** view, what a running process sees: every write and
//!   namespace operation is applied to it immediately;
//! - the **durable** image, what survives a power cut.
//!
//! Each file is an inode with volatile contents and durable contents, plus
//! the list of data operations (`write_all_at`, `set_len`) applied since the
//! inode was last synced. Each directory has volatile entries (name → inode
//! or subdirectory), durable entries, and the list of namespace operations
//! (create, rename within it, rename in or out, unlink, mkdir) since it was
//! last synced. Invariant: durable contents + pending ops replayed in order =
//! volatile contents (unless a failed sync discarded ops, see below).
//!
//! - [`FsFile::sync_data`] replays the inode's pending ops onto its durable
//!   contents (cost: the bytes written since the last sync, not the file
//!   size). It says nothing about the file's name.
//! - [`Fs::sync_dir`] makes that directory's durable entries equal its
//!   volatile entries. A rename across directories is two independent halves
//!   (an unlink in the source, a link in the target), each durable with its
//!   own directory; a rename within one directory is atomic.
//! - A file whose directory entry never became durable is lost by a crash
//!   even if its data was synced; a file whose entry is durable but whose
//!   data was not synced keeps whatever durable data survived.
//! - A directory made by [`Fs::create_dir_all`] is itself an entry of its
//!   parent: it survives a crash only if that entry became durable (and so
//!   on up to a root, `/` or the empty relative root, which always exists).
//!
//! [`SimFs::crash`] is a power cut driven by a seeded PRNG (splitmix64):
//! - each pending data op of each inode, in order, is independently
//!   **dropped**, **kept**, or (writes only) **torn**: only a prefix of the
//!   write up to a 512-byte-aligned file offset strictly inside it persists,
//!   and the rest of the written range keeps its durable bytes (zeros where
//!   the write extended the file; the file length covers the whole write). A
//!   write that fits inside one sector cannot tear and is kept or dropped.
//!   Ops replay in order, so a later kept write may persist while an earlier
//!   dropped one does not, leaving a hole of zeros. A disk writes whole
//!   sectors from the page cache, so what persists of a write is whole
//!   sectors as the cache held them after that write: a sector shared with
//!   an earlier write persists with that write's bytes in it too (a later
//!   batch never persists in a sector without the tail of the batch before
//!   it);
//! - each pending namespace op of each directory, in order, is independently
//!   kept or dropped. A kept unlink or rename only acts if its source name
//!   durably refers to the same inode, otherwise it is a no-op;
//! - then the volatile view := the durable image, every pending op is
//!   cleared, unreachable directories and inodes are forgotten, and every
//!   handle opened before the crash fails with "stale handle after a crash or
//!   kill".
//!
//! Iteration is over ordered maps and inode numbers are allocated in order,
//! so the same workload and the same seed give the same durable image.
//!
//! # Fault injection
//! [`SimFs::set_sync_error`], [`SimFs::fail_syncs_after`],
//! [`SimFs::set_sync_dir_error`] and [`SimFs::set_write_error`] make the
//! corresponding calls fail with `EIO`. A failed `sync_data` makes nothing
//! durable: the inode's ops stay pending (a later successful sync would make
//! them durable), or, after [`SimFs::set_failed_sync_drops_pending`], are
//! discarded from the durable path as Linux does when it marks pages clean
//! after a writeback error: a later sync returns `Ok` without making them
//! durable, while reads still see them until a crash. Either way the failure
//! is a writeback error of the file (below): the failing handle reports it
//! (and has then seen it), every other handle open at the time reports it
//! once at its next `sync_data`. Faults persist across [`SimFs::crash`]; see
//! [`SimFs::clear_faults`]. [`SimFs::fail_unlinks_after`] makes
//! `remove_file` fail with `EIO` (the name stays).
//!
//! # Writeback errors, once per open file description (errseq)
//! Linux (since 4.13, `lib/errseq.c`, `Documentation/core-api/errseq.rst`)
//! keeps one error sequence (`errseq_t`) per file's mapping and samples it
//! into each
//! open file description (`f_wb_err`) at open; `fsync`/`fdatasync` report
//! an error recorded since the description's sample once, then advance the
//! sample and mark the error seen (`file_check_and_advance_wb_err`). Since
//! 4.17 (commit b4678df184b3 "errseq: Always report a writeback error
//! once", backported to stable kernels), `errseq_sample` at open returns 0
//! when the current error has not
//! been seen by anyone yet, so a description opened after an error nobody
//! reported still reports it; one opened after it was reported never does.
//!
//! [`SimFs::fail_writeback`] is the kernel's background writeback of a file
//! failing: the file's pending data ops are discarded from the durable path
//! (the pages are marked clean though the disk never got them; reads still
//! see them) and the error is recorded in the inode, as `errseq_t` in the
//! file's mapping. A failed `sync_data` (injected above) records one the same
//! way and reports it at once to its own handle. Each [`SimFile`] is one open
//! file description and samples that record when opened, as above: its next
//! `sync_data` writes back what is pending and then reports the error once
//! (`EIO`); a later `sync_data` on the same handle returns `Ok` (although the
//! lost pages are gone). So two threads syncing one handle see the error
//! once between them; a restarted process that reopens the file is told only
//! if nobody was told before. Not modelled: the kernel may evict an inode
//! nobody holds open, forgetting its error (so the sim reports at least as
//! much as Linux may).
//!
//! # A kill, and the page cache after it
//! A kill ([`SimFs::kill`], or simply dropping every handle) is not a power
//! cut: the volatile view (the page cache) survives, including bytes whose
//! writeback failed (clean pages a restarted process reads back, though the
//! disk never got them: a later [`SimFs::crash`] loses them, as it loses
//! every pending op it drops), the pending (dirty) ops and every inode's
//! writeback error. [`FsFile::drop_cache`] (`POSIX_FADV_DONTNEED`) drops a
//! file's clean cached pages: its volatile contents become the durable
//! contents with the still-pending (dirty) ops replayed on top, at the same
//! length (the in-memory inode size stays; bytes the disk never got read as
//! zeros). It is exact after a successful `sync_data`, which is how recovery
//! calls it.
//!
//! # Several unsynced writes on one file
//! Each `write_all_at` is one pending op of the inode, whatever handle made
//! it: a power cut keeps, tears or drops each one independently (so of three
//! written-but-unsynced batches the second may survive without the first),
//! and a `sync_data` through any handle makes every pending op of the inode
//! durable, in order, including writes made through other handles.
//!
//! # Paths
//! Paths are compared after `Path::components` normalization (`//` and
//! trailing `/` are ignored; `.` and `..` are not resolved, no current
//! directory is consulted). Only files can be renamed or removed; a file is
//! limited to [`MAX_FILE_BYTES`].

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::fs::{Fs, FsFile, OpenMode};

/// The sector size: a torn write persists a prefix ending on a multiple of it.
pub const SECTOR_BYTES: u64 = 512;

/// The largest file the simulation holds (writes beyond fail with `EFBIG`).
pub const MAX_FILE_BYTES: u64 = 1 << 30;

const EIO: i32 = 5;
const EBADF: i32 = 9;
const EFBIG: i32 = 27;

type Ino = u64;

/// A deterministic PRNG (splitmix64), enough to drive crash decisions.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Counters of the calls [`SimFs`] served, for assertions in tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimStats {
    /// `sync_data` calls that returned `Ok`.
    pub sync_data_ok: u64,
    /// `sync_data` calls that returned `EIO`.
    pub sync_data_failed: u64,
    /// `sync_dir` calls that returned `Ok`.
    pub sync_dir_ok: u64,
    /// `sync_dir` calls that returned `EIO`.
    pub sync_dir_failed: u64,
    /// `write_all_at` calls that were applied.
    pub writes: u64,
    /// `remove_file` calls that returned `EIO`.
    pub unlinks_failed: u64,
    /// `drop_cache` calls.
    pub cache_drops: u64,
    /// Crashes simulated so far.
    pub crashes: u64,
    /// Kills simulated so far ([`SimFs::kill`]).
    pub kills: u64,
}

/// What one [`SimFs::crash`] did with the pending operations.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CrashReport {
    /// Pending writes persisted whole.
    pub writes_kept: usize,
    /// Pending writes persisted up to a sector boundary strictly inside them.
    pub writes_torn: usize,
    /// Pending writes lost.
    pub writes_dropped: usize,
    /// Pending `set_len` calls persisted.
    pub set_lens_kept: usize,
    /// Pending `set_len` calls lost.
    pub set_lens_dropped: usize,
    /// Pending namespace operations persisted (a kept rename or unlink whose
    /// source was not durably there is counted here but does nothing).
    pub namespace_kept: usize,
    /// Pending namespace operations lost.
    pub namespace_dropped: usize,
}

#[derive(Debug)]
enum DataOp {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

#[derive(Debug, Default)]
struct Inode {
    /// Volatile contents.
    data: Vec<u8>,
    /// Durable contents.
    durable: Vec<u8>,
    /// Data ops since the last successful sync, in order.
    pending: Vec<DataOp>,
    /// Whether `data` may differ from `durable`.
    dirty: bool,
    /// Whether a failed sync discarded pending ops (so `data` stays different
    /// from `durable` until a crash or `drop_cache`).
    lost: bool,
    /// Writeback errors recorded so far (Linux's errseq counter).
    wb_err: u64,
    /// Whether some handle has reported `wb_err` (Linux's errseq "seen" flag).
    wb_err_seen: bool,
    /// Open handles of the current generation.
    handles: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    File(Ino),
    Dir,
}

#[derive(Debug)]
enum NsOp {
    /// A new file, or the target half of a rename from another directory.
    Link {
        name: OsString,
        ino: Ino,
    },
    /// An unlink, or the source half of a rename to another directory.
    Unlink {
        name: OsString,
        ino: Ino,
    },
    /// A rename within this directory (atomic).
    Rename {
        from: OsString,
        to: OsString,
        ino: Ino,
    },
    Mkdir {
        name: OsString,
    },
}

impl NsOp {
    fn ino(&self) -> Option<Ino> {
        match self {
            NsOp::Link { ino, .. } | NsOp::Unlink { ino, .. } | NsOp::Rename { ino, .. } => Some(*ino),
            NsOp::Mkdir { .. } => None,
        }
    }
}

#[derive(Debug, Default)]
struct Dir {
    entries: BTreeMap<OsString, Node>,
    durable: BTreeMap<OsString, Node>,
    pending: Vec<NsOp>,
}

#[derive(Debug, Default)]
struct Faults {
    sync_error: bool,
    syncs_before_failure: Option<u64>,
    sync_dir_error: bool,
    write_error: bool,
    failed_sync_drops_pending: bool,
    unlinks_before_failure: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    inodes: BTreeMap<Ino, Inode>,
    /// Every directory of the volatile view, by normalized path.
    dirs: BTreeMap<PathBuf, Dir>,
    next_ino: Ino,
    /// Bumped by each crash and kill; handles of older generations are stale.
    generation: u64,
    faults: Faults,
    stats: SimStats,
}

/// The simulated filesystem. Cheap to clone: clones share one state.
#[derive(Debug, Clone, Default)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

/// A file opened on a [`SimFs`].
#[derive(Debug)]
pub struct SimFile {
    state: Arc<Mutex<State>>,
    ino: Ino,
    generation: u64,
    writable: bool,
    /// The inode's writeback error count this handle has reported (or that
    /// was already reported by someone when it was opened).
    wb_err_sampled: std::sync::atomic::AtomicU64,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(EIO)
}

fn stale() -> io::Error {
    io::Error::other("stale handle after a crash or kill")
}

fn not_found(what: &str, path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("simfs: {what} {} not found", path.display()),
    )
}

fn normalize(path: &Path) -> PathBuf {
    path.components().collect()
}

fn is_root(path: &Path) -> bool {
    path.parent().is_none()
}

/// Splits a normalized path into its parent directory and file name.
fn split(path: &Path) -> io::Result<(PathBuf, OsString)> {
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => Ok((parent.to_path_buf(), name.to_os_string())),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("simfs: {} does not name a file", path.display()),
        )),
    }
}

fn end_of(offset: u64, len: usize) -> io::Result<u64> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= MAX_FILE_BYTES => Ok(end),
        _ => Err(io::Error::from_raw_os_error(EFBIG)),
    }
}

fn write_into(buf: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let (start, end) = (offset as usize, offset as usize + data.len());
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[start..end].copy_from_slice(data);
}

fn apply(buf: &mut Vec<u8>, op: &DataOp) {
    match op {
        DataOp::Write { offset, data } => write_into(buf, *offset, data),
        DataOp::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

/// The sector boundaries strictly inside `offset..offset + len`: the first one
/// and how many there are.
fn inner_boundaries(offset: u64, len: u64) -> (u64, u64) {
    let end = offset + len;
    let first = (offset / SECTOR_BYTES + 1) * SECTOR_BYTES;
    if first >= end {
        (first, 0)
    } else {
        (first, (end - 1 - first) / SECTOR_BYTES + 1)
    }
}

/// How a crash treats one pending op: `None` drops everything.
fn chance(rng: &mut Option<SplitMix64>, n: u64) -> u64 {
    rng.as_mut().map_or(0, |r| r.below(n))
}

impl State {
    fn dir_exists(&self, path: &Path) -> bool {
        is_root(path) || self.dirs.contains_key(path)
    }

    fn dir(&self, path: &Path) -> Option<&Dir> {
        self.dirs.get(path)
    }

    /// The directory at `path`, creating a root on first use.
    fn dir_mut(&mut self, path: &Path) -> Option<&mut Dir> {
        if is_root(path) {
            Some(self.dirs.entry(path.to_path_buf()).or_default())
        } else {
            self.dirs.get_mut(path)
        }
    }

    /// The volatile node at a normalized path.
    fn lookup(&self, path: &Path) -> Option<Node> {
        if is_root(path) {
            return Some(Node::Dir);
        }
        let (parent, name) = split(path).ok()?;
        self.dir(&parent)?.entries.get(&name).copied()
    }

    /// The inode of a durable file at a normalized path, if the whole chain of
    /// directories leading to it is durable too.
    fn durable_lookup(&self, path: &Path) -> Option<Ino> {
        let (parent, name) = split(path).ok()?;
        let mut dir = parent.as_path();
        while let (Some(up), Some(dir_name)) = (dir.parent(), dir.file_name()) {
            if self.dir(up)?.durable.get(dir_name) != Some(&Node::Dir) {
                return None;
            }
            dir = up;
        }
        match self.dir(&parent)?.durable.get(&name)? {
            Node::File(ino) => Some(*ino),
            Node::Dir => None,
        }
    }

    fn new_inode(&mut self) -> Ino {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::default());
        ino
    }

    fn inode(&mut self, ino: Ino, generation: u64) -> io::Result<&mut Inode> {
        if generation != self.generation {
            return Err(stale());
        }
        self.inodes.get_mut(&ino).ok_or_else(stale)
    }

    /// Forgets `ino` if nothing can reach it any more: no open handle, no
    /// volatile or durable entry, no pending namespace op a crash could keep.
    fn try_gc(&mut self, ino: Ino) {
        if self.inodes.get(&ino).is_none_or(|inode| inode.handles > 0) {
            return;
        }
        let node = Node::File(ino);
        let referenced = self.dirs.values().any(|dir| {
            dir.entries.values().any(|n| *n == node)
                || dir.durable.values().any(|n| *n == node)
                || dir.pending.iter().any(|op| op.ino() == Some(ino))
        });
        if !referenced {
            self.inodes.remove(&ino);
        }
    }

    fn sync_inode(&mut self, ino: Ino, generation: u64, sampled: &std::sync::atomic::AtomicU64) -> io::Result<()> {
        self.inode(ino, generation)?;
        let faults = &mut self.faults;
        let mut fail = faults.sync_error;
        if !fail && let Some(budget) = &mut faults.syncs_before_failure {
            if *budget == 0 {
                fail = true;
            } else {
                *budget -= 1;
            }
        }
        let drop_pending = faults.failed_sync_drops_pending;
        let inode = self.inodes.get_mut(&ino).ok_or_else(stale)?;
        if fail {
            self.stats.sync_data_failed += 1;
            if drop_pending && !inode.pending.is_empty() {
                inode.pending.clear();
                inode.lost = true;
            }
            // The writeback this sync started failed: the error goes into
            // the inode's errseq (every other description open now reports
            // it once, at its next sync) and this description reports it
            // now, which marks it seen (a description opened later is not
            // told). Linux: mapping_set_error, then
            // file_check_and_advance_wb_err.
            inode.wb_err += 1;
            inode.wb_err_seen = true;
            sampled.store(inode.wb_err, std::sync::atomic::Ordering::SeqCst);
            return Err(eio());
        }
        for op in inode.pending.drain(..) {
            apply(&mut inode.durable, &op);
        }
        inode.dirty = inode.lost;
        // What is pending was written back; an earlier writeback error is
        // then reported once per handle (Linux's file_check_and_advance_wb_err).
        let seen = sampled.load(std::sync::atomic::Ordering::SeqCst);
        if seen != inode.wb_err {
            sampled.store(inode.wb_err, std::sync::atomic::Ordering::SeqCst);
            inode.wb_err_seen = true;
            self.stats.sync_data_failed += 1;
            return Err(eio());
        }
        self.stats.sync_data_ok += 1;
        Ok(())
    }

    /// Background writeback of `ino` fails: see [`SimFs::fail_writeback`].
    fn fail_writeback(&mut self, ino: Ino) {
        let inode = self.inodes.get_mut(&ino).expect("live inode");
        if !inode.pending.is_empty() {
            inode.pending.clear();
            inode.lost = true;
        }
        inode.wb_err += 1;
        inode.wb_err_seen = false;
    }

    /// `POSIX_FADV_DONTNEED`: see the module docs.
    fn drop_cache(&mut self, ino: Ino, generation: u64) -> io::Result<()> {
        let inode = self.inode(ino, generation)?;
        if inode.lost {
            let mut cached = inode.durable.clone();
            for op in &inode.pending {
                apply(&mut cached, op);
            }
            cached.resize(inode.data.len(), 0);
            inode.data = cached;
            inode.lost = false;
            inode.dirty = !inode.pending.is_empty();
        }
        self.stats.cache_drops += 1;
        Ok(())
    }

    /// A kill: see [`SimFs::kill`].
    fn kill(&mut self) {
        for inode in self.inodes.values_mut() {
            inode.handles = 0;
        }
        let inos: Vec<Ino> = self.inodes.keys().copied().collect();
        for ino in inos {
            self.try_gc(ino);
        }
        self.generation += 1;
        self.stats.kills += 1;
    }

    fn crash(&mut self, mut rng: Option<SplitMix64>) -> CrashReport {
        let mut report = CrashReport::default();
        for inode in self.inodes.values_mut() {
            // The file as the page cache held it after each op in turn: a
            // sector reaches the disk whole, with the bytes of every earlier
            // op in it, so a write that persists carries the rest of its
            // first and last sectors from here.
            let mut cache = inode.durable.clone();
            for op in std::mem::take(&mut inode.pending) {
                apply(&mut cache, &op);
                match op {
                    DataOp::Write { offset, data } => {
                        let end = offset + data.len() as u64;
                        let persist = |durable: &mut Vec<u8>, cut: u64| {
                            let from = offset / SECTOR_BYTES * SECTOR_BYTES;
                            let to = cut.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
                            let to = to.min(cache.len() as u64);
                            write_into(durable, from, &cache[from as usize..to as usize]);
                        };
                        match chance(&mut rng, 3) {
                            0 => report.writes_dropped += 1,
                            1 => {
                                persist(&mut inode.durable, end);
                                report.writes_kept += 1;
                            }
                            _ => {
                                let (first, count) = inner_boundaries(offset, data.len() as u64);
                                if count > 0 {
                                    let cut = first + SECTOR_BYTES * chance(&mut rng, count);
                                    if inode.durable.len() < end as usize {
                                        inode.durable.resize(end as usize, 0);
                                    }
                                    persist(&mut inode.durable, cut);
                                    report.writes_torn += 1;
                                } else if chance(&mut rng, 2) == 1 {
                                    persist(&mut inode.durable, end);
                                    report.writes_kept += 1;
                                } else {
                                    report.writes_dropped += 1;
                                }
                            }
                        }
                    }
                    DataOp::SetLen(len) => {
                        if chance(&mut rng, 2) == 1 {
                            inode.durable.resize(len as usize, 0);
                            report.set_lens_kept += 1;
                        } else {
                            report.set_lens_dropped += 1;
                        }
                    }
                }
            }
            if inode.dirty {
                inode.data.clone_from(&inode.durable);
            }
            inode.dirty = false;
            inode.lost = false;
            inode.wb_err = 0;
            inode.wb_err_seen = false;
            inode.handles = 0;
        }

        for dir in self.dirs.values_mut() {
            for op in std::mem::take(&mut dir.pending) {
                if chance(&mut rng, 2) == 0 {
                    report.namespace_dropped += 1;
                    continue;
                }
                report.namespace_kept += 1;
                let durable = &mut dir.durable;
                match op {
                    NsOp::Link { name, ino } => {
                        durable.insert(name, Node::File(ino));
                    }
                    NsOp::Unlink { name, ino } => {
                        if durable.get(&name) == Some(&Node::File(ino)) {
                            durable.remove(&name);
                        }
                    }
                    NsOp::Rename { from, to, ino } => {
                        if durable.get(&from) == Some(&Node::File(ino)) {
                            durable.remove(&from);
                            durable.insert(to, Node::File(ino));
                        }
                    }
                    NsOp::Mkdir { name } => {
                        durable.insert(name, Node::Dir);
                    }
                }
            }
        }

        // A parent sorts before its children, so one ordered pass finds every
        // directory reachable from a root through durable entries.
        let mut reachable = BTreeSet::new();
        for path in self.dirs.keys() {
            let ok = match (path.parent(), path.file_name()) {
                (None, _) => true,
                (Some(up), Some(name)) => reachable.contains(up) && self.dirs[up].durable.get(name) == Some(&Node::Dir),
                (Some(_), None) => false,
            };
            if ok {
                reachable.insert(path.clone());
            }
        }
        self.dirs.retain(|path, _| reachable.contains(path));
        let mut live = BTreeSet::new();
        for dir in self.dirs.values_mut() {
            dir.entries.clone_from(&dir.durable);
            live.extend(dir.durable.values().filter_map(|node| match node {
                Node::File(ino) => Some(*ino),
                Node::Dir => None,
            }));
        }
        self.inodes.retain(|ino, _| live.contains(ino));
        self.generation += 1;
        self.stats.crashes += 1;
        report
    }

    fn list(&self, durable: bool) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for (path, dir) in &self.dirs {
            let entries = if durable { &dir.durable } else { &dir.entries };
            for (name, node) in entries {
                let file = path.join(name);
                if matches!(node, Node::File(_)) && (!durable || self.durable_lookup(&file).is_some()) {
                    out.push(file);
                }
            }
        }
        out
    }
}

impl SimFs {
    /// An empty filesystem: only the roots (`/` and the relative root) exist.
    pub fn new() -> Self {
        SimFs::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Simulates a power cut (see the module docs), choosing the fate of every
    /// pending op with a PRNG seeded by `seed`.
    pub fn crash(&self, seed: u64) -> CrashReport {
        self.lock().crash(Some(SplitMix64::new(seed)))
    }

    /// Simulates a kill of the process (`kill -9`), not a power cut: every
    /// handle opened so far becomes stale (its calls fail, as the fds of a
    /// dead process are closed), while the page cache stays as it is:
    /// volatile contents (including pages whose writeback failed: clean,
    /// readable, never on the disk), pending (dirty) ops, which a later
    /// sync or power cut decides, and each inode's writeback error state
    /// (an error nobody reported is reported to the next process). Dropping
    /// every handle does the same; this also stops handles a killed
    /// process's leftover threads still hold.
    pub fn kill(&self) {
        self.lock().kill();
    }

    /// Simulates a power cut that loses every pending op: afterwards the
    /// volatile view is exactly the durable image as it was.
    pub fn crash_dropping_all(&self) -> CrashReport {
        self.lock().crash(None)
    }

    /// Makes the whole volatile view durable, as if every file and every
    /// directory had been synced (a shortcut to set up a test's initial state).
    pub fn persist_all(&self) {
        let mut state = self.lock();
        for inode in state.inodes.values_mut() {
            inode.durable.clone_from(&inode.data);
            inode.pending.clear();
            inode.dirty = false;
            inode.lost = false;
        }
        for dir in state.dirs.values_mut() {
            dir.durable.clone_from(&dir.entries);
            dir.pending.clear();
        }
    }

    /// Volatile contents of the file at `path` (what a reader sees now).
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        match state.lookup(&normalize(path))? {
            Node::File(ino) => Some(state.inodes[&ino].data.clone()),
            Node::Dir => None,
        }
    }

    /// Durable contents of the file at `path`: what a crash that loses every
    /// pending op would leave (`None` if the name or a parent is not durable).
    pub fn durable_read(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        let ino = state.durable_lookup(&normalize(path))?;
        Some(state.inodes[&ino].durable.clone())
    }

    /// Every file of the volatile view, sorted.
    pub fn list_all(&self) -> Vec<PathBuf> {
        self.lock().list(false)
    }

    /// Every file of the durable image, sorted.
    pub fn durable_list_all(&self) -> Vec<PathBuf> {
        self.lock().list(true)
    }

    /// Number of pending (unsynced) data ops of the file at `path`.
    pub fn pending_data_ops(&self, path: &Path) -> Option<usize> {
        let state = self.lock();
        match state.lookup(&normalize(path))? {
            Node::File(ino) => Some(state.inodes[&ino].pending.len()),
            Node::Dir => None,
        }
    }

    /// Number of pending (unsynced) namespace ops of the directory `dir`.
    pub fn pending_namespace_ops(&self, dir: &Path) -> Option<usize> {
        self.lock().dir(&normalize(dir)).map(|d| d.pending.len())
    }

    /// Counters of the calls served so far.
    pub fn stats(&self) -> SimStats {
        self.lock().stats
    }

    /// While `on`, every `sync_data` fails with `EIO`.
    pub fn set_sync_error(&self, on: bool) {
        self.lock().faults.sync_error = on;
    }

    /// The next `n` `sync_data` calls succeed, every later one fails with
    /// `EIO` (until [`SimFs::clear_faults`]).
    pub fn fail_syncs_after(&self, n: u64) {
        self.lock().faults.syncs_before_failure = Some(n);
    }

    /// While `on`, every `sync_dir` fails with `EIO` (nothing becomes durable).
    pub fn set_sync_dir_error(&self, on: bool) {
        self.lock().faults.sync_dir_error = on;
    }

    /// While `on`, `write_all_at` and `set_len` fail with `EIO` and change
    /// nothing.
    pub fn set_write_error(&self, on: bool) {
        self.lock().faults.write_error = on;
    }

    /// When `on`, a failed `sync_data` discards the inode's pending ops from
    /// the durable path (Linux marks the pages clean after a writeback
    /// error): a later sync returns `Ok` without making them durable. When
    /// off (the default) they stay pending.
    pub fn set_failed_sync_drops_pending(&self, on: bool) {
        self.lock().faults.failed_sync_drops_pending = on;
    }

    /// The next `n` `remove_file` calls succeed, every later one fails with
    /// `EIO` and removes nothing (until [`SimFs::clear_faults`]).
    pub fn fail_unlinks_after(&self, n: u64) {
        self.lock().faults.unlinks_before_failure = Some(n);
    }

    /// The kernel's background writeback of the file at `path` fails now:
    /// its pending data ops never become durable (reads still see them until
    /// a crash or [`FsFile::drop_cache`]), and the error is reported once per
    /// open file description, by its next `sync_data` (see the module docs).
    /// Panics if `path` names no file.
    pub fn fail_writeback(&self, path: &Path) {
        let mut state = self.lock();
        match state.lookup(&normalize(path)) {
            Some(Node::File(ino)) => state.fail_writeback(ino),
            _ => panic!("simfs: fail_writeback: no file {}", path.display()),
        }
    }

    /// Turns every injected fault off.
    pub fn clear_faults(&self) {
        self.lock().faults = Faults::default();
    }

    fn open_file(&self, path: &Path, mode: OpenMode) -> io::Result<SimFile> {
        let path = normalize(path);
        let (parent, name) = split(&path)?;
        let mut state = self.lock();
        if !state.dir_exists(&parent) {
            return Err(not_found("directory", &parent));
        }
        let ino = match (state.lookup(&path), mode) {
            (Some(Node::Dir), _) => {
                return Err(io::Error::new(io::ErrorKind::IsADirectory, "simfs: is a directory"));
            }
            (None, OpenMode::Read | OpenMode::ReadWrite) => return Err(not_found("file", &path)),
            (Some(Node::File(_)), OpenMode::CreateNew) => {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "simfs: file exists"));
            }
            (None, OpenMode::CreateOrOpen | OpenMode::CreateTruncate | OpenMode::CreateNew) => {
                let ino = state.new_inode();
                let dir = state.dir_mut(&parent).expect("checked above");
                dir.entries.insert(name.clone(), Node::File(ino));
                dir.pending.push(NsOp::Link { name, ino });
                ino
            }
            (Some(Node::File(ino)), OpenMode::CreateTruncate) => {
                let inode = state.inodes.get_mut(&ino).expect("entries point to live inodes");
                if !inode.data.is_empty() {
                    inode.data.clear();
                    inode.pending.push(DataOp::SetLen(0));
                    inode.dirty = true;
                }
                ino
            }
            (Some(Node::File(ino)), _) => ino,
        };
        let inode = state.inodes.get_mut(&ino).expect("live inode");
        inode.handles += 1;
        // Linux's errseq_sample: an error nobody has reported yet is
        // reported to this handle too; one already reported is not.
        let sampled = if inode.wb_err_seen { inode.wb_err } else { 0 };
        Ok(SimFile {
            state: Arc::clone(&self.state),
            ino,
            generation: state.generation,
            writable: mode != OpenMode::Read,
            wb_err_sampled: sampled.into(),
        })
    }
}

impl Fs for SimFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        Ok(Box::new(self.open_file(path, mode)?))
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path);
        let mut state = self.lock();
        let mut chain: Vec<&Path> = path.ancestors().collect();
        chain.reverse();
        for dir in chain {
            if is_root(dir) {
                state.dir_mut(dir);
                continue;
            }
            let (parent, name) = split(dir)?;
            match state.lookup(dir) {
                Some(Node::Dir) => continue,
                Some(Node::File(_)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        format!("simfs: {} is a file", dir.display()),
                    ));
                }
                None => {}
            }
            let up = state.dir_mut(&parent).expect("parents are created first");
            up.entries.insert(name.clone(), Node::Dir);
            up.pending.push(NsOp::Mkdir { name });
            state.dirs.insert(dir.to_path_buf(), Dir::default());
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        let state = self.lock();
        let norm = normalize(path);
        match state.lookup(&norm) {
            None => Err(not_found("directory", path)),
            Some(Node::File(_)) => Err(io::Error::new(io::ErrorKind::NotADirectory, "simfs: not a directory")),
            Some(Node::Dir) => Ok(state
                .dir(&norm)
                .map(|dir| {
                    dir.entries
                        .iter()
                        .filter(|(_, node)| matches!(node, Node::File(_)))
                        .map(|(name, _)| path.join(name))
                        .collect()
                })
                .unwrap_or_default()),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (normalize(from), normalize(to));
        let (from_dir, from_name) = split(&from)?;
        let (to_dir, to_name) = split(&to)?;
        let mut state = self.lock();
        let ino = match state.lookup(&from) {
            None => return Err(not_found("file", &from)),
            Some(Node::Dir) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "simfs: cannot rename a directory",
                ));
            }
            Some(Node::File(ino)) => ino,
        };
        if !state.dir_exists(&to_dir) {
            return Err(not_found("directory", &to_dir));
        }
        let replaced = match state.lookup(&to) {
            Some(Node::Dir) => {
                return Err(io::Error::new(
                    io::ErrorKind::IsADirectory,
                    "simfs: target is a directory",
                ));
            }
            Some(Node::File(old)) if old == ino => return Ok(()),
            Some(Node::File(old)) => Some(old),
            None => None,
        };
        if from_dir == to_dir {
            let dir = state.dir_mut(&from_dir).expect("holds `from`");
            dir.entries.remove(&from_name);
            dir.entries.insert(to_name.clone(), Node::File(ino));
            dir.pending.push(NsOp::Rename {
                from: from_name,
                to: to_name,
                ino,
            });
        } else {
            let src = state.dir_mut(&from_dir).expect("holds `from`");
            src.entries.remove(&from_name);
            src.pending.push(NsOp::Unlink { name: from_name, ino });
            let dst = state.dir_mut(&to_dir).expect("checked above");
            dst.entries.insert(to_name.clone(), Node::File(ino));
            dst.pending.push(NsOp::Link { name: to_name, ino });
        }
        if let Some(old) = replaced {
            state.try_gc(old);
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path);
        let (parent, name) = split(&path)?;
        let mut state = self.lock();
        let ino = match state.lookup(&path) {
            None => return Err(not_found("file", &path)),
            Some(Node::Dir) => {
                return Err(io::Error::new(io::ErrorKind::IsADirectory, "simfs: is a directory"));
            }
            Some(Node::File(ino)) => ino,
        };
        if let Some(budget) = &mut state.faults.unlinks_before_failure {
            if *budget == 0 {
                state.stats.unlinks_failed += 1;
                return Err(eio());
            }
            *budget -= 1;
        }
        let dir = state.dir_mut(&parent).expect("holds the file");
        dir.entries.remove(&name);
        dir.pending.push(NsOp::Unlink { name, ino });
        state.try_gc(ino);
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let norm = normalize(path);
        let mut state = self.lock();
        match state.lookup(&norm) {
            None => return Err(not_found("directory", path)),
            Some(Node::File(_)) => {
                return Err(io::Error::new(io::ErrorKind::NotADirectory, "simfs: not a directory"));
            }
            Some(Node::Dir) => {}
        }
        if state.faults.sync_dir_error {
            state.stats.sync_dir_failed += 1;
            return Err(eio());
        }
        state.stats.sync_dir_ok += 1;
        let dir = state.dir_mut(&norm).expect("exists");
        let gone: Vec<Ino> = dir.pending.iter().filter_map(NsOp::ino).collect();
        dir.pending.clear();
        dir.durable.clone_from(&dir.entries);
        for ino in gone {
            state.try_gc(ino);
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        self.lock().lookup(&normalize(path)).is_some()
    }
}

impl SimFile {
    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(EBADF))
        }
    }
}

impl FsFile for SimFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut state = lock(&self.state);
        let data = &state.inode(self.ino, self.generation)?.data;
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.inode(self.ino, self.generation)?;
        self.check_writable()?;
        if state.faults.write_error {
            return Err(eio());
        }
        end_of(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        state.stats.writes += 1;
        let inode = state.inode(self.ino, self.generation)?;
        write_into(&mut inode.data, offset, buf);
        inode.pending.push(DataOp::Write {
            offset,
            data: buf.to_vec(),
        });
        inode.dirty = true;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        lock(&self.state).sync_inode(self.ino, self.generation, &self.wb_err_sampled)
    }

    fn drop_cache(&self) -> io::Result<()> {
        lock(&self.state).drop_cache(self.ino, self.generation)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.inode(self.ino, self.generation)?;
        self.check_writable()?;
        if state.faults.write_error {
            return Err(eio());
        }
        end_of(len, 0)?;
        let inode = state.inode(self.ino, self.generation)?;
        inode.data.resize(len as usize, 0);
        inode.pending.push(DataOp::SetLen(len));
        inode.dirty = true;
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut state = lock(&self.state);
        Ok(state.inode(self.ino, self.generation)?.data.len() as u64)
    }
}

impl Drop for SimFile {
    fn drop(&mut self) {
        let mut state = lock(&self.state);
        if state.generation != self.generation {
            return;
        }
        if let Some(inode) = state.inodes.get_mut(&self.ino) {
            inode.handles = inode.handles.saturating_sub(1);
            state.try_gc(self.ino);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEEDS: u64 = 200;

    fn p(s: &str) -> &Path {
        Path::new(s)
    }

    /// A filesystem with a durable empty directory `/d`.
    fn fs_with_dir() -> SimFs {
        let fs = SimFs::new();
        fs.create_dir_all(p("/d")).unwrap();
        fs.sync_dir(p("/")).unwrap();
        fs
    }

    /// `/d/f` durably created with `contents` synced.
    fn fs_with_file(contents: &[u8]) -> SimFs {
        let fs = fs_with_dir();
        let f = fs.open(p("/d/f"), OpenMode::CreateOrOpen).unwrap();
        f.write_all_at(contents, 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(p("/d")).unwrap();
        fs
    }

    fn name_of(path: &Path) -> &std::ffi::OsStr {
        path.file_name().unwrap_or_default()
    }

    fn image(fs: &SimFs) -> Vec<(PathBuf, Vec<u8>)> {
        fs.list_all()
            .into_iter()
            .map(|path| (path.clone(), fs.read_file(&path).unwrap()))
            .collect()
    }

    /// A random workload over a few files: writes, truncations, renames,
    /// removals, syncs of files and of the directory.
    fn workload(fs: &SimFs, seed: u64, ops: usize) {
        let mut rng = SplitMix64::new(seed);
        fs.create_dir_all(p("/w/sub")).unwrap();
        fs.sync_dir(p("/")).unwrap();
        fs.sync_dir(p("/w")).unwrap();
        let names = ["/w/a", "/w/b", "/w/c", "/w/sub/x"];
        for _ in 0..ops {
            let name = p(names[rng.below(names.len() as u64) as usize]);
            match rng.below(20) {
                0..=13 => {
                    // Mostly appends (a log), some overwrites near the end.
                    let f = fs.open(name, OpenMode::CreateOrOpen).unwrap();
                    let offset = f.len().unwrap().saturating_sub(rng.below(1500)) + rng.below(1000);
                    let len = 1 + rng.below(8000) as usize;
                    let byte = rng.below(255) as u8 + 1;
                    f.write_all_at(&vec![byte; len], offset).unwrap();
                    if rng.below(3) == 0 {
                        f.sync_data().unwrap();
                    }
                }
                14 => {
                    let f = fs.open(name, OpenMode::CreateOrOpen).unwrap();
                    f.set_len(f.len().unwrap().saturating_sub(rng.below(3000)) + rng.below(100))
                        .unwrap();
                }
                15 => {
                    let to = p(names[rng.below(names.len() as u64) as usize]);
                    let _ = fs.rename(name, to);
                }
                16 if rng.below(4) == 0 => {
                    let _ = fs.remove_file(name);
                }
                16 | 17 => fs.sync_dir(p("/w")).unwrap(),
                _ => {
                    if let Ok(f) = fs.open(name, OpenMode::Read) {
                        f.sync_data().unwrap();
                    }
                }
            }
        }
    }

    #[test]
    fn synced_data_survives_a_crash() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        for seed in 0..SEEDS {
            let fs = fs_with_file(&data);
            fs.crash(seed);
            assert_eq!(fs.read_file(p("/d/f")).as_deref(), Some(&data[..]), "seed {seed}");
        }
    }

    #[test]
    fn unsynced_data_may_be_lost() {
        let (mut kept, mut lost) = (0, 0);
        for seed in 0..SEEDS {
            let fs = fs_with_file(b"old");
            let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
            f.write_all_at(b"new", 0).unwrap();
            assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"new");
            assert_eq!(fs.durable_read(p("/d/f")).unwrap(), b"old");
            fs.crash(seed);
            match fs.read_file(p("/d/f")).unwrap().as_slice() {
                b"new" => kept += 1,
                b"old" => lost += 1,
                other => panic!("seed {seed}: unexpected contents {other:?}"),
            }
        }
        assert!(kept > 0 && lost > 0, "kept {kept}, lost {lost}");
    }

    #[test]
    fn a_crash_dropping_all_leaves_exactly_the_durable_image() {
        let fs = fs_with_file(b"durable");
        let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        f.write_all_at(b"volatile and longer", 0).unwrap();
        fs.open(p("/d/g"), OpenMode::CreateOrOpen).unwrap();
        let report = fs.crash_dropping_all();
        assert_eq!(report.writes_dropped, 1);
        assert_eq!(fs.list_all(), vec![PathBuf::from("/d/f")]);
        assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"durable");
    }

    #[test]
    fn a_created_and_synced_file_can_vanish_when_its_directory_was_not_synced() {
        let (mut present, mut vanished) = (0, 0);
        for seed in 0..SEEDS {
            let fs = fs_with_dir();
            let f = fs.open(p("/d/new"), OpenMode::CreateTruncate).unwrap();
            f.write_all_at(b"synced", 0).unwrap();
            f.sync_data().unwrap();
            assert_eq!(fs.durable_read(p("/d/new")), None);
            fs.crash(seed);
            match fs.read_file(p("/d/new")) {
                Some(data) => {
                    assert_eq!(data, b"synced", "seed {seed}");
                    present += 1;
                }
                None => vanished += 1,
            }
        }
        assert!(present > 0 && vanished > 0, "present {present}, vanished {vanished}");
    }

    #[test]
    fn a_created_file_whose_directory_was_synced_survives_with_its_durable_data() {
        for seed in 0..SEEDS {
            let fs = fs_with_dir();
            let f = fs.open(p("/d/new"), OpenMode::CreateTruncate).unwrap();
            fs.sync_dir(p("/d")).unwrap();
            f.write_all_at(b"never synced", 0).unwrap();
            fs.crash(seed);
            let data = fs.read_file(p("/d/new")).expect("the entry is durable");
            assert!(data.is_empty() || data == b"never synced", "seed {seed}: {data:?}");
        }
    }

    #[test]
    fn a_directory_whose_parent_was_not_synced_can_vanish_with_its_files() {
        let (mut present, mut vanished) = (0, 0);
        for seed in 0..SEEDS {
            let fs = fs_with_dir();
            fs.create_dir_all(p("/d/sub/deeper")).unwrap();
            let f = fs.open(p("/d/sub/deeper/f"), OpenMode::CreateOrOpen).unwrap();
            f.sync_data().unwrap();
            fs.sync_dir(p("/d/sub/deeper")).unwrap();
            fs.sync_dir(p("/d/sub")).unwrap();
            fs.crash(seed);
            if fs.exists(p("/d/sub")) {
                assert!(fs.exists(p("/d/sub/deeper/f")), "seed {seed}");
                present += 1;
            } else {
                assert_eq!(fs.list_all(), Vec::<PathBuf>::new(), "seed {seed}");
                assert_eq!(
                    fs.open(p("/d/sub/deeper/f"), OpenMode::Read).err().map(|e| e.kind()),
                    Some(io::ErrorKind::NotFound)
                );
                vanished += 1;
            }
        }
        assert!(present > 0 && vanished > 0, "present {present}, vanished {vanished}");
    }

    #[test]
    fn a_rename_without_sync_dir_may_be_lost_and_with_sync_dir_survives() {
        let (mut renamed, mut not_renamed) = (0, 0);
        for seed in 0..SEEDS {
            for sync in [false, true] {
                let fs = fs_with_dir();
                let f = fs.open(p("/d/seg.tmp"), OpenMode::CreateTruncate).unwrap();
                f.write_all_at(b"header", 0).unwrap();
                f.sync_data().unwrap();
                fs.sync_dir(p("/d")).unwrap();
                fs.rename(p("/d/seg.tmp"), p("/d/seg")).unwrap();
                assert_eq!(fs.list_all(), vec![PathBuf::from("/d/seg")]);
                if sync {
                    fs.sync_dir(p("/d")).unwrap();
                }
                fs.crash(seed);
                let names: Vec<_> = fs.list_all().iter().map(|path| name_of(path).to_owned()).collect();
                if sync {
                    assert_eq!(names, ["seg"], "seed {seed}");
                } else if names == ["seg"] {
                    renamed += 1;
                } else {
                    assert_eq!(names, ["seg.tmp"], "seed {seed}: a rename within a directory is atomic");
                    not_renamed += 1;
                }
                let only = fs.list_all().pop().unwrap();
                assert_eq!(fs.read_file(&only).unwrap(), b"header");
            }
        }
        assert!(
            renamed > 0 && not_renamed > 0,
            "renamed {renamed}, not renamed {not_renamed}"
        );
    }

    #[test]
    fn a_rename_over_an_existing_file_keeps_one_of_the_two_versions() {
        for seed in 0..SEEDS {
            let fs = fs_with_file(b"old");
            let f = fs.open(p("/d/f.tmp"), OpenMode::CreateTruncate).unwrap();
            f.write_all_at(b"new", 0).unwrap();
            f.sync_data().unwrap();
            fs.rename(p("/d/f.tmp"), p("/d/f")).unwrap();
            fs.crash(seed);
            let data = fs.read_file(p("/d/f")).expect("never missing");
            assert!(data == b"old" || data == b"new", "seed {seed}: {data:?}");
        }
    }

    #[test]
    fn a_sync_error_leaves_data_not_durable() {
        let fs = fs_with_file(b"old");
        let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        f.write_all_at(b"new", 0).unwrap();
        fs.set_sync_error(true);
        let err = f.sync_data().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(EIO));
        assert_eq!(fs.durable_read(p("/d/f")).unwrap(), b"old");
        assert_eq!(fs.pending_data_ops(p("/d/f")), Some(1));
        assert_eq!(fs.stats().sync_data_failed, 1);
        fs.crash_dropping_all();
        assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"old");
    }

    #[test]
    fn fail_syncs_after_lets_n_syncs_succeed_then_fails_them_all() {
        let fs = fs_with_dir();
        let f = fs.open(p("/d/f"), OpenMode::CreateOrOpen).unwrap();
        fs.fail_syncs_after(2);
        for (i, expect_ok) in [true, true, false, false].into_iter().enumerate() {
            f.write_all_at(&[i as u8 + 1], i as u64).unwrap();
            assert_eq!(f.sync_data().is_ok(), expect_ok, "sync {i}");
        }
        assert_eq!(fs.stats().sync_data_ok, 2);
        assert_eq!(fs.stats().sync_data_failed, 2);
        fs.clear_faults();
        f.sync_data().unwrap();
        assert_eq!(fs.read_file(p("/d/f")).unwrap(), [1, 2, 3, 4]);
    }

    #[test]
    fn a_failed_sync_that_drops_pending_ops_never_makes_them_durable() {
        let fs = fs_with_file(b"old");
        fs.set_failed_sync_drops_pending(true);
        let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        f.write_all_at(b"new", 0).unwrap();
        fs.set_sync_error(true);
        assert!(f.sync_data().is_err());
        fs.set_sync_error(false);
        f.sync_data().expect("the retry reports success");
        assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"new", "the page cache still has it");
        assert_eq!(fs.durable_read(p("/d/f")).unwrap(), b"old");
        for seed in 0..20 {
            fs.crash(seed);
            assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"old");
        }
    }

    #[test]
    fn a_writeback_error_is_reported_once_per_open_file_description() {
        let fs = fs_with_file(b"old");
        let a = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        let b = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        a.write_all_at(b"new", 0).unwrap();
        fs.fail_writeback(p("/d/f"));
        assert_eq!(a.sync_data().unwrap_err().raw_os_error(), Some(EIO));
        a.sync_data().expect("the same description is told once");
        assert_eq!(b.sync_data().unwrap_err().raw_os_error(), Some(EIO));
        b.sync_data().unwrap();
        // Opened after the error was reported: never told.
        fs.open(p("/d/f"), OpenMode::Read).unwrap().sync_data().unwrap();
        assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"new", "the page cache still has it");
        assert_eq!(fs.durable_read(p("/d/f")).unwrap(), b"old");
    }

    #[test]
    fn a_writeback_error_nobody_reported_yet_is_reported_to_a_handle_opened_later() {
        let fs = fs_with_file(b"old");
        let a = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        a.write_all_at(b"new", 0).unwrap();
        fs.fail_writeback(p("/d/f"));
        drop(a);
        let b = fs.open(p("/d/f"), OpenMode::Read).unwrap();
        assert_eq!(b.sync_data().unwrap_err().raw_os_error(), Some(EIO));
        b.sync_data().unwrap();
    }

    #[test]
    fn a_failed_sync_is_reported_once_to_every_other_description_open_when_it_failed() {
        for drops in [false, true] {
            let fs = fs_with_file(b"old");
            let a = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
            let b = fs.open(p("/d/f"), OpenMode::Read).unwrap();
            a.write_all_at(b"new", 0).unwrap();
            fs.set_failed_sync_drops_pending(drops);
            fs.set_sync_error(true);
            assert_eq!(a.sync_data().unwrap_err().raw_os_error(), Some(EIO));
            fs.clear_faults();
            a.sync_data().expect("the failing description has seen its error");
            assert_eq!(
                b.sync_data().unwrap_err().raw_os_error(),
                Some(EIO),
                "drops {drops}: a description open at the failure is told once"
            );
            b.sync_data().unwrap();
            // Opened after the failing sync reported it: never told.
            fs.open(p("/d/f"), OpenMode::Read).unwrap().sync_data().unwrap();
            let durable = fs.durable_read(p("/d/f")).unwrap();
            assert_eq!(durable, if drops { &b"old"[..] } else { &b"new"[..] }, "drops {drops}");
        }
    }

    #[test]
    fn a_sync_through_one_description_makes_the_writes_of_every_description_durable() {
        let fs = fs_with_file(b"");
        let a = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        let b = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        a.write_all_at(b"aaaa", 0).unwrap();
        b.write_all_at(b"bb", 4).unwrap();
        a.write_all_at(b"cc", 6).unwrap();
        assert_eq!(fs.pending_data_ops(p("/d/f")), Some(3));
        let c = fs.open(p("/d/f"), OpenMode::Read).unwrap();
        c.sync_data().unwrap();
        assert_eq!(fs.pending_data_ops(p("/d/f")), Some(0));
        fs.crash_dropping_all();
        assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"aaaabbcc");
    }

    #[test]
    fn a_power_cut_keeps_tears_or_drops_each_of_several_unsynced_batches_independently() {
        // Whole sectors each, so that no sector holds two batches (see the
        // next test for one that does).
        const BATCH: usize = 3 * SECTOR_BYTES as usize;
        // What a crash did with batch i: 0 dropped, 1 torn, 2 kept.
        let mut seen = BTreeSet::new();
        for seed in 0..SEEDS {
            let fs = fs_with_file(b"");
            let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
            for i in 0..3u8 {
                f.write_all_at(&[b'1' + i; BATCH], (i as usize * BATCH) as u64).unwrap();
            }
            fs.crash(seed);
            let data = fs.read_file(p("/d/f")).unwrap();
            let fates: Vec<u8> = (0..3)
                .map(|i| {
                    let range = data.get(i * BATCH..((i + 1) * BATCH).min(data.len())).unwrap_or(&[]);
                    let ours = range.iter().take_while(|&&b| b == b'1' + i as u8).count();
                    assert!(
                        range[ours..].iter().all(|&b| b == 0),
                        "seed {seed}: batch {i} left foreign bytes"
                    );
                    match ours {
                        0 => 0,
                        BATCH => 2,
                        n => {
                            assert_eq!(
                                (i * BATCH + n) as u64 % SECTOR_BYTES,
                                0,
                                "seed {seed}: a torn write ends on a sector"
                            );
                            1
                        }
                    }
                })
                .collect();
            seen.insert(fates);
        }
        for i in 0..3 {
            for fate in 0..3 {
                assert!(
                    seen.iter().any(|f| f[i] == fate),
                    "batch {i} never had fate {fate}: {seen:?}"
                );
            }
        }
        assert!(
            seen.iter().any(|f| f[0] == 0 && f[1] == 2),
            "a later batch never survived without an earlier one: {seen:?}"
        );
    }

    #[test]
    fn a_kill_after_a_failed_sync_leaves_pages_a_restart_reads_and_a_later_power_cut_loses() {
        for seed in 0..20 {
            let fs = fs_with_file(b"durable");
            let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
            f.write_all_at(b" and lost", 7).unwrap();
            fs.set_failed_sync_drops_pending(true);
            fs.set_sync_error(true);
            assert!(f.sync_data().is_err());
            fs.clear_faults();
            fs.kill();
            assert_eq!(
                f.read_at(&mut [0; 4], 0).unwrap_err().to_string(),
                "stale handle after a crash or kill"
            );
            drop(f);

            // The restarted process reads the failed pages from the cache,
            // and its fsync is not told (the failing one was).
            let g = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
            let mut buf = [0; 16];
            g.read_exact_at(&mut buf, 0).unwrap();
            assert_eq!(&buf, b"durable and lost");
            g.sync_data().unwrap();
            let other = fs.open(p("/d/other"), OpenMode::CreateNew).unwrap();
            other.write_all_at(b"more work", 0).unwrap();
            other.sync_data().unwrap();
            fs.sync_dir(p("/d")).unwrap();
            assert_eq!(fs.stats().kills, 1);

            fs.crash(seed);
            assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"durable", "seed {seed}");
            assert_eq!(fs.read_file(p("/d/other")).unwrap(), b"more work", "seed {seed}");
        }
    }

    #[test]
    fn a_kill_keeps_unsynced_writes_pending_for_a_later_sync() {
        let fs = fs_with_file(b"old");
        let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        f.write_all_at(b"new", 0).unwrap();
        fs.kill();
        assert!(f.sync_data().is_err(), "a killed process's handle is closed");
        assert_eq!(fs.pending_data_ops(p("/d/f")), Some(1));
        fs.open(p("/d/f"), OpenMode::Read).unwrap().sync_data().unwrap();
        fs.crash_dropping_all();
        assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"new");
    }

    #[test]
    fn a_sync_after_a_writeback_error_writes_back_new_data_and_still_reports_the_error() {
        let fs = fs_with_file(b"0123456789");
        let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        f.write_all_at(b"ab", 0).unwrap();
        fs.fail_writeback(p("/d/f"));
        f.write_all_at(b"yz", 8).unwrap();
        assert!(f.sync_data().is_err());
        assert_eq!(fs.durable_read(p("/d/f")).unwrap(), b"01234567yz");
    }

    #[test]
    fn dropping_the_cache_after_a_failed_writeback_shows_what_the_disk_holds() {
        let fs = fs_with_file(b"durable");
        let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        f.write_all_at(b" and lost", 7).unwrap();
        fs.fail_writeback(p("/d/f"));
        assert!(f.sync_data().is_err());
        drop(f); // a kill: the page cache survives
        let g = fs.open(p("/d/f"), OpenMode::Read).unwrap();
        assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"durable and lost");
        g.sync_and_drop_cache().unwrap();
        // The size is the in-memory inode's; bytes the disk never got are zeros.
        assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"durable\0\0\0\0\0\0\0\0\0");
        assert_eq!(fs.stats().cache_drops, 1);
        // Dirty pages stay cached.
        let h = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        h.write_all_at(b"!", 0).unwrap();
        h.drop_cache().unwrap();
        assert_eq!(&fs.read_file(p("/d/f")).unwrap()[..7], b"!urable");
    }

    #[test]
    fn fail_unlinks_after_lets_n_unlinks_succeed_then_keeps_the_names() {
        let fs = fs_with_dir();
        for name in ["/d/a", "/d/b", "/d/c"] {
            fs.open(p(name), OpenMode::CreateOrOpen).unwrap();
        }
        fs.fail_unlinks_after(1);
        fs.remove_file(p("/d/a")).unwrap();
        assert_eq!(fs.remove_file(p("/d/b")).unwrap_err().raw_os_error(), Some(EIO));
        assert!(fs.exists(p("/d/b")));
        assert_eq!(fs.stats().unlinks_failed, 1);
        fs.clear_faults();
        fs.remove_file(p("/d/b")).unwrap();
    }

    #[test]
    fn sync_dir_and_write_errors_change_nothing_durable() {
        let fs = fs_with_dir();
        let f = fs.open(p("/d/f"), OpenMode::CreateOrOpen).unwrap();
        fs.set_sync_dir_error(true);
        assert_eq!(fs.sync_dir(p("/d")).unwrap_err().raw_os_error(), Some(EIO));
        assert_eq!(fs.durable_list_all(), Vec::<PathBuf>::new());
        fs.set_write_error(true);
        assert_eq!(f.write_all_at(b"x", 0).unwrap_err().raw_os_error(), Some(EIO));
        assert_eq!(f.set_len(9).unwrap_err().raw_os_error(), Some(EIO));
        assert_eq!(f.len().unwrap(), 0);
        fs.clear_faults();
        fs.sync_dir(p("/d")).unwrap();
        assert_eq!(fs.durable_list_all(), vec![PathBuf::from("/d/f")]);
    }

    #[test]
    fn torn_writes_keep_a_512_byte_aligned_prefix() {
        let (offset, len) = (100usize, 4000usize);
        let mut torn_seen = 0;
        for seed in 0..SEEDS {
            let fs = fs_with_file(&[]);
            let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
            f.write_all_at(&vec![0xab; len], offset as u64).unwrap();
            let report = fs.crash(seed);
            let data = fs.read_file(p("/d/f")).unwrap();
            if report.writes_dropped == 1 {
                assert!(data.is_empty(), "seed {seed}");
                continue;
            }
            assert_eq!(
                data.len(),
                offset + len,
                "seed {seed}: the length covers the whole write"
            );
            assert!(data[..offset].iter().all(|&b| b == 0));
            let cut = offset + data[offset..].iter().take_while(|&&b| b == 0xab).count();
            assert!(
                data[cut..].iter().all(|&b| b == 0),
                "seed {seed}: only zeros after the prefix"
            );
            if report.writes_torn == 1 {
                assert!(cut > offset && cut < offset + len, "seed {seed}: cut {cut}");
                assert_eq!(cut % 512, 0, "seed {seed}: cut {cut}");
                torn_seen += 1;
            } else {
                assert_eq!(cut, offset + len, "seed {seed}");
            }
        }
        assert!(torn_seen > 0);
    }

    #[test]
    fn a_torn_overwrite_keeps_the_old_bytes_after_the_prefix() {
        for seed in 0..SEEDS {
            let fs = fs_with_file(&[1; 2048]);
            let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
            f.write_all_at(&[2; 2048], 0).unwrap();
            let report = fs.crash(seed);
            let data = fs.read_file(p("/d/f")).unwrap();
            assert_eq!(data.len(), 2048);
            let cut = data.iter().take_while(|&&b| b == 2).count();
            assert!(data[cut..].iter().all(|&b| b == 1));
            assert_eq!(cut % 512, 0);
            assert_eq!(report.writes_torn == 1, cut != 0 && cut != 2048, "seed {seed}");
        }
    }

    #[test]
    fn a_later_kept_write_can_persist_after_an_earlier_dropped_one_leaving_a_hole() {
        let mut holes = 0;
        for seed in 0..SEEDS {
            let fs = fs_with_file(&[]);
            let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
            f.write_all_at(&[7; 100], 0).unwrap();
            f.write_all_at(&[8; 100], SECTOR_BYTES).unwrap();
            fs.crash(seed);
            let data = fs.read_file(p("/d/f")).unwrap();
            let full = SECTOR_BYTES as usize + 100;
            assert!(
                data.is_empty() || data.len() == 100 || data.len() == full,
                "seed {seed}"
            );
            if data.len() == full && data[..100].iter().all(|&b| b == 0) {
                assert!(data[100..SECTOR_BYTES as usize].iter().all(|&b| b == 0));
                assert!(data[SECTOR_BYTES as usize..].iter().all(|&b| b == 8));
                holes += 1;
            }
        }
        assert!(holes > 0);
    }

    /// A disk writes whole sectors from the page cache: a sector that
    /// persists holds every byte written to it before, by any op.
    #[test]
    fn a_sector_shared_by_two_writes_never_persists_the_later_without_the_earlier() {
        let (mut second_kept, mut first_only) = (0, 0);
        for seed in 0..SEEDS {
            let fs = fs_with_file(&[]);
            let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
            f.write_all_at(&[7; 700], 0).unwrap();
            f.write_all_at(&[8; 100], 700).unwrap();
            fs.crash(seed);
            let data = fs.read_file(p("/d/f")).unwrap();
            if data.len() == 800 && data[700..].iter().all(|&b| b == 8) {
                assert!(
                    data[SECTOR_BYTES as usize..700].iter().all(|&b| b == 7),
                    "seed {seed}: the shared sector persisted without the earlier write's bytes"
                );
                second_kept += 1;
            } else if data.len() >= 700 && data[..700].iter().all(|&b| b == 7) {
                first_only += 1;
            }
        }
        assert!(second_kept > 0 && first_only > 0, "{second_kept} {first_only}");
    }

    #[test]
    fn the_same_seed_gives_the_same_durable_image() {
        let mut distinct = BTreeSet::new();
        for crash_seed in 0..40 {
            let run = || {
                let fs = SimFs::new();
                workload(&fs, 7, 300);
                let report = fs.crash(crash_seed);
                (report, image(&fs))
            };
            let (first, second) = (run(), run());
            assert_eq!(first, second, "crash seed {crash_seed}");
            distinct.insert(first.1);
        }
        assert!(distinct.len() > 10, "only {} distinct images", distinct.len());
    }

    #[test]
    fn stale_handles_error_after_a_crash() {
        let fs = fs_with_file(b"data");
        let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        fs.crash(1);
        let mut buf = [0; 4];
        for err in [
            f.read_at(&mut buf, 0).unwrap_err(),
            f.write_all_at(b"x", 0).unwrap_err(),
            f.sync_data().unwrap_err(),
            f.set_len(0).unwrap_err(),
            f.len().unwrap_err(),
        ] {
            assert_eq!(err.kind(), io::ErrorKind::Other);
            assert_eq!(err.to_string(), "stale handle after a crash or kill");
        }
        drop(f);
        let g = fs.open(p("/d/f"), OpenMode::Read).unwrap();
        g.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"data");
    }

    #[test]
    fn after_a_successful_sync_the_durable_contents_equal_the_volatile_ones() {
        for seed in 0..50 {
            let fs = SimFs::new();
            workload(&fs, seed, 200);
            for path in fs.list_all() {
                fs.open(&path, OpenMode::Read).unwrap().sync_data().unwrap();
            }
            fs.sync_dir(p("/w")).unwrap();
            fs.sync_dir(p("/w/sub")).unwrap();
            fs.sync_dir(p("/")).unwrap();
            let before = image(&fs);
            fs.crash(seed);
            assert_eq!(image(&fs), before, "seed {seed}");
        }
    }

    #[test]
    fn namespace_operations_follow_posix() {
        let fs = fs_with_dir();
        let err = |r: io::Result<Box<dyn FsFile>>| r.err().map(|e| e.kind());
        assert_eq!(
            err(fs.open(p("/missing/f"), OpenMode::CreateOrOpen)),
            Some(io::ErrorKind::NotFound)
        );
        assert_eq!(err(fs.open(p("/d/f"), OpenMode::Read)), Some(io::ErrorKind::NotFound));
        assert_eq!(err(fs.open(p("/d"), OpenMode::Read)), Some(io::ErrorKind::IsADirectory));
        let ro = fs
            .open(p("/d/f"), OpenMode::CreateOrOpen)
            .and_then(|_| fs.open(p("/d/f"), OpenMode::Read))
            .unwrap();
        assert_eq!(ro.write_all_at(b"x", 0).unwrap_err().raw_os_error(), Some(EBADF));
        fs.create_dir_all(p("/d/sub")).unwrap();
        fs.open(p("/d/g"), OpenMode::CreateOrOpen)
            .unwrap()
            .write_all_at(b"g", 0)
            .unwrap();
        let mut listed = fs.list_dir(p("/d/")).unwrap();
        listed.sort();
        assert_eq!(listed, [PathBuf::from("/d/f"), PathBuf::from("/d/g")]);
        assert!(fs.exists(p("/d/sub")) && fs.exists(p("/d//f")) && !fs.exists(p("/d/h")));
        fs.rename(p("/d/g"), p("/d/sub/f")).unwrap();
        fs.rename(p("/d/sub/f"), p("/d/f")).unwrap();
        assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"g");
        assert_eq!(
            fs.rename(p("/d/g"), p("/d/h")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        fs.remove_file(p("/d/f")).unwrap();
        assert_eq!(fs.remove_file(p("/d/f")).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(fs.list_dir(p("/d")).unwrap(), Vec::<PathBuf>::new());
        assert_eq!(fs.list_dir(p("/nope")).unwrap_err().kind(), io::ErrorKind::NotFound);
        let rel = fs.open(p("rel/f"), OpenMode::CreateOrOpen);
        assert_eq!(err(rel), Some(io::ErrorKind::NotFound));
        fs.create_dir_all(p("rel")).unwrap();
        fs.open(p("rel/f"), OpenMode::CreateOrOpen).unwrap();
        assert_eq!(fs.list_dir(p("rel")).unwrap(), [PathBuf::from("rel/f")]);
    }

    #[test]
    fn an_unlinked_file_stays_usable_through_its_open_handle() {
        let fs = fs_with_file(b"abc");
        let f = fs.open(p("/d/f"), OpenMode::ReadWrite).unwrap();
        fs.remove_file(p("/d/f")).unwrap();
        fs.sync_dir(p("/d")).unwrap();
        f.write_all_at(b"d", 3).unwrap();
        f.sync_data().unwrap();
        let mut buf = [0; 4];
        f.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"abcd");
        drop(f);
        assert!(fs.lock().inodes.is_empty(), "the inode is forgotten once unreachable");
    }

    #[test]
    fn create_truncate_on_an_existing_file_may_or_may_not_persist_the_truncation() {
        let (mut truncated, mut kept) = (0, 0);
        for seed in 0..SEEDS {
            let fs = fs_with_file(b"old contents");
            fs.open(p("/d/f"), OpenMode::CreateTruncate).unwrap();
            assert_eq!(fs.read_file(p("/d/f")).unwrap(), b"");
            fs.crash(seed);
            match fs.read_file(p("/d/f")).unwrap().as_slice() {
                b"" => truncated += 1,
                b"old contents" => kept += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(truncated > 0 && kept > 0);
    }

    #[test]
    fn hundreds_of_crashes_of_a_few_hundred_ops_run_quickly() {
        let start = std::time::Instant::now();
        let mut largest = 0;
        for seed in 0..300 {
            let fs = SimFs::new();
            workload(&fs, seed, 300);
            largest = fs
                .list_all()
                .iter()
                .map(|f| fs.read_file(f).unwrap().len())
                .fold(largest, usize::max);
            fs.crash(seed);
            workload(&fs, seed + 1, 50);
            fs.crash(seed + 1);
        }
        eprintln!("300 seeds in {:?}, largest file {largest} bytes", start.elapsed());
    }
}
