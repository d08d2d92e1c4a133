//! The `logd` binary: parses flags, sets up logging, runs a subcommand and
//! maps failures to exit codes (0 ok, 1 usage or I/O error, 2 integrity
//! problem needing an operator).

use std::process::ExitCode;

use clap::Parser;
use logd::config::{Cli, Command, LogFormat};

/// jemalloc instead of glibc malloc: the ingest path allocates a few small
/// buffers per frame (decoded strings, batch vectors) on one thread and frees
/// them on another; glibc's malloc/free/consolidate was ~15% of the profile.
/// (mimalloc was as fast but doubled peak RSS with many sessions.)
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    // Crash points are read from FAILPOINTS (test builds only).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    // Exit codes: 0 ok, 1 usage or I/O error, 2 integrity problem. clap's own
    // usage errors would exit 2, which scripts would take for damage.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let format = match &cli.command {
        Command::Serve(a) => a.log_format,
        _ => LogFormat::Text,
    };
    init_tracing(format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(logd::cli::run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            logd::cli::print_error(&e);
            ExitCode::from(logd::cli::exit_code(&e))
        }
    }
}
