//! The operator's CLI against a real server (issue 16, item 4): `logd
//! status` lists sessions, `logd send --json`/`--meta` and its totals, every
//! client subcommand takes the same connection flags, errors print the gRPC
//! code name and the server's message once, and no subcommand panics on a
//! closed stdout.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::ops::send_cli;
use crate::util::*;

/// `logd status --json <args>` against `server`, parsed.
fn status_json(server: &Server, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["status", "--target", &server.addr, "--json"];
    all.extend_from_slice(args);
    let out = run_logd(&all, &server.log_dir, &[]);
    assert!(out.status.success(), "logd {all:?}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("logd {all:?}: not JSON ({e}): {out:?}"))
}

#[tokio::test]
async fn logd_status_lists_the_largest_sessions_first_and_one_session_on_request() {
    let td = TestDir::new();
    // Two open files at most: the third session's file closes the least
    // recently used one ("big").
    let mut server = Server::start(&td.log_dir(), &[("LOGD_OPEN_FILES_MAX", "2")]);
    let mut client = server.client().await;
    for (session, n) in [("big", 20), ("mid", 5), ("small", 1)] {
        let frames = (0..n)
            .map(|i| frame(session, 0, &format!("{session} {i} {:-<200}", "")))
            .collect();
        send_stream(&mut client, frames).await;
    }
    // The writers publish their files' state after each step: poll.
    let deadline = Instant::now() + Duration::from_secs(30);
    let sessions = loop {
        let v = status_json(&server, &["--top", "10"]);
        let s = v["sessions"].as_array().unwrap().clone();
        let seqs: Vec<i64> = s.iter().map(|x| x["last_seq"].as_i64().unwrap()).collect();
        if seqs == [20, 5, 1] && v["active_sessions"] == 3 && s[0]["open_file"].is_null() {
            break s;
        }
        assert!(Instant::now() < deadline, "sessions never settled: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let names: Vec<&str> = sessions.iter().map(|x| x["session_id"].as_str().unwrap()).collect();
    assert_eq!(names, ["big", "mid", "small"], "largest file first");
    let bytes: Vec<u64> = sessions.iter().map(|x| x["file_bytes"].as_u64().unwrap()).collect();
    assert!(
        bytes[0] > bytes[1] && bytes[1] > bytes[2] && bytes[2] > 200,
        "{bytes:?}"
    );
    for x in &sessions[1..] {
        let name = x["session_id"].as_str().unwrap();
        assert_eq!(x["open_file"], format!("{name}.logtmp"), "{x}");
        assert!(x["file_age_ms"].as_u64().unwrap() < 60_000, "{x}");
    }
    for x in &sessions {
        assert_eq!(x["active"], true);
        assert!(x["idle_ms"].as_u64().unwrap() < 60_000, "{x}");
    }

    // Text: a header saying how many are shown, then the rows.
    let out = run_logd(&["status", "--target", &server.addr, "--top", "2"], &td.log_dir(), &[]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("2 of 3 active session(s), largest open file first:"),
        "{stdout}"
    );
    let rows: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("session "))
        .skip(1)
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[0].starts_with("big ") && rows[0].contains(" 20 "), "{stdout}");
    assert!(rows[0].ends_with("(closed for a slot)"), "{stdout}");
    assert!(
        rows[1].starts_with("mid ") && rows[1].ends_with("mid.logtmp"),
        "{stdout}"
    );

    // One session, active or not; a rotated one has no open file until
    // its next frame, and keeps its last seq.
    let one = status_json(&server, &["--session", "small"]);
    assert_eq!(
        (one["session_id"].as_str(), one["last_seq"].as_i64()),
        (Some("small"), Some(1)),
        "{one}"
    );
    let none = status_json(&server, &["--session", "nobody"]);
    assert_eq!(none["active"], false, "{none}");
    assert_eq!(none["last_seq"], 0, "{none}");
    let out = run_logd(
        &["rotate", "--target", &server.addr, "--session", "mid"],
        &td.log_dir(),
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    // The writer publishes its state just after it answered the rotation.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mid = loop {
        let mid = status_json(&server, &["--session", "mid"]);
        if mid["open_file"].is_null() || Instant::now() > deadline {
            break mid;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(mid["open_file"].is_null(), "{mid}");
    assert_eq!(
        (mid["last_seq"].as_i64(), mid["file_bytes"].as_u64()),
        (Some(5), Some(0)),
        "{mid}"
    );
    let out = run_logd(
        &["status", "--target", &server.addr, "--session", "mid"],
        &td.log_dir(),
        &[],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("mid ") && stdout.contains("(none: rotated, or no frame yet)"),
        "{stdout}"
    );
    server.stop_async().await;
}

#[tokio::test]
async fn logd_send_json_carries_every_field_and_prints_totals_with_the_first_reasons() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let mut input = String::new();
    input.push_str(
        r#"{"content":"hello","role":"user","user_id":"u1","seq":10,"time":"2026-12-01T08:00:00.25Z","metadata":{"trace":"t-1","n":3}}"#,
    );
    input.push('\n');
    input.push_str(r#"{"content":{"tool":"ls","args":["-l"]},"role":"tool"}"#);
    input.push('\n');
    input.push_str("this is not json\n");
    input.push_str(r#"{"content":"again","seq":10}"#); // a duplicate of seq 10
    input.push('\n');
    // 500 frames the server rejects: their session ids are invalid.
    for i in 0..500 {
        input.push_str(&format!("{{\"content\":\"bad {i}\",\"session_id\":\"../x{i}\"}}\n"));
    }
    let out = send_cli(
        &td.log_dir(),
        &[
            "--target",
            &server.addr,
            "--json",
            "--session",
            "js",
            "--meta",
            "host=h1",
            "--meta",
            "trace=flag",
        ],
        &input,
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "some lines were rejected: {out:?}");
    assert!(
        stdout.contains("504 line(s): 2 accepted, 1 duplicate, 501 rejected"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("2 line(s) acked as seq 10..=11 of session js"),
        "{stdout}"
    );
    let reasons: Vec<&str> = stderr.lines().filter(|l| l.contains(": rejected: ")).collect();
    assert_eq!(reasons.len(), 5, "the first five reasons:\n{stderr}");
    assert!(reasons[0].starts_with("line 3: rejected: not JSON"), "{stderr}");
    assert!(
        reasons[1].starts_with("line 5: rejected: invalid session_id \"../x0\""),
        "{stderr}"
    );
    assert!(stderr.contains("… and 496 more rejected line(s)"), "{stderr}");

    // Plain lines with --meta.
    let out = send_cli(
        &td.log_dir(),
        &["--target", &server.addr, "--session", "plain", "--meta", "env=prod"],
        "a\nb\n",
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 line(s): 2 accepted, 0 duplicate, 0 rejected"));
    server.stop_async().await;

    let sessions = read_sessions(&td.log_dir());
    let js = &sessions["js"];
    assert_eq!(js.len(), 2, "{js:?}");
    let raw = std::fs::read_to_string(td.log_dir().join("js.logtmp")).unwrap();
    let lines: Vec<serde_json::Value> = raw.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0]["content"], "hello");
    assert_eq!(lines[0]["role"], "user");
    assert_eq!(lines[0]["user_id"], "u1");
    assert_eq!(lines[0]["seq"], 10);
    assert_eq!(lines[0]["time"], "2026-12-01T08:00:00.250000000Z");
    assert_eq!(
        lines[0]["metadata"]["trace"], "t-1",
        "the line's metadata wins: {}",
        lines[0]
    );
    assert_eq!(lines[0]["metadata"]["host"], "h1");
    assert_eq!(lines[0]["metadata"]["n"], 3);
    let content: serde_json::Value = serde_json::from_str(lines[1]["content"].as_str().unwrap()).unwrap();
    assert_eq!(
        content,
        serde_json::json!({"tool": "ls", "args": ["-l"]}),
        "sent as its JSON text"
    );
    assert_eq!(lines[1]["role"], "tool");
    assert_eq!(lines[1]["metadata"]["trace"], "flag");
    let raw = std::fs::read_to_string(td.log_dir().join("plain.logtmp")).unwrap();
    let first: serde_json::Value = serde_json::from_str(raw.lines().next().unwrap()).unwrap();
    assert_eq!(first["metadata"]["env"], "prod");
}

#[tokio::test]
async fn every_client_subcommand_takes_the_token_flag_or_its_env_var_and_errors_name_the_grpc_code_once() {
    let td = TestDir::new();
    let tokens = td.dir.path().join("tokens");
    std::fs::write(&tokens, "sesame\n").unwrap();
    let mut server = Server::start(&td.log_dir(), &[("LOGD_AUTH_TOKEN_FILE", tokens.to_str().unwrap())]);
    let target = server.addr.clone();
    let subcommands: [&[&str]; 4] = [
        &["status"],
        &["rotate", "--all"],
        &["bench", "--duration", "0.2", "--streams", "1", "--sessions", "1"],
        &["send", "--session", "tok"],
    ];
    for sub in subcommands {
        let mut args = sub.to_vec();
        args.extend(["--target", &target]);
        let run = |extra: &[&str], env: &[(&str, &str)]| {
            let mut cmd = Command::new(logd_bin());
            cmd.args(&args)
                .args(extra)
                .env("LOG_DIR", td.log_dir())
                .env_remove("LOGD_AUTH_TOKEN");
            cmd.envs(env.iter().copied()).stdin(Stdio::null());
            cmd.output().unwrap()
        };
        for (how, out) in [
            ("--token", run(&["--token", "sesame"], &[])),
            ("LOGD_AUTH_TOKEN", run(&[], &[("LOGD_AUTH_TOKEN", "sesame")])),
        ] {
            assert!(out.status.success(), "logd {args:?} with {how}: {out:?}");
        }
        let out = run(&["--token", "wrong"], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "logd {args:?} with a wrong token: {out:?}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert!(stderr.starts_with("logd: error: "), "{stderr}");
        assert_eq!(stderr.matches("UNAUTHENTICATED").count(), 1, "logd {args:?}: {stderr}");
        assert!(
            !stderr.contains("does not have valid authentication"),
            "tonic's description: {stderr}"
        );
    }
    // The server's message, after the code name, once.
    let out = run_logd(
        &[
            "rotate",
            "--target",
            &target,
            "--token",
            "sesame",
            "--session",
            "../etc",
        ],
        &td.log_dir(),
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        stderr.trim_end(),
        "logd: error: Rotate: INVALID_ARGUMENT: invalid session_id \"../etc\"",
        "{out:?}"
    );
    // A usage line that says what is required.
    let out = run_logd(&["rotate"], &td.log_dir(), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stderr.contains("\n  <--session <SESSION>|--all>\n"), "{stderr}");
    assert!(
        stderr.contains("Usage: logd rotate <--session <SESSION>|--all>\n"),
        "{stderr}"
    );
    server.stop_async().await;
}

/// Runs `logd <args>` with stdout a pipe whose reading end is closed before
/// the process starts: every write to stdout fails with EPIPE.
fn run_with_closed_stdout(args: &[&str], log_dir: &Path, stdin: &str) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = Command::new(logd_bin())
        .args(args)
        .env("LOG_DIR", log_dir)
        .stdin(Stdio::piped())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

#[tokio::test]
async fn no_subcommand_panics_when_its_stdout_is_closed() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[]);
    let lines: String = (0..200).map(|i| format!("line {i}\n")).collect();
    let target = server.addr.clone();
    let cases: [(&[&str], &str); 5] = [
        (
            &[
                "bench",
                "--target",
                &target,
                "--duration",
                "0.2",
                "--streams",
                "1",
                "--sessions",
                "2",
            ],
            "",
        ),
        (
            &[
                "bench",
                "--target",
                &target,
                "--duration",
                "0.2",
                "--streams",
                "1",
                "--json",
            ],
            "",
        ),
        (&["send", "--target", &target, "--session", "pipe"], &lines),
        (&["status", "--target", &target, "--top", "100"], ""),
        (&["rotate", "--target", &target, "--all"], ""),
    ];
    for (args, stdin) in cases {
        let out = run_with_closed_stdout(args, &td.log_dir(), stdin);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "logd {args:?} panicked:\n{stderr}");
        assert_eq!(
            out.status.code(),
            Some(0),
            "logd {args:?} must finish its work: {out:?}"
        );
    }
    server.stop_async().await;
    // The lines were sent even though nobody read the totals.
    assert_eq!(read_sessions(&td.log_dir())["pipe"].len(), 200);
    // Offline: `wal inspect` and `wal verify` on the stopped server's WAL,
    // and `cat` on its files (200 lines to print).
    let log_dir = td.log_dir();
    let log_dir = log_dir.to_str().unwrap();
    for args in [
        &["wal", "inspect"][..],
        &["wal", "verify"],
        &["wal", "inspect", "--json"],
        &["cat", "--session", "pipe", log_dir],
        &["cat", "--session", "pipe", "--format", "text", log_dir],
    ] {
        let out = run_with_closed_stdout(args, &td.log_dir(), "");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "logd {args:?} panicked:\n{stderr}");
        assert_eq!(out.status.code(), Some(0), "logd {args:?}: {out:?}");
    }
    // Help and usage go through clap, which must not panic either.
    let out = run_with_closed_stdout(&["--help"], &td.log_dir(), "");
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"), "{out:?}");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}
