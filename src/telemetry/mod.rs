//! Counters and their export: the stats every stage keeps ([`stats`], a
//! leaf), the process's descriptor count and CPU time, and the Prometheus
//! endpoint; and [`console`], lines for the terminal that survive a closed pipe.

pub(crate) mod console;
pub(crate) mod cpu;
pub(crate) mod fds;
pub(crate) mod prometheus;
pub(crate) mod stats;
