//! `logd cat`: one session's lines in seq order across its `.logtmp`,
//! rotated `.log` and compressed `.log.gz` files, in one or more log
//! directories (one per instance behind a load balancer), without a server.
//!
//! It reads only what is written: complete lines (a live file's unfinished
//! last line waits for its newline), never writes, renames or locks, so it
//! runs beside a live writer. The files of one directory hold disjoint,
//! increasing seq ranges; several directories may hold the same seq (a
//! frame resent to the instance that took a session over after a failover),
//! so the files are merged by seq and a seq already printed is dropped and
//! counted. Rotated files are opened one at a time, in `first_seq` order, as
//! the merge reaches them: a session with thousands of files needs about
//! one descriptor per directory. `.gz` files are read as streams.
//!
//! `--follow` keeps going like `tail -F`, by seq: after each pass it looks
//! again at every directory, finishes a `.logtmp` that was renamed away
//! (rotation renames it after its last write, so the open descriptor holds
//! everything), opens the new one, and picks up rotated files it never saw.

use crate::telemetry::console::errln;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::config::{CatArgs, CatFormat};

/// Longest line `logd cat` holds (a frame is at most `LOG_MAX_FRAME_BYTES`,
/// 1 MiB by default; escaping can make its line a few times larger).
const LINE_BYTES_MAX: usize = 64 << 20;
/// Times an open that lost a race with a rename (rotation, compression) is
/// retried after listing the directory again, per file.
const REOPEN_TRIES_MAX: u32 = 8;

/// What one run printed and dropped.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Lines printed.
    pub printed: u64,
    /// Lines dropped because their seq was already printed.
    pub duplicates: u64,
    /// Lines that are not logd's (no leading `{"seq":N,`), skipped.
    pub unparsable: u64,
}

/// A rotated file waiting to be read.
#[derive(Debug, Clone)]
struct Pending {
    dir: usize,
    path: PathBuf,
    first_seq: i64,
    last_seq: i64,
    tries: u32,
}

/// An open file: a rotated one read to its end, or a live `.logtmp`
/// (`tail`), whose end only means "nothing more yet".
struct Reader {
    dir: usize,
    path: PathBuf,
    inner: Box<dyn BufRead + Send>,
    /// Bytes of a line whose newline has not been read yet.
    partial: Vec<u8>,
    /// The next complete line and its seq.
    head: Option<(i64, Vec<u8>)>,
    tail: bool,
    /// The first seq read from this file (its rotated copy is skipped).
    first_read: Option<i64>,
    /// Bytes read so far (a live file shorter than this was truncated).
    consumed: u64,
    /// Seqs up to this one were printed from this file before it was
    /// truncated and reopened: passed over without counting them.
    quiet_through: Option<i64>,
}

impl Reader {
    /// Reads the next complete line into `head`; false at the end (of what
    /// is written, for a tail).
    fn advance(&mut self, unparsable: &mut u64) -> anyhow::Result<bool> {
        loop {
            let n = self
                .inner
                .read_until(b'\n', &mut self.partial)
                .with_context(|| format!("reading {}", self.path.display()))?;
            self.consumed += n as u64;
            anyhow::ensure!(
                self.partial.len() <= LINE_BYTES_MAX,
                "{}: a line longer than {} bytes",
                self.path.display(),
                LINE_BYTES_MAX
            );
            if self.partial.last() != Some(&b'\n') {
                if n == 0 && !self.tail && !self.partial.is_empty() {
                    // A finished file never ends mid-line when logd wrote it.
                    *unparsable += 1;
                    self.partial.clear();
                }
                return Ok(false);
            }
            let line = std::mem::take(&mut self.partial);
            match store::line_seq(&line) {
                Some(seq) => {
                    self.first_read.get_or_insert(seq);
                    self.head = Some((seq, line));
                    return Ok(true);
                }
                None => *unparsable += 1,
            }
        }
    }
}

/// A live `.logtmp` being followed in one directory.
struct Tail {
    slot: usize,
    ino: u64,
}

/// The merge state of one `logd cat` run.
struct Cat {
    session: String,
    dirs: Vec<PathBuf>,
    from_seq: i64,
    to_seq: i64,
    format: CatFormat,
    /// Rotated files not opened yet, smallest `first_seq` first.
    pending: BinaryHeap<Reverse<(i64, usize)>>,
    pending_files: Vec<Option<Pending>>,
    /// `(dir, first_seq, last_seq)` of rotated files queued (a `.log` and
    /// its `.log.gz` are one file).
    queued: HashSet<(usize, i64, i64)>,
    /// `(dir, first seq)` of every file read: within one directory seq
    /// ranges are disjoint, so a rotated file starting at one of them is the
    /// renamed (or compressed) copy of a file already read.
    started: HashSet<(usize, i64)>,
    readers: Vec<Option<Reader>>,
    tails: Vec<Option<Tail>>,
    last_printed: Option<i64>,
    done: bool,
    summary: Summary,
}

