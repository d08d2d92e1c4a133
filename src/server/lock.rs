//! The state directory's exclusive lock, and creating directories durably.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use wal::fs::{Fs, RealFs};

/// An exclusive lock on a state directory, held for the process lifetime.
pub struct StateLock {
    _file: File,
    #[cfg_attr(not(test), allow(dead_code))]
    path: PathBuf,
}

impl StateLock {
    /// Takes `<state>/LOCK`, or fails naming who holds it. The state
    /// directory (`LOG_DIR/.logd` or `LOGD_STATE_DIR`) is created durably.
    pub fn acquire(state_dir: &Path) -> anyhow::Result<StateLock> {
        StateLock::acquire_on(&RealFs, state_dir)
    }

    /// [`StateLock::acquire`], creating the directory through `fs` (the lock
    /// itself is an `flock` on a real file).
    pub fn acquire_on(fs: &dyn Fs, state_dir: &Path) -> anyhow::Result<StateLock> {
        wal::fs::create_dir_durably(fs, state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let path = state_dir.join("LOCK");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {
                file.set_len(0)?;
                std::io::Write::write_all(&mut &file, format!("{}\n", std::process::id()).as_bytes())?;
                Ok(StateLock { _file: file, path })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                bail!(
                    "state directory {} is locked by another logd (pid {}); stop it first",
                    state_dir.display(),
                    holder.trim()
                )
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }

    /// The lock file.
    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `dir` (and missing parents), fsyncing each new directory's parent
/// so a power cut cannot take the directory, and the files in it, away
/// ([`wal::fs::create_dir_durably`] on the real filesystem).
pub fn create_dir_durably(dir: &Path) -> std::io::Result<()> {
    wal::fs::create_dir_durably(&RealFs, dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::path::PathBuf;
    use std::sync::Mutex;
    use wal::fs::RealFs;
    use wal::fs::{FsFile, OpenMode};

    /// The real filesystem, recording every directory it fsyncs.
    #[derive(Default)]
    struct RecordingFs {
        synced_dirs: Mutex<Vec<PathBuf>>,
    }

    impl Fs for RecordingFs {
        fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
            RealFs.open(path, mode)
        }
        fn create_dir_all(&self, path: &Path) -> io::Result<()> {
            RealFs.create_dir_all(path)
        }
        fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
            RealFs.list_dir(path)
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            RealFs.rename(from, to)
        }
        fn remove_file(&self, path: &Path) -> io::Result<()> {
            RealFs.remove_file(path)
        }
        fn sync_dir(&self, path: &Path) -> io::Result<()> {
            self.synced_dirs.lock().unwrap().push(path.to_path_buf());
            RealFs.sync_dir(path)
        }
        fn exists(&self, path: &Path) -> bool {
            RealFs.exists(path)
        }
    }

    #[test]
    fn the_state_lock_creates_a_custom_state_directory_and_its_parents_durably() {
        let t = tempfile::TempDir::new().unwrap();
        let state = t.path().join("custom/deeper/state");
        let fs = RecordingFs::default();
        let lock = StateLock::acquire_on(&fs, &state).unwrap();
        assert!(lock.path().exists());
        // Each new directory's name lives in its parent: parents first.
        assert_eq!(
            *fs.synced_dirs.lock().unwrap(),
            [
                t.path().to_path_buf(),
                t.path().join("custom"),
                t.path().join("custom/deeper"),
            ]
        );
        drop(lock);
        // An existing directory is not created again.
        let fs = RecordingFs::default();
        let _lock = StateLock::acquire_on(&fs, &state).unwrap();
        assert!(fs.synced_dirs.lock().unwrap().is_empty());
    }
}
