//! The one entry point of the recovery pass, for `logd serve` (before it
//! serves) and `logd recover`: opens the metadata store (rebuilding it when
//! it is unusable), runs the pass in the mode asked for and, offline,
//! finishes the pending compressions.

use std::path::PathBuf;
use std::sync::Arc;

use store::{Lifecycle, MetaError, MetaStore};
use wal::fs::Fs;
use wal::{Wal, WalOptions};

use crate::open_meta::{OpenMetaError, open_meta, open_meta_read_only};
use crate::{Progress, Replayer, Report};

/// What a pass runs on, and how.
#[derive(Clone)]
pub struct PassOptions {
    /// The filesystem (the real one, or the simulator's).
    pub fs: Arc<dyn Fs>,
    /// `LOG_DIR`: the session files.
    pub log_dir: PathBuf,
    /// The WAL's directory.
    pub wal_dir: PathBuf,
    /// The metadata store's directory.
    pub meta_dir: PathBuf,
    /// How the WAL is opened.
    pub wal: WalOptions,
    /// Compression and events, for finishing interrupted file steps.
    pub lifecycle: Lifecycle,
    /// Session files open at once, at most (`LOGD_OPEN_FILES_MAX`).
    pub files_open_max: usize,
    /// Report only: nothing on disk changes (the store is read from a copy).
    pub dry_run: bool,
    /// Keep every readable record around mid-log damage and move the damaged
    /// WAL aside, instead of refusing.
    pub salvage: bool,
    /// Move the metadata store aside and rebuild it.
    pub rebuild_meta: bool,
    /// Run the pending compressions after the pass, as the service's
    /// compression pool would (`logd recover`); `serve` leaves them to its pool.
    pub finish_compressions: bool,
}

/// What a pass did, and what it leaves for the caller.
pub struct Pass {
    /// The open WAL, ready for appends (None after a dry run).
    pub wal: Option<Wal>,
    /// What the WAL side of the pass did.
    pub report: Report,
    /// What the session-file side did (per session, lifecycle repairs).
    pub replayer: Replayer,
    /// The metadata store (a throwaway copy after a dry run).
    pub meta: Arc<dyn MetaStore>,
    /// Where an unusable store was moved before it was rebuilt.
    pub meta_moved_aside_to: Option<PathBuf>,
    /// The store's `materialized_below_lsn` mark before the pass (salvage
    /// counts records below it as in their session files, not lost).
    pub materialized_below: u64,
}

/// What a pass can fail with besides the WAL and the materializer
/// ([`crate::Error`]).
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The metadata store could not be opened or rebuilt.
    #[error(transparent)]
    OpenMeta(#[from] OpenMetaError),
    /// The metadata store failed.
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// The WAL pass failed (damage included: see [`PassError::is_integrity`]).
    #[error(transparent)]
    Pass(#[from] crate::Error),
    /// A pending compression could not be finished.
    #[error("finishing pending compressions: {0}")]
    Compression(#[source] crate::ReplayError),
}

impl PassError {
    /// True iff the failure is damage needing an operator (exit code 2).
    pub fn is_integrity(&self) -> bool {
        matches!(self, PassError::Pass(e) if e.is_integrity())
    }
}

/// Runs the recovery pass per `opts`, reporting progress as it reads the WAL.
pub fn run_pass(opts: PassOptions, progress: impl FnMut(Progress)) -> Result<Pass, PassError> {
    let (meta, meta_moved_aside_to) = if opts.dry_run {
        (open_meta_read_only(&opts.meta_dir)?, None)
    } else {
        open_meta(&opts.meta_dir, opts.rebuild_meta)?
    };
    // Read before the pass: salvage compares damaged LSNs with it.
    let materialized_below = meta.materialized_below_lsn()?;
    let fs = opts.fs.clone();
    let (wal, report, mut replayer) = if opts.dry_run {
        let mut replayer = Replayer::dry_run(fs.clone(), &opts.log_dir, meta.clone()).with_lifecycle(opts.lifecycle);
        let report = if opts.salvage {
            crate::salvage_dry_run(fs, &opts.wal_dir, opts.wal, &mut replayer, progress)?
        } else {
            crate::dry_run(fs, &opts.wal_dir, opts.wal, &mut replayer, progress)?
        };
        (None, report, replayer)
    } else {
        let mut replayer = Replayer::new(fs.clone(), &opts.log_dir, meta.clone())
            .with_lifecycle(opts.lifecycle)
            .with_files_open_max(opts.files_open_max);
        let (wal, report) = if opts.salvage {
            crate::salvage(fs, &opts.wal_dir, opts.wal, &mut replayer, progress)?
        } else {
            crate::run(fs, &opts.wal_dir, opts.wal, &mut replayer, progress)?
        };
        (Some(wal), report, replayer)
    };
    if opts.finish_compressions {
        replayer.finish_compressions().map_err(PassError::Compression)?;
    }
    Ok(Pass {
        wal,
        report,
        replayer,
        meta,
        meta_moved_aside_to,
        materialized_below,
    })
}
