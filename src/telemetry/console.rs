//! Lines for the terminal that never panic: `println!` panics when stdout is
//! a closed pipe (`logd serve | head -1`). [`outln!`] drops a line that
//! cannot be written instead, and the process goes on.

use std::io::Write;

/// Writes one line to stdout; a write error (EPIPE: the reader went away)
/// drops it.
pub fn out_line(args: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{args}");
}

/// `println!` that drops the line when stdout is closed.
macro_rules! outln {
    ($($t:tt)*) => { $crate::telemetry::console::out_line(format_args!($($t)*)) };
}

pub(crate) use outln;