/// `logd cat`.
pub(super) fn cat(args: CatArgs) -> anyhow::Result<std::process::ExitCode> {
    let stdout = io::stdout();
    let mut out = io::BufWriter::new(stdout.lock());
    let summary = run(&args, &mut out)?;
    if summary.duplicates > 0 {
        errln!(
            "logd cat: dropped {} duplicate line(s) of session {} (a seq already printed; {} printed)",
            summary.duplicates,
            args.session,
            summary.printed
        );
    }
    if summary.unparsable > 0 {
        errln!(
            "logd cat: skipped {} line(s) that are not logd's (no leading seq)",
            summary.unparsable
        );
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Runs `logd cat` writing to `out`; a closed `out` (broken pipe) ends it
/// quietly.
pub fn run(args: &CatArgs, out: &mut dyn Write) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        store::session_id_is_valid(&args.session),
        "--session {:?} is not a valid session id",
        args.session
    );
    anyhow::ensure!(
        args.from_seq <= args.to_seq,
        "--from-seq {} is above --to-seq {}",
        args.from_seq,
        args.to_seq
    );
    let dirs = if args.dirs.is_empty() {
        vec![std::env::var_os("LOG_DIR").map_or_else(|| PathBuf::from("./logs"), PathBuf::from)]
    } else {
        args.dirs.clone()
    };
    let mut cat = Cat {
        session: args.session.clone(),
        started: HashSet::new(),
        tails: (0..dirs.len()).map(|_| None).collect(),
        dirs,
        from_seq: args.from_seq,
        to_seq: args.to_seq,
        format: args.format,
        pending: BinaryHeap::new(),
        pending_files: Vec::new(),
        queued: HashSet::new(),
        readers: Vec::new(),
        last_printed: None,
        done: false,
        summary: Summary::default(),
    };
    for dir in 0..cat.dirs.len() {
        cat.scan(dir)?;
    }
    loop {
        match cat.pass(out).and_then(|()| out.flush().map_err(Into::into)) {
            Ok(()) => {}
            Err(e) if is_broken_pipe(&e) => return Ok(cat.summary),
            Err(e) => return Err(e),
        }
        if cat.done || !args.follow {
            return Ok(cat.summary);
        }
        std::thread::sleep(Duration::from_millis(args.poll_interval_ms.max(1)));
        for dir in 0..cat.dirs.len() {
            cat.scan(dir)?;
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

impl Cat {
    /// Looks at one directory: queues rotated files of the session not seen
    /// yet, finishes a followed `.logtmp` that was renamed away, and opens
    /// the current one.
    fn scan(&mut self, dir: usize) -> anyhow::Result<()> {
        let path = &self.dirs[dir];
        let entries = std::fs::read_dir(path).with_context(|| format!("reading log directory {}", path.display()))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("reading log directory {}", path.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(r) = store::parse_rotated_name(name) else {
                continue;
            };
            if r.session == self.session {
                found.push((entry.path(), r.first_seq, r.last_seq));
            }
        }
        // The live file first: a rotation between this and the listing
        // then shows its renamed copy, which `started` recognizes.
        self.scan_logtmp(dir)?;
        for (path, first_seq, last_seq) in found {
            self.queue(Pending {
                dir,
                path,
                first_seq,
                last_seq,
                tries: 0,
            });
        }
        Ok(())
    }

    fn queue(&mut self, p: Pending) {
        let key = (p.dir, p.first_seq, p.last_seq);
        let out_of_range = p.last_seq < self.from_seq || p.first_seq > self.to_seq;
        let read = self.started.contains(&(p.dir, p.first_seq));
        if out_of_range || read || !self.queued.insert(key) {
            return;
        }
        let idx = self.pending_files.len();
        self.pending.push(Reverse((p.first_seq, idx)));
        self.pending_files.push(Some(p));
    }

    fn scan_logtmp(&mut self, dir: usize) -> anyhow::Result<()> {
        let path = store::logtmp_path(&self.dirs[dir], &self.session);
        let now = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Some((m.ino(), m.len())),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("looking at {}", path.display())),
        };
        let mut quiet_through = None;
        if let Some(t) = &self.tails[dir] {
            let slot = t.slot;
            match now {
                Some((ino, len)) if ino == t.ino => {
                    let consumed = self.readers[slot].as_ref().map_or(0, |r| r.consumed);
                    if len >= consumed {
                        return Ok(());
                    }
                    // Truncated (recovery cut a torn last line after a
                    // crash): read it again from the start, quietly up to
                    // what was printed.
                    self.readers[slot] = None;
                    quiet_through = self.last_printed;
                }
                // Renamed away by a rotation after its last write: read it
                // to its end in the next pass like any finished file.
                _ => {
                    if let Some(r) = self.readers[slot].as_mut() {
                        r.tail = false;
                    }
                }
            }
            self.tails[dir] = None;
        }
        if now.is_none() {
            return Ok(());
        }
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let ino = file
            .metadata()
            .with_context(|| format!("stat {}", path.display()))?
            .ino();
        let mut r = Reader {
            dir,
            path,
            inner: Box::new(BufReader::new(file)),
            partial: Vec::new(),
            head: None,
            tail: true,
            first_read: None,
            consumed: 0,
            quiet_through,
        };
        // Its first seq now, so that its rotated copy is known as read.
        if r.advance(&mut self.summary.unparsable)? {
            self.started.insert((dir, r.first_read.expect("a line was read")));
        }
        let slot = self.add_reader(r);
        self.tails[dir] = Some(Tail { slot, ino });
        Ok(())
    }

    fn add_reader(&mut self, r: Reader) -> usize {
        match self.readers.iter().position(Option::is_none) {
            Some(i) => {
                self.readers[i] = Some(r);
                i
            }
            None => {
                self.readers.push(Some(r));
                self.readers.len() - 1
            }
        }
    }

    /// Prints everything readable now, merged by seq.
    fn pass(&mut self, out: &mut dyn Write) -> anyhow::Result<()> {
        let mut heap: BinaryHeap<Reverse<(i64, usize)>> = BinaryHeap::new();
        for slot in 0..self.readers.len() {
            self.refill(slot, &mut heap)?;
        }
        loop {
            let top = heap.peek().map(|Reverse((seq, _))| *seq);
            let next = self.pending.peek().map(|Reverse((first, _))| *first);
            if let Some(first) = next
                && top.is_none_or(|t| first <= t)
            {
                let Reverse((_, idx)) = self.pending.pop().expect("peeked");
                let p = self.pending_files[idx].take().expect("queued once");
                if let Some(slot) = self.open(p)? {
                    self.refill(slot, &mut heap)?;
                }
                continue;
            }
            let Some(Reverse((seq, slot))) = heap.pop() else {
                return Ok(());
            };
            if seq > self.to_seq {
                self.done = true;
                return Ok(());
            }
            let r = self.readers[slot].as_mut().expect("in heap");
            let (_, line) = r.head.take().expect("head");
            if r.quiet_through.is_none_or(|q| seq > q) {
                self.print(seq, &line, out)?;
            }
            if self.done {
                return Ok(());
            }
            self.refill(slot, &mut heap)?;
        }
    }

    /// Reads the reader in `slot` to its next line and puts it in the heap;
    /// closes a finished file that has none left.
    fn refill(&mut self, slot: usize, heap: &mut BinaryHeap<Reverse<(i64, usize)>>) -> anyhow::Result<()> {
        let Some(r) = self.readers[slot].as_mut() else {
            return Ok(());
        };
        if r.head.is_none() && !r.advance(&mut self.summary.unparsable)? {
            if !r.tail {
                self.readers[slot] = None;
            }
            return Ok(());
        }
        let seq = r.head.as_ref().expect("head").0;
        if r.first_read == Some(seq) {
            self.started.insert((r.dir, seq));
        }
        heap.push(Reverse((seq, slot)));
        Ok(())
    }

    /// Opens a queued rotated file; if it was renamed since the listing
    /// (compressed, or a rename in flight), lists its directory again.
    fn open(&mut self, mut p: Pending) -> anyhow::Result<Option<usize>> {
        let file = match File::open(&p.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                p.tries += 1;
                anyhow::ensure!(
                    p.tries <= REOPEN_TRIES_MAX,
                    "{} vanished {} times while listing {} again",
                    p.path.display(),
                    p.tries,
                    self.dirs[p.dir].display()
                );
                self.queued.remove(&(p.dir, p.first_seq, p.last_seq));
                self.scan(p.dir)?;
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", p.path.display())),
        };
        let gz = p.path.to_str().is_some_and(|s| s.ends_with(store::GZ_SUFFIX));
        let inner: Box<dyn BufRead + Send> = if gz {
            Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))))
        } else {
            Box::new(BufReader::new(file))
        };
        Ok(Some(self.add_reader(Reader {
            dir: p.dir,
            path: p.path,
            inner,
            partial: Vec::new(),
            head: None,
            tail: false,
            first_read: None,
            consumed: 0,
            quiet_through: None,
        })))
    }

    fn print(&mut self, seq: i64, line: &[u8], out: &mut dyn Write) -> anyhow::Result<()> {
        if seq < self.from_seq {
            return Ok(());
        }
        if self.last_printed.is_some_and(|last| seq <= last) {
            self.summary.duplicates += 1;
            return Ok(());
        }
        match self.format {
            CatFormat::Json => out.write_all(line)?,
            CatFormat::Text => out.write_all(text_line(line).as_bytes())?,
        }
        self.last_printed = Some(seq);
        self.summary.printed += 1;
        if seq >= self.to_seq {
            self.done = true;
        }
        Ok(())
    }
}

/// `time role content` of a JSON line (newlines in content as `\n`).
fn text_line(line: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(line).unwrap_or_default();
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("");
    let role = match field("role") {
        "" => "-",
        r => r,
    };
    let content = field("content").replace('\\', "\\\\").replace('\n', "\\n");
    format!("{} {} {}\n", field("time"), role, content)
}

/// The seqs of `logd cat`'s JSON output, in order.
#[cfg(test)]
fn seqs_of(out: &[u8]) -> Vec<i64> {
    out.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| store::line_seq(l).expect("a logd line"))
        .collect()
}

#[cfg(test)]
#[path = "cat_tests.rs"]
mod tests;
