//! A real, throwaway `redis-server` for the tests: on a loopback port, with
//! its files in a temporary directory, no persistence, killed on drop.
//! (Named `redis_server`, not `redis`, so that `redis::…` keeps meaning the
//! `redis` crate everywhere in the test crate.)

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port right now (nothing listens on it once this returns).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `redis-server`.
pub struct RedisServer {
    child: Child,
    /// `redis://127.0.0.1:<port>`
    pub url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    /// Starts one on `port` (e.g. one a logd was told about while nothing
    /// listened there) and waits until it answers PING.
    pub fn start_on(port: u16) -> RedisServer {
        let dir = tempfile::Builder::new().prefix("logd-redis-").tempdir().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not found: install it (.ci/run does: apt-get install redis-server)");
        let mut r = RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(port) {
            if let Some(status) = r.child.try_wait().unwrap() {
                panic!("redis-server on port {port} exited with {status} (port taken?)");
            }
            assert!(Instant::now() < deadline, "redis-server did not answer PING on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }
}

/// Whether something on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
