//! Test support: start the real `logd` binary on a free loopback port with a
//! temporary directory, talk to it over real gRPC, read its files, and stop
//! it (SIGTERM, or SIGKILL on drop) even when the test fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use logd::pb::log_service_client::LogServiceClient;
use logd::pb::{LogFrame, WriteLogAck, WriteLogResponse};
use tonic::transport::Channel;

/// Path of the binary under test.
pub fn logd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_logd")
}

/// A running `logd serve`.
pub struct Server {
    pub child: Option<Child>,
    pub addr: String,
    pub log_dir: PathBuf,
    pub extra: Vec<(String, String)>,
    pub stderr_path: PathBuf,
}

/// A temporary root for one test: `logs/` lives inside it.
pub struct TestDir {
    pub dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new() -> TestDir {
        TestDir {
            dir: tempfile::Builder::new().prefix("logd-test-").tempdir().unwrap(),
        }
    }
    pub fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }
}

impl Server {
    /// Starts `logd serve` on a free port with `LOG_DIR` = `log_dir` and extra env vars.
    pub fn start(log_dir: &Path, extra: &[(&str, &str)]) -> Server {
        let extra: Vec<(String, String)> = extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut s = Server {
            child: None,
            addr: String::new(),
            log_dir: log_dir.to_path_buf(),
            extra,
            stderr_path: PathBuf::new(),
        };
        s.spawn();
        s
    }

    /// Like [`Server::start`], but returns why `logd serve` did not come up
    /// (it exited, e.g. refusing a damaged WAL or aborting at a crash point
    /// during recovery) instead of panicking.
    pub fn try_start(log_dir: &Path, extra: &[(&str, &str)]) -> Result<Server, StartFailure> {
        let extra: Vec<(String, String)> = extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let mut s = Server {
            child: None,
            addr: String::new(),
            log_dir: log_dir.to_path_buf(),
            extra,
            stderr_path: PathBuf::new(),
        };
        s.try_spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) {
        if let Err(f) = self.try_spawn() {
            panic!("logd did not start (exit: {:?}); stderr:\n{}", f.status, f.stderr);
        }
    }

    fn try_spawn(&mut self) -> Result<(), StartFailure> {
        std::fs::create_dir_all(&self.log_dir).unwrap();
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr_path = self.log_dir.parent().unwrap().join(format!("server-{n}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(logd_bin());
        cmd.arg("serve")
            .env("LOG_DIR", &self.log_dir)
            .env("LOGD_LISTEN", "127.0.0.1:0")
            .env("LOGD_METRICS_LISTEN", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr);
        for (k, v) in &self.extra {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn logd");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(addr) = line.strip_prefix("logd: listening on ") {
                    let _ = tx.send(addr.to_string());
                }
            }
        });
        self.child = Some(child);
        self.stderr_path = stderr_path;
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(addr) => {
                self.addr = format!("http://{addr}");
                Ok(())
            }
            Err(_) => {
                // Either it exited (stdout closed) or it hung: reap it,
                // killing it if it has not exited within a few seconds.
                let mut child = self.child.take().unwrap();
                let deadline = Instant::now() + Duration::from_secs(5);
                let status = loop {
                    if let Some(s) = child.try_wait().ok().flatten() {
                        break Some(s);
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        break child.wait().ok();
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                Err(StartFailure {
                    status,
                    stderr: self.stderr(),
                })
            }
        }
    }

