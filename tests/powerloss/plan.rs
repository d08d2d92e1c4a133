//! What a seed does: each phase's plan (how many steps, which fault, which
//! crash), the choice of the next step, and the crash itself.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use crate::knobs;
use crate::world::{Live, World};

/// The crash points the simulated pipeline passes through.
pub const CRASH_POINTS: [&str; 14] = [
    "wal::commit::after_write",
    "wal::commit::after_fsync",
    "wal::remove::after_unlink",
    "writer::after_write",
    "writer::after_fsync",
    "writer::after_checkpoint_put",
    "dispatcher::after_meta_flush",
    "rotate::after_record",
    "rotate::after_rename",
    "rotate::after_dir_fsync",
    "compress::after_tmp_open",
    "compress::after_gz",
    "compress::after_unlink",
    "compress::after_event",
];

// ---------------------------------------------------------------------------
// Crash points: an armed point panics with `CrashPanic`; the step catches it
// and the process is dead from there on.

struct CrashPanic(&'static str);

thread_local! {
    static ARMED: Cell<Option<&'static str>> = const { Cell::new(None) };
}

fn fire(point: &'static str) {
    if ARMED.with(|a| a.get()) == Some(point) {
        ARMED.with(|a| a.set(None));
        std::panic::panic_any(CrashPanic(point));
    }
}

pub fn arm(point: Option<&'static str>) {
    ARMED.with(|a| a.set(point));
}

pub fn install_crash_points() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for point in CRASH_POINTS {
            fail::cfg_callback(point, move || fire(point)).expect("failpoint");
        }
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.payload().is::<CrashPanic>() {
                default(info);
            }
        }));
    });
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    Step,
    /// After a batch's fdatasync, before it is settled.
    BeforeSettle,
    Point(&'static str),
}

/// The I/O errors a phase injects.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Every fdatasync after `n` more fails until the crash (`drops`: a
    /// failed writeback drops the pages, as Linux does).
    Syncs { n: u64, drops: bool },
    /// fdatasyncs after `n` more fail for `steps` steps, then heal.
    SyncBurst { n: u64, drops: bool, steps: u64 },
    /// Writes fail for `steps` steps, then heal.
    WriteBurst { steps: u64 },
    /// The kernel's background writeback of one file fails (its dirty pages
    /// are marked clean, the disk never got them): the active WAL segment
    /// (`wal`) or a session's `.logtmp`. Nobody has seen the error yet: the
    /// next fdatasync of any description of the file reports it (errseq).
    /// With `kill`, the process is killed at once, so a description of the
    /// next process sees it first (the recovery pass's open fdatasync); else
    /// whichever sync comes first (the WAL's roll or its sync step, a
    /// writer's fdatasync).
    Writeback { wal: bool, kill: bool },
}

#[derive(Debug)]
pub struct Plan {
    steps: u64,
    power: bool,
    at: Where,
    crash_seed: u64,
    fault: Option<(u64, Fault)>,
}

impl World {
    /// The next phase's plan. After a kill that followed a failed fdatasync
    /// (the page cache kept pages the disk never got), the next crash is a
    /// power cut: recovery must not have trusted those pages.
    fn plan(&mut self, after_failed_kill: bool) -> Plan {
        let crash_seed = self.rng.next_u64();
        let steps = self.step
            + if self.chance(20) {
                self.below(6)
            } else {
                30 + self.below(250)
            };
        let fault = match self.below(100) {
            _ if !knobs().faults => None,
            0..=9 => Some(Fault::Syncs {
                n: self.below(6),
                drops: self.chance(75),
            }),
            10..=17 => Some(Fault::SyncBurst {
                n: self.below(3),
                drops: self.chance(50),
                steps: 1 + self.below(4),
            }),
            18..=22 => Some(Fault::WriteBurst {
                steps: 1 + self.below(4),
            }),
            23..=28 => Some(Fault::Writeback {
                wal: self.chance(60),
                kill: self.chance(50),
            }),
            _ => None,
        };
        let fault = fault.map(|f| (self.step + self.below(steps - self.step + 1), f));
        let kill_at_fault = matches!(fault, Some((_, Fault::Writeback { kill: true, .. })));
        let power = (self.chance(70) || after_failed_kill) && !kill_at_fault;
        if after_failed_kill {
            // A kill after a failed fdatasync or writeback, a restart, more
            // work, and now a power cut: recovery must not have trusted the
            // pages the disk never got.
            self.stats.power_cuts_after_failed_kill += 1;
        }
        let at = match self.below(100) {
            0..=34 => Where::Step,
            35..=49 => Where::BeforeSettle,
            _ if cfg!(feature = "failpoints") && fault.is_none() => {
                Where::Point(CRASH_POINTS[self.below(CRASH_POINTS.len() as u64) as usize])
            }
            _ => Where::Step,
        };
        if let Some((fault_at, _)) = fault.filter(|_| kill_at_fault) {
            return Plan {
                steps: fault_at + 1,
                power,
                at: Where::Step,
                crash_seed,
                fault,
            };
        }
        Plan {
            steps: steps.max(fault.map_or(0, |(at, _)| at + 5)),
            power,
            at,
            crash_seed,
            fault,
        }
    }

