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
//!   [`FsFile::sync_and_drop_cache`] before it reads;
//! - [`Fs::open`] never follows a symbolic link in the last component of the
//!   path (`O_NOFOLLOW`: ELOOP) and opens regular files only (anything else
//!   is refused with [`NotRegularFile`]), so logd never writes, truncates or
//!   reads through a link someone placed in its directories.

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
    /// Read and write; the file is created and must not exist yet
    /// (`O_CREAT | O_EXCL`: `AlreadyExists` otherwise, even for a dangling
    /// symbolic link). For temporary files.
    CreateNew,
}

/// The error of [`Fs::open`] for a path that exists but is not a regular
/// file (a FIFO, a device, a socket, a directory).
#[derive(Debug)]
pub struct NotRegularFile(pub PathBuf);

impl std::fmt::Display for NotRegularFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} is not a regular file", self.0.display())
    }
}

impl std::error::Error for NotRegularFile {}

/// Whether `e` (from [`Fs::open`]) says the path is a symbolic link or not a
/// regular file: something logd did not create and must not open.
pub fn is_foreign_file_error(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP) || e.get_ref().is_some_and(|inner| inner.is::<NotRegularFile>())
}

/// An open file with explicit offsets (no shared cursor, no `O_APPEND`).
#[allow(clippy::len_without_is_empty)] // `len` is a fallible stat, not a collection size
pub trait FsFile: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, extending the file when needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes the slices one after the other from `offset`, as one
    /// [`FsFile::write_all_at`] of their concatenation would. The real file
    /// does it with `pwritev(2)` (no copy into one buffer first); this
    /// default concatenates, so a wrapper that only overrides
    /// `write_all_at` (fault injection, the simulation) sees one write.
    fn write_all_vectored_at(&self, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<()> {
        self.write_all_at(&concat(bufs), offset)
    }
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

/// A base for filesystems that change a call or two of another [`Fs`] (test
/// wrappers that inject a failure, a delay or a record of calls): implement
/// [`DelegateFs::inner`] and override only what changes; every other call
/// goes to the inner filesystem, and the type is an [`Fs`]. Pair it with
/// [`DelegateFile`] to change calls on the files it opens.
///
/// The methods have the names of [`Fs`]'s: call them through `dyn Fs` (or
/// `Fs::open(&x, ..)`) where both traits are in scope.
pub trait DelegateFs: Send + Sync + 'static {
    /// The filesystem every call not overridden goes to.
    fn inner(&self) -> &dyn Fs;
    /// [`Fs::open`].
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        self.inner().open(path, mode)
    }
    /// [`Fs::create_dir_all`].
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.inner().create_dir_all(path)
    }
    /// [`Fs::list_dir`].
    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        self.inner().list_dir(path)
    }
    /// [`Fs::rename`].
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner().rename(from, to)
    }
    /// [`Fs::remove_file`].
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.inner().remove_file(path)
    }
    /// [`Fs::sync_dir`].
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.inner().sync_dir(path)
    }
    /// [`Fs::exists`].
    fn exists(&self, path: &Path) -> bool {
        self.inner().exists(path)
    }
}

