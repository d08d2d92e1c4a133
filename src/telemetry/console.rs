//! Lines for the terminal that never panic: `println!` panics when stdout is
//! a closed pipe (`logd bench | head -1`), and so does `eprintln!` for a
//! closed stderr. [`outln!`] and [`errln!`] drop a line that cannot be
//! written instead: the command finishes its work (a `send` still waits for
//! its acks, a `recover` still recovers) and exits with its own code.

use std::io::Write;

/// Writes one line to stdout; a write error (EPIPE: the reader went away)
/// drops it.
pub fn out_line(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{args}");
}

/// Writes one line to stderr; a write error drops it.
pub fn err_line(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stderr().lock(), "{args}");
}

/// Writes to stderr without a newline (progress lines); a write error drops it.
pub fn err_text(args: std::fmt::Arguments<'_>) {
    let mut e = std::io::stderr().lock();
    let _ = e.write_fmt(args).and_then(|()| e.flush());
}

/// `println!` that drops the line when stdout is closed.
macro_rules! outln {
    ($($t:tt)*) => { $crate::telemetry::console::out_line(format_args!($($t)*)) };
}

/// `eprintln!` that drops the line when stderr is closed.
macro_rules! errln {
    ($($t:tt)*) => { $crate::telemetry::console::err_line(format_args!($($t)*)) };
}

/// `eprint!` that drops the text when stderr is closed.
macro_rules! errtext {
    ($($t:tt)*) => { $crate::telemetry::console::err_text(format_args!($($t)*)) };
}

pub(crate) use {errln, errtext, outln};
