//! The alert rules of `docs/OPERATIONS.md` against real scrapes of a real
//! logd (issue 16, item 3): every expression parses (`promtool check
//! rules`), and `promtool test rules` evaluates all of them over three
//! scrapes, one minute apart in the test's time: during recovery, once
//! serving, and after a session was refused at `LOGD_SESSIONS_ACTIVE_MAX`.
//! `LogdNotServing` must fire in the first and only there; `LogdSessionCap`
//! only in the third: before `logd_errors_total{kind}` was exported at 0
//! from the start, its first error was the series' first sample and
//! `increase()` could not see it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tonic::Code;

use crate::ops::{scrape, serve_command, spawn_logd, wait_line};
use crate::util::*;

/// The `(alert, expression)` rows of OPERATIONS.md's alert table.
fn documented_rules() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/OPERATIONS.md")).unwrap();
    let section = doc
        .split("## Alerts worth setting")
        .nth(1)
        .expect("the alerts section")
        .split("\n## ")
        .next()
        .unwrap();
    let code = |cell: &str| -> String {
        let cell = cell.trim();
        assert!(
            cell.starts_with('`') && cell.ends_with('`') && cell.matches('`').count() == 2,
            "a cell of the alert table must be one `code` span: {cell:?}"
        );
        cell.trim_matches('`').to_owned()
    };
    let rows: Vec<(String, String)> = section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').collect();
            (code(cells[1]), code(cells[2]))
        })
        .collect();
    assert!(rows.len() >= 15, "{rows:?}");
    rows
}

/// The sample lines of a text exposition: series (as written) → value.
fn samples(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("series value");
            (series.to_owned(), value.to_owned())
        })
        .collect()
}

fn promtool(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool not found: install it (scripts/test does: apt-get install prometheus)")
}

#[tokio::test]
#[cfg_attr(not(feature = "failpoints"), ignore = "needs --features failpoints")]
async fn the_documented_alert_rules_parse_and_fire_on_real_scrapes_of_a_real_logd() {
    let td = TestDir::new();
    let rules = documented_rules();
    let mut yaml = String::from("groups:\n  - name: logd\n    rules:\n");
    for (alert, expr) in &rules {
        writeln!(
            yaml,
            "      - alert: {alert}\n        expr: '{}'",
            expr.replace('\'', "''")
        )
        .unwrap();
    }
    std::fs::write(td.dir.path().join("rules.yml"), &yaml).unwrap();
    let out = promtool(&["check", "rules", "rules.yml"], td.dir.path());
    assert!(out.status.success(), "promtool check rules:\n{yaml}\n{out:?}");
    let checked = String::from_utf8_lossy(&out.stdout);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "{checked}"
    );

    // A real logd, held in recovery for 3 s, one active session at most.
    let log_dir = td.log_dir();
    std::fs::create_dir_all(&log_dir).unwrap();
    let extra = [
        ("FAILPOINTS", "recover::start=sleep(3000)"),
        ("LOGD_SESSIONS_ACTIVE_MAX", "1"),
    ];
    let cmd = serve_command(&log_dir, &extra);
    let (mut server, lines) = spawn_logd(cmd, &log_dir, td.dir.path().join("alerts.stderr"));
    let metrics = wait_line(&lines, "logd: metrics on ", Duration::from_secs(60), &server);
    wait_line(&lines, "logd: recovering on ", Duration::from_secs(60), &server);
    let recovering = scrape(&metrics);
    let addr = wait_line(&lines, "logd: listening on ", Duration::from_secs(60), &server);
    server.addr = format!("http://{addr}");
    let mut client = server.client().await;
    send_stream(&mut client, vec![frame("only", 0, "fits")]).await;
    let serving = scrape(&metrics);
    let refused = client
        .write_log_batch(logd::pb::LogBatch {
            frames: vec![frame("second", 0, "one session too many")],
        })
        .await
        .expect_err("a second session is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let after = scrape(&metrics);
    server.stop_async().await;

    // The scrapes as promtool input series, one minute apart.
    let scrapes = [samples(&recovering), samples(&serving), samples(&after)];
    assert_eq!(scrapes[0].get("logd_serving").map(String::as_str), Some("0"));
    assert_eq!(scrapes[1].get("logd_serving").map(String::as_str), Some("1"));
    let cap = "logd_errors_total{kind=\"sessions_active_max\"}";
    let counts: Vec<Option<&str>> = scrapes.iter().map(|s| s.get(cap).map(String::as_str)).collect();
    assert_eq!(
        counts,
        [Some("0"), Some("0"), Some("1")],
        "exported at 0 from the start"
    );
    let all: std::collections::BTreeSet<&String> = scrapes.iter().flat_map(|s| s.keys()).collect();
    let mut tests =
        String::from("rule_files: [rules.yml]\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n");
    for series in all {
        let values: Vec<&str> = scrapes
            .iter()
            .map(|s| s.get(series).map_or("_", String::as_str))
            .collect();
        let values = values.join(" ").replace("+Inf", "Inf");
        writeln!(tests, "      - series: '{series}'\n        values: '{values}'").unwrap();
    }
    tests.push_str("    alert_rule_test:\n");
    let expect = |t: &mut String, at: &str, alert: &str, firing: Option<&str>| {
        let alerts = match firing {
            Some(labels) => format!("[{{exp_labels: {{{labels}}}}}]"),
            None => "[]".to_owned(),
        };
        writeln!(
            t,
            "      - eval_time: {at}\n        alertname: {alert}\n        exp_alerts: {alerts}"
        )
        .unwrap();
    };
    expect(&mut tests, "0m", "LogdNotServing", Some(""));
    expect(&mut tests, "1m", "LogdNotServing", None);
    expect(&mut tests, "2m", "LogdNotServing", None);
    expect(&mut tests, "1m", "LogdSessionCap", None);
    expect(&mut tests, "2m", "LogdSessionCap", Some("kind: sessions_active_max"));
    for quiet in [
        "LogdWalFailure",
        "LogdOverloaded",
        "LogdIdleSockets",
        "LogdSessionFileError",
        "LogdMetadataRebuilt",
    ] {
        expect(&mut tests, "2m", quiet, None);
    }
    std::fs::write(td.dir.path().join("tests.yml"), &tests).unwrap();
    let out = promtool(&["test", "rules", "tests.yml"], td.dir.path());
    assert!(
        out.status.success(),
        "promtool test rules failed:\n{}{}\n--- tests.yml:\n{tests}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "alerts: {} rules checked; {} series from 3 real scrapes evaluated; LogdNotServing fired during recovery, \
         LogdSessionCap after the refusal",
        rules.len(),
        tests.matches("- series:").count()
    );
}