    /// The exit status if the process has exited (it is then reaped and
    /// the server counts as stopped); None while it runs.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// SIGTERM and wait up to `timeout` (then SIGKILL); Err (with stderr)
    /// unless it exits 0 in time.
    pub fn try_stop_within(&mut self, timeout: Duration) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Err("logd is not running".into());
        };
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill -TERM");
        if !sent.success() {
            return Err("kill -TERM failed".into());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                if status.success() {
                    return Ok(());
                }
                return Err(format!(
                    "logd exited with {status} after SIGTERM; stderr:\n{}",
                    self.stderr()
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "logd did not stop within {timeout:?} of SIGTERM (killed); stderr:\n{}",
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// A connected client.
    pub async fn client(&self) -> LogServiceClient<Channel> {
        LogServiceClient::connect(self.addr.clone()).await.expect("connect")
    }

    /// Sends SIGTERM; returns the child and the deadline for its exit.
    fn term(&mut self) -> (Child, Instant) {
        let child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(sent.success(), "kill -TERM failed");
        (child, Instant::now() + Duration::from_secs(30))
    }

    /// True once `child` exited 0; panics on a failed exit or past `deadline`.
    fn stopped(&self, child: &mut Child, deadline: Instant) -> bool {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "logd exited with {status} after SIGTERM; stderr:\n{}",
                self.stderr()
            );
            return true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("logd did not stop within 30 s of SIGTERM; stderr:\n{}", self.stderr());
        }
        false
    }

    /// SIGTERM and wait; panics unless it exits 0 within 30 s. Blocks the
    /// thread: in a single-threaded runtime, clients it holds cannot answer
    /// the server's GOAWAY (use [`Server::stop_async`] there).
    pub fn stop(&mut self) {
        let (mut child, deadline) = self.term();
        while !self.stopped(&mut child, deadline) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Server::stop`], without blocking the runtime.
    pub async fn stop_async(&mut self) {
        let (mut child, deadline) = self.term();
        while !self.stopped(&mut child, deadline) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: a crash at an arbitrary instant.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same directories (new port).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        self.spawn();
    }
}

/// Why `logd serve` did not start: its exit status (None if unknown) and stderr.
#[derive(Debug)]
pub struct StartFailure {
    pub status: Option<ExitStatus>,
    pub stderr: String,
}

/// Runs `logd <args>` to completion with `LOG_DIR` = `log_dir` and extra env vars.
pub fn run_logd(args: &[&str], log_dir: &Path, extra: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(logd_bin());
    cmd.args(args).env("LOG_DIR", log_dir).env("RUST_LOG", "info");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.output().expect("run logd")
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A frame for `session` with `content` and `seq` (0: server assigns).
pub fn frame(session: &str, seq: i64, content: &str) -> LogFrame {
    LogFrame {
        session_id: session.into(),
        seq,
        content: content.into(),
        user_id: "u1".into(),
        role: "agent".into(),
        ..Default::default()
    }
}

/// Sends `frames` with WriteLogStream.
pub async fn send_stream(client: &mut LogServiceClient<Channel>, frames: Vec<LogFrame>) -> WriteLogResponse {
    client
        .write_log_stream(tokio_stream::iter(frames))
        .await
        .expect("WriteLogStream")
        .into_inner()
}

/// Reads a bidi stream's acks until it ends with an error, as it must;
/// returns the last ack before the error (default if none) and the error.
pub async fn acks_until_error(acks: &mut tonic::Streaming<WriteLogAck>) -> (WriteLogAck, tonic::Status) {
    let mut last = WriteLogAck::default();
    loop {
        match acks.message().await {
            Ok(Some(ack)) => last = ack,
            Ok(None) => panic!(
                "WriteLogBidi ended without an error (acked through {})",
                last.through_index
            ),
            Err(e) => return (last, e),
        }
    }
}

/// Sends `frames` with WriteLogBidi, returning every ack.
pub async fn send_bidi(client: &mut LogServiceClient<Channel>, frames: Vec<LogFrame>) -> Vec<WriteLogAck> {
    let mut acks = client
        .write_log_bidi(tokio_stream::iter(frames))
        .await
        .expect("WriteLogBidi")
        .into_inner();
    let mut out = Vec::new();
    while let Some(a) = acks.message().await.expect("ack stream") {
        out.push(a);
    }
    out
}

/// One parsed line of a session file.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Line {
    pub seq: i64,
    pub time: String,
    pub session_id: String,
    pub user_id: String,
    pub role: String,
    pub version: i32,
    pub content: String,
    pub metadata: serde_json::Value,
}

/// Every line of every file of every session in `log_dir`, by session, in
/// file order (rotated files by name, then the `.logtmp`). Panics on a line
/// that is not valid JSON.
pub fn read_sessions(log_dir: &Path) -> BTreeMap<String, Vec<Line>> {
    let mut out: BTreeMap<String, Vec<Line>> = BTreeMap::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(log_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    names.sort();
    let (live, mut rotated): (Vec<PathBuf>, Vec<PathBuf>) = names
        .into_iter()
        .partition(|p| p.extension().is_some_and(|e| e == "logtmp"));
    // Rotated files in seq order (names sort by time, and two rotations in
    // one second would sort `100-199` before `20-99`).
    let first_seq = |p: &PathBuf| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        store::parse_rotated_name(name).map(|r| (r.session, r.first_seq))
    };
    rotated.sort_by_key(first_seq);
    for path in rotated.into_iter().chain(live) {
        let text = read_maybe_gz(&path);
        let Some(text) = text else { continue };
        for (i, l) in text.lines().enumerate() {
            let line: Line = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}:{}: bad JSON line {l:?}: {e}", path.display(), i + 1));
            out.entry(line.session_id.clone()).or_default().push(line);
        }
    }
    out
}

fn read_maybe_gz(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if name.ends_with(".logtmp") || name.ends_with(".log") {
        Some(std::fs::read_to_string(path).unwrap())
    } else if name.ends_with(".log.gz") {
        let out = Command::new("gzip").arg("-dc").arg(path).output().expect("gzip");
        assert!(out.status.success(), "gzip -dc {} failed", path.display());
        Some(String::from_utf8(out.stdout).unwrap())
    } else {
        None
    }
}

/// Asserts a session's seqs are strictly increasing.
pub fn assert_increasing(session: &str, lines: &[Line]) {
    for w in lines.windows(2) {
        assert!(
            w[0].seq < w[1].seq,
            "session {session}: seq {} then {}",
            w[0].seq,
            w[1].seq
        );
    }
}

/// An admin client for `server`.
pub async fn admin(server: &Server) -> logd::pb::admin_service_client::AdminServiceClient<Channel> {
    logd::pb::admin_service_client::AdminServiceClient::connect(server.addr.clone())
        .await
        .expect("connect admin")
}

/// `server`'s GetStats.
pub async fn stats(server: &Server) -> logd::pb::StatsResponse {
    admin(server)
        .await
        .get_stats(logd::pb::StatsRequest::default())
        .await
        .expect("GetStats")
        .into_inner()
}

/// `.log` and `.tmp` files in `dir`, sorted: what a finished lifecycle
/// leaves none of.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".tmp") || n.ends_with(".log"))
        .collect();
    v.sort();
    v
}

/// Waits until no `.log` and no `.tmp` is left in `dir`, nothing waits for
/// compression and the outbox is empty (also for files an earlier process
/// left, which the server's counters do not know).
pub async fn wait_files_settled(server: &Server, dir: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let s = stats(server).await;
        let left = leftovers(dir);
        if s.compress_backlog == 0 && s.outbox_events == 0 && left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not settled after {timeout:?}: {left:?} left; {s:?}\nstderr:\n{}",
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Rotates every active session through the admin RPC; returns the files.
pub async fn rotate_all(server: &Server) -> Vec<String> {
    admin(server)
        .await
        .rotate(logd::pb::RotateRequest {
            session_id: String::new(),
            all: true,
        })
        .await
        .expect("Rotate")
        .into_inner()
        .files
}