impl<T: DelegateFs> Fs for T {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        DelegateFs::open(self, path, mode)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        DelegateFs::create_dir_all(self, path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<PathBuf>> {
        DelegateFs::list_dir(self, path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        DelegateFs::rename(self, from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        DelegateFs::remove_file(self, path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        DelegateFs::sync_dir(self, path)
    }
    fn exists(&self, path: &Path) -> bool {
        DelegateFs::exists(self, path)
    }
}

/// The [`DelegateFs`] of files: implement [`DelegateFile::inner`] and
/// override only the calls that change; the type is an [`FsFile`]. The
/// provided [`FsFile::sync_and_drop_cache`] and [`FsFile::read_exact_at`]
/// go through the wrapper's own `sync_data`, `drop_cache` and `read_at`.
#[allow(clippy::len_without_is_empty)] // as FsFile: `len` is a fallible stat
pub trait DelegateFile: Send + Sync {
    /// The file every call not overridden goes to.
    fn inner(&self) -> &dyn FsFile;
    /// [`FsFile::read_at`].
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner().read_at(buf, offset)
    }
    /// [`FsFile::write_all_at`].
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner().write_all_at(buf, offset)
    }
    /// [`FsFile::sync_data`].
    fn sync_data(&self) -> io::Result<()> {
        self.inner().sync_data()
    }
    /// [`FsFile::set_len`].
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner().set_len(len)
    }
    /// [`FsFile::len`].
    fn len(&self) -> io::Result<u64> {
        self.inner().len()
    }
    /// [`FsFile::drop_cache`].
    fn drop_cache(&self) -> io::Result<()> {
        self.inner().drop_cache()
    }
}

impl<T: DelegateFile> FsFile for T {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        DelegateFile::read_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        DelegateFile::write_all_at(self, buf, offset)
    }
    fn write_all_vectored_at(&self, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<()> {
        DelegateFile::write_all_at(self, &concat(bufs), offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        DelegateFile::sync_data(self)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        DelegateFile::set_len(self, len)
    }
    fn len(&self) -> io::Result<u64> {
        DelegateFile::len(self)
    }
    fn drop_cache(&self) -> io::Result<()> {
        DelegateFile::drop_cache(self)
    }
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
    fn write_all_vectored_at(&self, bufs: &[io::IoSlice<'_>], offset: u64) -> io::Result<()> {
        pwritev_all(&self.0, bufs, offset)
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

/// The slices' bytes in one buffer.
fn concat(bufs: &[io::IoSlice<'_>]) -> Vec<u8> {
    let mut all = Vec::with_capacity(bufs.iter().map(|b| b.len()).sum());
    for b in bufs {
        all.extend_from_slice(b);
    }
    all
}

/// Most slices one `pwritev(2)` takes (`IOV_MAX` on Linux).
const IOVECS_PER_CALL_MAX: usize = 1024;

/// `pwritev(2)` until every byte of `bufs` is written from `offset` on,
/// through short writes and `EINTR`, like [`FileExt::write_all_at`].
fn pwritev_all(file: &File, bufs: &[io::IoSlice<'_>], mut offset: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut owned: Vec<io::IoSlice<'_>> = bufs.iter().filter(|b| !b.is_empty()).copied().collect();
    let mut rest = &mut owned[..];
    while !rest.is_empty() {
        let n = rest.len().min(IOVECS_PER_CALL_MAX);
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: `IoSlice` is ABI-compatible with `struct iovec` on Unix
        // (std guarantees it); the `n` slices borrow live memory for the call.
        let written = unsafe { libc::pwritev(file.as_raw_fd(), rest.as_ptr().cast::<libc::iovec>(), n as i32, off) };
        if written < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if written == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "pwritev wrote no byte"));
        }
        offset += written as u64;
        io::IoSlice::advance_slices(&mut rest, written as usize);
    }
    Ok(())
}

impl Fs for RealFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FsFile>> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut o = OpenOptions::new();
        o.mode(FILE_MODE.load(std::sync::atomic::Ordering::Relaxed));
        // No symbolic link as the last component; O_NONBLOCK so that opening
        // a FIFO put in its place cannot hang (no effect on regular files).
        o.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK);
        match mode {
            OpenMode::Read => o.read(true),
            OpenMode::ReadWrite => o.read(true).write(true),
            OpenMode::CreateOrOpen => o.read(true).write(true).create(true),
            OpenMode::CreateTruncate => o.read(true).write(true).create(true).truncate(true),
            OpenMode::CreateNew => o.read(true).write(true).create_new(true),
        };
        let file = o.open(path)?;
        if !file.metadata()?.file_type().is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                NotRegularFile(path.to_path_buf()),
            ));
        }
        Ok(Box::new(RealFile(file)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vectored_write_lands_as_its_slices_concatenated_through_many_pwritev_calls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = RealFs.open(&path, OpenMode::CreateNew).unwrap();
        file.write_all_at(b"head", 0).unwrap();
        // 2,600 slices (more than one pwritev's 1,024), empty ones among
        // them, sized so that some calls end inside a slice.
        let owned: Vec<Vec<u8>> = (0..2600u32)
            .map(|i| vec![(i % 251) as u8; (i as usize * 7) % 13])
            .collect();
        let slices: Vec<io::IoSlice<'_>> = owned.iter().map(|b| io::IoSlice::new(b)).collect();
        file.write_all_vectored_at(&slices, 4).unwrap();
        let mut expected = b"head".to_vec();
        expected.extend(owned.concat());
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        // The default (a wrapper's) path writes the same bytes.
        let other = dir.path().join("g");
        struct Plain(Box<dyn FsFile>);
        impl DelegateFile for Plain {
            fn inner(&self) -> &dyn FsFile {
                self.0.as_ref()
            }
        }
        let plain = Plain(RealFs.open(&other, OpenMode::CreateNew).unwrap());
        FsFile::write_all_at(&plain, b"head", 0).unwrap();
        FsFile::write_all_vectored_at(&plain, &slices, 4).unwrap();
        assert_eq!(std::fs::read(&other).unwrap(), expected);
    }

    const MODES: [OpenMode; 5] = [
        OpenMode::Read,
        OpenMode::ReadWrite,
        OpenMode::CreateOrOpen,
        OpenMode::CreateTruncate,
        OpenMode::CreateNew,
    ];

    #[test]
    fn no_open_mode_follows_a_symbolic_link_and_its_target_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, b"precious").unwrap();
        let link = dir.path().join("victim.logtmp");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        for mode in MODES {
            let Err(e) = RealFs.open(&link, mode) else {
                panic!("{mode:?} opened a symbolic link");
            };
            assert!(
                is_foreign_file_error(&e) || (mode == OpenMode::CreateNew && e.kind() == io::ErrorKind::AlreadyExists),
                "{mode:?}: {e}"
            );
        }
        // A dangling link is not followed either (O_CREAT would create its target).
        let dangling = dir.path().join("dangling.logtmp");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        for mode in [OpenMode::CreateOrOpen, OpenMode::CreateTruncate, OpenMode::CreateNew] {
            assert!(RealFs.open(&dangling, mode).is_err(), "{mode:?}");
        }
        assert!(!dir.path().join("nowhere").exists());
        assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    }

    #[test]
    fn create_new_refuses_an_existing_file_and_a_fifo_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.gz.tmp");
        std::fs::write(&f, b"old").unwrap();
        let e = RealFs.open(&f, OpenMode::CreateNew).err().expect("exists");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&f).unwrap(), b"old");

        let fifo = dir.path().join("fifo.logtmp");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid C string path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for mode in [OpenMode::Read, OpenMode::ReadWrite, OpenMode::CreateOrOpen] {
            let e = RealFs.open(&fifo, mode).err().expect("a FIFO is refused");
            assert!(is_foreign_file_error(&e), "{mode:?}: {e}");
        }
    }
}
