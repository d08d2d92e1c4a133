//! Opening the metadata store for a pass: moved aside and rebuilt when it
//! cannot be opened, or a throwaway copy for a dry run.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use store::{MetaError, MetaStore, SledMeta};
use wal::fs::{Fs, RealFs};

/// Why the metadata store could not be opened (or rebuilt).
#[derive(Debug, thiserror::Error)]
pub enum OpenMetaError {
    /// A filesystem step around the store failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A fresh store could not be created.
    #[error("creating a fresh metadata store in {}: {source}", dir.display())]
    Fresh {
        /// The store's directory.
        dir: PathBuf,
        /// sled's error.
        #[source]
        source: MetaError,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> OpenMetaError + 'a {
    move |source| OpenMetaError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Opens the metadata store. When it cannot be opened (sled 0.34 has open
/// reports of stores that will not reopen after an abrupt stop), or when
/// `rebuild` asks for it, the directory is moved aside (never deleted) and a
/// fresh store is created; the recovery pass then rebuilds every checkpoint
/// from the session files and the WAL. Returns where the old store went.
pub fn open_meta(dir: &Path, rebuild: bool) -> Result<(Arc<dyn MetaStore>, Option<PathBuf>), OpenMetaError> {
    let failure = if rebuild {
        Some("rebuild requested".to_owned())
    } else {
        wal::fs::create_dir_durably(&RealFs, dir).map_err(io_err("creating", dir))?;
        match catch_expected_panic(|| SledMeta::open(dir)) {
            Ok(Ok(meta)) => return Ok((Arc::new(meta), None)),
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("sled panicked while opening".to_owned()),
        }
    };
    let mut aside = None;
    if dir.exists() {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let target = dir.with_file_name(format!("meta.broken-{stamp}"));
        std::fs::rename(dir, &target).map_err(io_err("moving aside", dir))?;
        if let Some(parent) = dir.parent() {
            RealFs.sync_dir(parent).map_err(io_err("fsync", parent))?;
        }
        aside = Some(target);
    }
    wal::fs::create_dir_durably(&RealFs, dir).map_err(io_err("creating", dir))?;
    let why = failure.unwrap_or_default();
    tracing::error!(
        meta = %dir.display(),
        moved_to = ?aside,
        "metadata store unusable ({why}): rebuilding it from the session files and the WAL"
    );
    let meta = SledMeta::open(dir).map_err(|source| OpenMetaError::Fresh {
        dir: dir.to_path_buf(),
        source,
    })?;
    Ok((Arc::new(meta), aside))
}

/// A read-only view of the checkpoints for a dry run: sled cannot open a
/// store read-only, so a copy is opened instead (or none, if unreadable).
pub fn open_meta_read_only(dir: &Path) -> Result<Arc<dyn MetaStore>, OpenMetaError> {
    let tmp = std::env::temp_dir();
    let copy = tempfile::Builder::new()
        .prefix("logd-meta-dry-run-")
        .tempdir()
        .map_err(io_err("creating a directory in", &tmp))?;
    if dir.exists() {
        for entry in walk(dir).map_err(io_err("reading", dir))? {
            let rel = entry.strip_prefix(dir).expect("walk yields paths under dir");
            let target = copy.path().join(rel);
            let parent = target.parent().expect("has parent");
            std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
            std::fs::copy(&entry, &target).map_err(io_err("copying", &entry))?;
        }
    }
    let meta = match std::panic::catch_unwind(|| SledMeta::open(copy.path())) {
        Ok(Ok(m)) => m,
        _ => {
            let empty = copy.path().join("empty");
            SledMeta::open(&empty).map_err(|source| OpenMetaError::Fresh { dir: empty, source })?
        }
    };
    std::mem::forget(copy); // sled keeps files open; the OS cleans /tmp
    Ok(Arc::new(meta))
}

fn walk(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() { out.extend(walk(&p)?) } else { out.push(p) }
    }
    Ok(out)
}

thread_local! {
    /// Set while [`catch_expected_panic`] runs: the fail-stop hook lets such a
    /// panic unwind to its `catch_unwind`.
    static PANIC_EXPECTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the current thread is inside a call known to panic on bad input
/// (sled's open): `logd serve`'s fail-stop panic hook must not abort then.
pub fn panic_expected() -> bool {
    PANIC_EXPECTED.get()
}

/// `catch_unwind` for a call known to panic on bad input (sled's open), which
/// the fail-stop hook of `logd serve` must not turn into an abort.
fn catch_expected_panic<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> std::thread::Result<R> {
    let before = PANIC_EXPECTED.replace(true);
    let result = std::panic::catch_unwind(f);
    PANIC_EXPECTED.set(before);
    result
}
