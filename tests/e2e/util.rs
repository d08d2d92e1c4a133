//! Test support: start the real `logd` binary on a free loopback port with a
//! temporary directory, talk to it over real gRPC, read its files, and stop
//! it (SIGTERM, or SIGKILL on drop) even when the test fails.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.log_dir).unwrap();
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr_path = self.log_dir.parent().unwrap().join(format!("server-{n}.stderr"));
        let stderr = std::fs::File::create(&stderr_path).unwrap();
        let mut cmd = Command::new(logd_bin());
        cmd.arg("serve")
            .env("LOG_DIR", &self.log_dir)
            .env("LOGD_LISTEN", "127.0.0.1:0")
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
            Ok(addr) => self.addr = format!("http://{addr}"),
            Err(_) => {
                let status = self.child.as_mut().unwrap().try_wait().ok().flatten();
                panic!("logd did not start (exit: {status:?}); stderr:\n{}", self.stderr());
            }
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

    /// SIGTERM and wait; panics unless it exits 0 within 30 s.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        let sent = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .expect("kill -TERM");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "logd exited with {status} after SIGTERM; stderr:\n{}",
                    self.stderr()
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("logd did not stop within 30 s of SIGTERM; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
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
    let (live, rotated): (Vec<PathBuf>, Vec<PathBuf>) = names
        .into_iter()
        .partition(|p| p.extension().is_some_and(|e| e == "logtmp"));
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
