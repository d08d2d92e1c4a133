//! The filesystem seam: every file operation of the WAL (and of logd's session
//! files) goes through [`Fs`], so tests can swap the real filesystem for a
//! simulated one that loses un-fsynced data on a "power cut".
//!
//! The contract mirrors POSIX as logd relies on it:
//! - data written to a file is durable only after [`FsFile::sync_data`] (or
//!   `sync_all`) of that file returned `Ok`;
//! - a create, rename or unlink is durable only after [`Fs::sync_dir`] of the
//!   directory holding the name returned `Ok`;
//! - an error from a sync means the state on disk is unknown: callers must not
//!   retry the sync and assume success (see `wal::Wal` for what logd does);
//! - reads come from the page cache, which after a failed writeback may hold
//!   bytes the disk never got (clean, so nothing writes them again): code
//!   that decides from the disk (recovery) calls
//!   [`FsFile::sync_and_drop_cache`] before it reads.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// How a file is opened by [`Fs::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only; the file must exist.
    Read,
    /// Read and write; the file must exist.
    ReadWrite,
    /// Read and write; the file is created if missing (never truncated).
    CreateOrOpen,
    /// Read and write; the file is created empty, replacing any existing one.
    CreateTruncate,
}

/// An open file with explicit offsets (no shared cursor, no `O_APPEND`).
#[allow(clippy::len_without_is_empty)] // `len` is a fallible stat, not a collection size
pub trait FsFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, extending the file when needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync(2)`: data and the file size are durable when this returns Ok.
    fn sync_data(&self) -> io::Result<()>;
    /// Truncates or extends the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// The current length of the file in bytes.
    fn len(&self) -> io::Result<u64>;
    /// `posix_fadvise(POSIX_FADV_DONTNEED)` over the whole file: its clean
    /// cached pages are dropped, so the next reads come from the disk. Dirty
    /// pages stay: call it after a successful [`FsFile::sync_data`].
    fn drop_cache(&self) -> io::Result<()>;

    /// Makes reads decide from the disk, not from the page cache: fdatasyncs
    /// the file (what a killed process wrote and nobody synced is durable
    /// from here on, or the error says it is not), then drops its cached
    /// pages. Pages whose writeback failed earlier are clean but never
    /// reached the disk; without the drop a reader would trust them.
    fn sync_and_drop_cache(&self) -> io::Result<()> {
        self.sync_data()?;
        self.drop_cache()
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.read_at(buf, offset)? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n => {
                    buf = &mut buf[n..];
                    offset += n as u64;
                }
            }
        }
        Ok(())
    }
}

/// Namespace operations and file opening.
pub trait Fs: Send + Sync + 'static {
    /// Opens `path` as `mode` says.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>>;
    /// Creates `path` and its parents (durable only after `sync_dir` of each parent).
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Full paths of the entries of directory `path` (files only), unsorted.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>>;
    /// Atomically renames `from` to `to`, replacing `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// fsyncs the directory `path`, making its pending creates/renames/unlinks durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
}

/// Creates `dir` and its missing parents durably: after `create_dir_all`,
/// the directory holding each newly created one is fsynced (parents first),
/// so a power cut cannot take a directory, and the files in it, away. A
/// relative single-component path's parent is the current directory.
pub fn create_dir_durably(fs: &dyn Fs, dir: &Path) -> io::Result<()> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|a| !a.as_os_str().is_empty() && !fs.exists(a))
        .collect();
    fs.create_dir_all(dir)?;
    for created in missing.iter().rev() {
        fs.sync_dir(created.parent().unwrap_or(Path::new("")))?;
    }
    Ok(())
}

static FILE_MODE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0o640);

/// Sets the permission bits [`RealFs`] creates files with (default 0640;
/// the process umask still applies).
pub fn set_file_mode(mode: u32) {
    FILE_MODE.store(mode, std::sync::atomic::Ordering::Relaxed);
}

/// The real filesystem (std::fs), used in production.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

struct RealFile(File);

impl FsFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(&self.0, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(&self.0, buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn drop_cache(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an fd this struct owns; no memory is passed.
        match unsafe { libc::posix_fadvise(self.0.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) } {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

impl Fs for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        let mut o = OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(&mut o, FILE_MODE.load(std::sync::atomic::Ordering::Relaxed));
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::CreateOrOpen => o.read(true).write(true).create(true),
            OpenMode::CreateTruncate => o.read(true).write(true).create(true).truncate(true),
        };
        Ok(Box::new(RealFile(o.open(path)?)))
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        std::fs::create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                out.push(entry.path());
            }
        }
        Ok(out)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        // The parent of a relative single-component path is the empty path,
        // which names the current directory here (open("") fails).
        let path = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        File::open(path)?.sync_all()
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}
