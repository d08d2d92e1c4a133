//! The cap on active sessions (`LOGD_SESSIONS_ACTIVE_MAX`): every active
//! session costs a writer task, an open file and memory, so a flood of new
//! session ids must be refused before it reaches the WAL.
//!
//! A session is active while its writer runs (the dispatcher reports starts
//! and stops) or while the edge has reserved a slot for it: the gRPC edge
//! reserves a slot for a new session when it reads the session's first frame
//! and refuses the frame with `RESOURCE_EXHAUSTED` when no slot is left. A
//! reservation whose frames never started a writer (all duplicates, or a
//! call refused later) expires after [`RESERVATION_TTL`]. Sessions whose
//! writer stops while one of their frames is in flight may briefly count
//! past the cap (by at most the sessions of the frames in flight).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt};

/// How long a slot reserved by the edge waits for its writer.
pub const RESERVATION_TTL: Duration = Duration::from_secs(60);

/// Active sessions and reservations, at most `max` (see the module doc).
pub struct ActiveSessions {
    max: usize,
    inner: Mutex<Inner>,
}

struct Inner {
    /// session → whether its writer runs (false: reserved by the edge).
    slots: HashMap<String, bool>,
    /// Reservations in the order they were made.
    reserved: VecDeque<(Instant, String)>,
}

/// Why a session got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full {
    /// Sessions active (or reserved) now.
    pub active: usize,
    /// The cap.
    pub max: usize,
}

impl ActiveSessions {
    /// A registry allowing `max` active sessions.
    pub fn new(max: usize) -> Self {
        ActiveSessions {
            max,
            inner: Mutex::new(Inner {
                slots: HashMap::new(),
                reserved: VecDeque::new(),
            }),
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ok if `session` is active, or was given a slot now.
    pub fn admit(&self, session: &str) -> Result<(), Full> {
        let mut g = self.inner();
        if g.slots.contains_key(session) {
            return Ok(());
        }
        if g.slots.len() >= self.max {
            return Err(Full {
                active: g.slots.len(),
                max: self.max,
            });
        }
        g.slots.insert(session.to_owned(), false);
        g.reserved.push_back((Instant::now(), session.to_owned()));
        Ok(())
    }

    /// The dispatcher started a writer for `session`.
    pub fn writer_started(&self, session: &str) {
        let mut g = self.inner();
        match g.slots.get_mut(session) {
            Some(w) => *w = true,
            None => {
                g.slots.insert(session.to_owned(), true);
            }
        }
    }

    /// `session`'s writer stopped: its slot is free.
    pub fn writer_stopped(&self, session: &str) {
        self.inner().slots.remove(session);
    }

    /// Frees reservations older than `ttl` that started no writer.
    pub fn expire_reservations(&self, ttl: Duration) {
        let mut g = self.inner();
        let now = Instant::now();
        while let Some((at, _)) = g.reserved.front() {
            if now.duration_since(*at) < ttl {
                break;
            }
            let (_, session) = g.reserved.pop_front().expect("front exists");
            if g.slots.get(&session) == Some(&false) {
                g.slots.remove(&session);
            }
        }
    }

    /// Sessions active or reserved now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner().slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_session_beyond_the_cap_is_refused_until_a_writer_stops_or_a_reservation_expires() {
        let a = ActiveSessions::new(2);
        a.admit("x").unwrap();
        a.admit("y").unwrap();
        a.admit("x").unwrap(); // already active: no new slot
        assert_eq!(a.admit("z"), Err(Full { active: 2, max: 2 }));
        a.writer_started("x");
        a.writer_stopped("x");
        a.admit("z").unwrap();
        assert_eq!(a.admit("w"), Err(Full { active: 2, max: 2 }));
        // "y" never started a writer: its reservation expires; "z" too.
        a.expire_reservations(Duration::ZERO);
        assert_eq!(a.len(), 0);
        a.admit("w").unwrap();
        a.writer_started("w");
        a.expire_reservations(Duration::ZERO);
        assert_eq!(a.len(), 1, "a session with a writer keeps its slot");
    }
}
