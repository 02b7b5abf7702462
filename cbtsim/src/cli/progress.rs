//! The command line's one [`Progress`]: an indicatif bar on stderr.
//!
//! Every long command (backup, restore, repository verify, large disk reads and writes,
//! replay, scenario runs, guest runs, the torture verifier) reports through
//! [`backup::Progress`]; a [`Bar`] draws what it reports. A bar is drawn only when stderr
//! is a terminal, so piped output and tests see nothing of it.
//!
//! A phase's label is the bar's `{prefix}` and its notes are its `{msg}`; a command picks
//! the template for a known total and the one for an unknown total (a spinner).
//!
//! # Limitations
//! One bar shows one phase at a time: an operation of several phases (a backup of several
//! disks) redraws the same bar for each, and phases reported from several threads at once
//! need a bar each (a scenario gets one per VM, in a `MultiProgress`).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backup::Progress;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Set by the first Ctrl-C (or SIGTERM) once [`catch_interrupts`] ran; every [`Bar`]
/// then answers [`Progress::cancelled`] with true.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// From now on the first Ctrl-C or SIGTERM asks the running operation to stop (it
/// cleans up what it made, then the command fails with "interrupted"); a second one
/// ends the process at once. For commands whose operations poll [`Progress::cancelled`]
/// (replay, verify); the others keep the default: a signal ends them.
pub fn catch_interrupts() -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    for sig in [SIGINT, SIGTERM] {
        // The order matters: the shutdown hook runs first, on a flag already set.
        signal_hook::flag::register_conditional_shutdown(sig, 130, &INTERRUPTED)?;
        signal_hook::flag::register(sig, &INTERRUPTED)?;
    }
    Ok(())
}

/// Whether a caught Ctrl-C asked the command to stop.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// An indicatif bar that shows what a [`Progress`] is told.
#[derive(Debug)]
pub struct Bar {
    pb: ProgressBar,
    /// The template with a known total.
    known: String,
    /// The template without.
    unknown: String,
    tick: Option<Duration>,
    keep: bool,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

impl Bar {
    fn with(pb: ProgressBar, known: &str, unknown: &str) -> Self {
        pb.set_style(style(known));
        Bar {
            pb,
            known: known.to_owned(),
            unknown: unknown.to_owned(),
            tick: None,
            keep: false,
        }
    }

    /// A bar on stderr (hidden unless stderr is a terminal) drawn with `known` when a
    /// phase's total is known and with `unknown` when not.
    pub fn stderr(known: &str, unknown: &str) -> Self {
        if std::io::stderr().is_terminal() {
            Self::with(ProgressBar::no_length(), known, unknown)
        } else {
            Self::hidden()
        }
    }

    /// A bar that draws nothing.
    pub fn hidden() -> Self {
        Self::with(ProgressBar::hidden(), "", "")
    }

    /// The next bar of `multi`, drawn as [`Bar::stderr`] is; a phase's end leaves it
    /// drawn (the command clears `multi` when every phase is over).
    pub fn in_multi(multi: &MultiProgress, known: &str, unknown: &str) -> Self {
        let mut bar = Self::with(multi.add(ProgressBar::no_length()), known, unknown);
        bar.keep = true;
        bar
    }

    /// Redraws every `every` while a phase runs (for spinners of rare updates).
    pub fn ticking(mut self, every: Duration) -> Self {
        self.tick = Some(every);
        self
    }
}

impl Progress for Bar {
    fn begin(&self, label: &str, total: Option<u64>) {
        match total {
            Some(n) => {
                self.pb.set_style(style(&self.known));
                self.pb.set_length(n);
            }
            None => {
                self.pb.set_style(style(&self.unknown));
                self.pb.unset_length();
            }
        }
        self.pb.set_prefix(label.to_owned());
        self.pb.reset();
        if let Some(every) = self.tick {
            self.pb.enable_steady_tick(every);
        }
    }

    fn advance(&self, n: u64) {
        self.pb.inc(n);
    }

    fn note(&self, note: &str) {
        self.pb.set_message(note.to_owned());
    }

    fn cancelled(&self) -> bool {
        interrupted()
    }

    fn end(&self) {
        if self.keep {
            self.pb.finish();
        } else {
            self.pb.finish_and_clear();
        }
    }
}
