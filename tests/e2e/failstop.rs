//! Fail-stop: a fault that leaves logd unable to go on safely ends the
//! process with a non-zero status (a supervisor restarts it and recovery
//! decides from the disk), instead of leaving it hung while health says
//! SERVING.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use logd::pb::LogBatch;

use crate::util::*;

/// How long logd may take to end itself after the fault.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// Sends one frame (not waiting past `EXIT_WITHIN` for an answer), then polls
/// until the process has exited; its status, or None if it still runs.
async fn send_and_wait_for_exit(server: &mut Server) -> (Option<ExitStatus>, String) {
    let mut client = server.client().await;
    let answer = tokio::time::timeout(
        EXIT_WITHIN,
        client.write_log_batch(LogBatch {
            frames: vec![frame("failstop", 0, "the first frame")],
        }),
    )
    .await;
    let answer = match answer {
        Ok(Ok(r)) => format!("acked: {:?}", r.into_inner()),
        Ok(Err(status)) => format!("{:?}: {}", status.code(), status.message()),
        Err(_) => "no answer".to_owned(),
    };
    let deadline = Instant::now() + EXIT_WITHIN;
    while Instant::now() < deadline {
        if let Some(status) = server.try_exit_status() {
            return (Some(status), answer);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (None, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_commit_thread_ends_the_process_instead_of_leaving_it_hung() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[("FAILPOINTS", "ingest::stage=panic")]);
    let (status, answer) = send_and_wait_for_exit(&mut server).await;
    let stderr = server.stderr();
    server.kill9();
    let status = status.unwrap_or_else(|| {
        panic!("logd still runs {EXIT_WITHIN:?} after its commit thread panicked (answer: {answer}); stderr:\n{stderr}")
    });
    assert!(!status.success(), "{status}");
    assert!(!answer.starts_with("acked"), "{answer}");
    assert!(
        stderr.contains("wal-commit") && stderr.contains("logd aborts"),
        "the panic and its thread are logged: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_metadata_store_while_assigning_seqs_fails_the_frame_and_stops_logd_with_exit_1() {
    let td = TestDir::new();
    let mut server = Server::start(&td.log_dir(), &[("FAILPOINTS", "ingest::meta_read=return")]);
    let (status, answer) = send_and_wait_for_exit(&mut server).await;
    let stderr = server.stderr();
    server.kill9();
    let status = status.unwrap_or_else(|| {
        panic!("logd still runs {EXIT_WITHIN:?} after the metadata store failed (answer: {answer}); stderr:\n{stderr}")
    });
    assert_eq!(status.code(), Some(1), "{status}; stderr:\n{stderr}");
    assert!(answer.starts_with("Unavailable"), "{answer}");
    assert!(
        answer.contains("metadata store unreadable") && answer.contains("failstop"),
        "{answer}"
    );
    assert!(
        !answer.contains("WAL"),
        "the WAL did not fail, the metadata store did: {answer}"
    );

    // The restart serves: nothing was appended for the failed frame.
    let mut server = Server::start(&td.log_dir(), &[]);
    let mut client = server.client().await;
    let resp = client
        .write_log_batch(LogBatch {
            frames: vec![frame("failstop", 0, "after the restart")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.frames_accepted, 1);
    server.stop();
    let lines = read_sessions(&td.log_dir()).remove("failstop").unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].seq, 1);
}
