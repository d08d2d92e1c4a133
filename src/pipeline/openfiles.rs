//! The bound on open session files (`LOGD_OPEN_FILES_MAX`).
//!
//! Every session writer holding a `.logtmp` holds one [`FileSlot`]. When all
//! slots are taken, a writer that needs one asks the least recently used
//! holder to close its file: the holder syncs and checkpoints it, closes it
//! and frees the slot; it reopens the file on its next frame. Descriptors
//! beyond the slots stay free for the WAL, the metadata store, connections,
//! compression and the short-lived opens of rotation and directory fsyncs.
//!
//! # Invariants
//! - At most `max` slots are held at once.
//! - A writer waiting for a slot holds none (no hold-and-wait), so a holder
//!   that is asked to close always can.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Open session files at most, and who holds them.
pub struct OpenFiles {
    max: usize,
    inner: Mutex<Inner>,
    released: Notify,
}

#[derive(Default)]
struct Inner {
    clock: u64,
    holders: HashMap<String, Holder>,
    /// Holders not yet asked to close, least recently used first.
    lru: BTreeMap<u64, String>,
}

struct Holder {
    used: u64,
    wake: Arc<Notify>,
    asked: bool,
}

/// One open session file's share of the bound; freed on drop.
pub struct FileSlot {
    files: Arc<OpenFiles>,
    session: String,
}

impl FileSlot {
    /// Marks the slot's file as just used ([`OpenFiles::touch`]).
    pub fn touch(&self) {
        self.files.touch(&self.session);
    }

    /// Whether the holder was asked to close its file ([`OpenFiles::close_asked`]).
    pub fn close_asked(&self) -> bool {
        self.files.close_asked(&self.session)
    }
}

impl Drop for FileSlot {
    fn drop(&mut self) {
        self.files.release(&self.session);
    }
}

impl OpenFiles {
    /// A bound of `max` open session files (at least 1).
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(OpenFiles {
            max: max.max(1),
            inner: Mutex::new(Inner::default()),
            released: Notify::new(),
        })
    }

    /// Session files open now.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.inner.lock().expect("not poisoned").holders.len()
    }

    /// Waits for a slot for `session`. While none is free, asks the least
    /// recently used holder to close its file (its writer is woken through
    /// the `wake` it registered). The caller must hold no slot.
    pub async fn acquire(self: &Arc<Self>, session: &str, wake: Arc<Notify>) -> FileSlot {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Ok(slot) = self.try_acquire(session, &wake) {
                return slot;
            }
            // Woken by a release; the timeout only guards against a holder
            // that cannot answer right now (it is asked again).
            let _ = tokio::time::timeout(Duration::from_millis(200), released).await;
        }
    }

    /// One attempt of [`OpenFiles::acquire`], without waiting: a slot, or
    /// (none free) the least recently used holder not yet asked is asked to
    /// close its file (woken through its `wake`) and named in the `Err`.
    pub fn try_acquire(self: &Arc<Self>, session: &str, wake: &Arc<Notify>) -> Result<FileSlot, Option<String>> {
        let mut g = self.inner.lock().expect("not poisoned");
        assert!(!g.holders.contains_key(session), "{session} already holds a slot");
        if g.holders.len() < self.max {
            g.clock += 1;
            let used = g.clock;
            g.holders.insert(
                session.to_owned(),
                Holder {
                    used,
                    wake: wake.clone(),
                    asked: false,
                },
            );
            g.lru.insert(used, session.to_owned());
            debug_assert!(g.holders.len() <= self.max);
            return Ok(FileSlot {
                files: self.clone(),
                session: session.to_owned(),
            });
        }
        let victim = g.lru.pop_first().map(|(_, victim)| victim);
        if let Some(victim) = &victim {
            let h = g.holders.get_mut(victim).expect("lru entries are holders");
            h.asked = true;
            h.wake.notify_one();
        }
        Err(victim)
    }

    /// Marks `session`'s file as just used.
    pub fn touch(&self, session: &str) {
        let mut g = self.inner.lock().expect("not poisoned");
        g.clock += 1;
        let now = g.clock;
        let Some(h) = g.holders.get_mut(session) else { return };
        if h.asked {
            return;
        }
        let before = std::mem::replace(&mut h.used, now);
        g.lru.remove(&before);
        g.lru.insert(now, session.to_owned());
    }

    /// Whether `session` was asked to close its file.
    pub fn close_asked(&self, session: &str) -> bool {
        let g = self.inner.lock().expect("not poisoned");
        g.holders.get(session).is_some_and(|h| h.asked)
    }

    fn release(&self, session: &str) {
        {
            let mut g = self.inner.lock().expect("not poisoned");
            if let Some(h) = g.holders.remove(session)
                && !h.asked
            {
                g.lru.remove(&h.used);
            }
        }
        self.released.notify_waiters();
    }
}

/// The default of `LOGD_OPEN_FILES_MAX`: half of the open-file limit
/// (`RLIMIT_NOFILE`, after logd raised its soft limit to the hard one), at
/// least 8. The other half stays for everything else.
pub fn default_open_files_max() -> usize {
    (nofile_limit() / 2).max(8) as usize
}

/// The soft `RLIMIT_NOFILE` (1024 if unknown).
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur
    } else {
        1024
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_writer_needing_a_slot_asks_the_least_recently_used_holder_to_close() {
        let files = OpenFiles::new(2);
        let (wa, wb) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        let a = files.acquire("a", wa.clone()).await;
        let b = files.acquire("b", wb.clone()).await;
        files.touch("a"); // b is now the least recently used
        assert_eq!(files.open(), 2);
        let waiting = {
            let files = files.clone();
            tokio::spawn(async move { files.acquire("c", Arc::new(Notify::new())).await })
        };
        tokio::time::timeout(Duration::from_secs(5), wb.notified())
            .await
            .expect("b is asked to close");
        assert!(files.close_asked("b") && !files.close_asked("a"));
        assert!(!waiting.is_finished(), "no slot until b closes");
        drop(b);
        let c = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("c gets b's slot")
            .unwrap();
        assert_eq!(files.open(), 2);
        drop((a, c));
        assert_eq!(files.open(), 0);
    }
}