    /// Runs one phase until the planned crash happened (or is due).
    fn run_phase(&mut self, live: &mut Live, plan: &Plan) -> Result<(), String> {
        let mut armed = false;
        let mut settle_crash = false;
        loop {
            if self.step >= plan.steps {
                match plan.at {
                    Where::Step => return Ok(()),
                    Where::BeforeSettle => settle_crash = true,
                    Where::Point(point) if !armed => {
                        armed = true;
                        self.note(format!("armed crash point {point}"));
                        arm(Some(point));
                    }
                    Where::Point(_) => {}
                }
                if self.step >= plan.steps + 120 {
                    self.note("crash point not reached: crashing between steps".into());
                    arm(None);
                    return Ok(());
                }
            }
            if let Some((at, fault)) = plan.fault {
                if self.step == at {
                    self.note(format!("FAULT {fault:?}"));
                    match fault {
                        Fault::Syncs { n, drops } => {
                            self.stats.fault_syncs += 1;
                            self.fs.set_failed_sync_drops_pending(drops);
                            self.fs.fail_syncs_after(n);
                        }
                        Fault::SyncBurst { n, drops, .. } => {
                            self.stats.fault_sync_bursts += 1;
                            self.fs.set_failed_sync_drops_pending(drops);
                            self.fs.fail_syncs_after(n);
                        }
                        Fault::WriteBurst { .. } => {
                            self.stats.fault_write_bursts += 1;
                            self.fs.set_write_error(true);
                        }
                        Fault::Writeback { wal, .. } => self.fail_writeback(live, wal),
                    }
                }
                if let Fault::SyncBurst { steps, .. } | Fault::WriteBurst { steps } = fault
                    && self.step == at + steps
                {
                    self.note("faults healed".into());
                    self.fs.clear_faults();
                }
            }
            let choice = self.below(100);
            let outcome = catch_unwind(AssertUnwindSafe(|| self.act(live, choice, settle_crash)));
            self.step += 1;
            match outcome {
                Ok(Ok(false)) => {}
                Ok(Ok(true)) => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(panic) => match panic.downcast::<CrashPanic>() {
                    Ok(point) => {
                        self.note(format!("crash point {} hit", point.0));
                        self.stats.crash_points_hit += 1;
                        return Ok(());
                    }
                    Err(other) => resume_unwind(other),
                },
            }
        }
    }

    /// One step of one part of the pipeline; true if the process died in it.
    fn act(&mut self, live: &mut Live, choice: u64, settle_crash: bool) -> Result<bool, String> {
        match choice {
            0..=14 => self.write_batch(live)?,
            15..=26 => return self.sync_batch(live, settle_crash),
            27..=37 => self.route(live),
            38..=74 => {
                let s = self.pick_session();
                for _ in 0..1 + self.below(4) {
                    self.writer_step(live, &s);
                }
            }
            75..=81 => self.apply_checkpoints(live),
            82..=88 => {
                while live.shared.reports.len() > self.below(3) as usize {
                    self.report(live);
                }
            }
            89..=92 => self.remove(live),
            93..=94 => {
                let s = if self.chance(80) {
                    Some(self.pick_session())
                } else {
                    None
                };
                self.manual_rotate(live, s);
            }
            _ => self.compress(live),
        }
        Ok(false)
    }

    fn crash(&mut self, live: Live, plan: &Plan, failed_syncs: u64) {
        arm(None);
        drop(live);
        if !plan.power && self.fs.stats().sync_data_failed > failed_syncs {
            self.stats.kills_after_failed_sync += 1;
        }
        if plan.power {
            let r = self.fs.crash(plan.crash_seed);
            self.note(format!("POWER CUT (seed {}): {r:?}", plan.crash_seed));
            self.stats.power_cuts += 1;
        } else {
            self.note("KILL (the page cache survives)".into());
            self.stats.kills += 1;
        }
        self.fs.clear_faults();
        let unflushed = self.meta.unflushed();
        let keep = self.below(unflushed as u64 + 1) as usize;
        self.meta.crash_keeping(keep);
        self.note(format!("the store keeps {keep} of {unflushed} unflushed batches"));
    }

    pub fn run(&mut self) -> Result<(), String> {
        self.note(format!(
            "WAL {:?}, {:?}, sessions {:?}",
            self.opts, self.life, self.sessions
        ));
        let wal = self.recover()?;
        let mut live = self.start(wal, BTreeMap::new());
        let mut after_failed_kill = false;
        for epoch in 0..2 + u32::from(self.chance(25)) {
            self.epoch = epoch;
            let plan = self.plan(after_failed_kill);
            self.note(format!("phase plan: {plan:?}"));
            if plan.fault.is_some() {
                self.stats.fault_phases += 1;
            }
            let failed_syncs = self.fs.stats().sync_data_failed;
            self.run_phase(&mut live, &plan)?;
            after_failed_kill = !plan.power
                && (self.fs.stats().sync_data_failed > failed_syncs
                    || matches!(
                        plan.fault,
                        Some((
                            _,
                            Fault::Syncs { .. } | Fault::SyncBurst { .. } | Fault::Writeback { .. }
                        ))
                    ));
            self.crash(live, &plan, failed_syncs);
            live = self.recover_and_check()?;
        }
        Ok(())
    }
}
