//! SIGTERM and SIGINT during pretraining: a graceful stop instead of a lost interval.
//!
//! While a [`StopGuard`] is armed, the first SIGTERM (a scheduler's preemption: SLURM
//! sends SIGTERM, then SIGKILL after its grace period; torchrun forwards it to every
//! rank) or SIGINT (Ctrl-C) asks the run to stop after the step in progress, with a
//! checkpoint, so that `--resume auto` loses nothing. A second Ctrl-C ends the process
//! at once (status 130); repeated SIGTERMs do not (schedulers and torchrun may both
//! send one). Outside an armed guard both signals keep their default action.
//!
//! Under torchrun the ranks agree on the stop through the step's metric all-reduce
//! ([`super::trainer::Trainer::stop_vote`]), so every rank stops at the same step and
//! saves one consistent checkpoint, even when only one rank was signalled.
//!
//! The handlers (through `signal-hook`: they only set atomics) are installed once per
//! process, on first use.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{Result, anyhow};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;

struct Handlers {
    /// True while no guard is armed: the signals take their default action.
    passthrough: Arc<AtomicBool>,
    /// A stop was asked for since the guard was armed (arms the second-Ctrl-C exit).
    requested: Arc<AtomicBool>,
    /// The last signal number received while armed (0: none).
    received: Arc<AtomicUsize>,
    /// Guards alive.
    armed: AtomicUsize,
}

fn install() -> std::io::Result<Handlers> {
    let h = Handlers {
        passthrough: Arc::new(AtomicBool::new(true)),
        requested: Arc::new(AtomicBool::new(false)),
        received: Arc::new(AtomicUsize::new(0)),
        armed: AtomicUsize::new(0),
    };
    // Actions run in registration order: the default action (when not armed) and the
    // second-Ctrl-C exit are decided before this signal sets the flags.
    for sig in [SIGTERM, SIGINT] {
        flag::register_conditional_default(sig, Arc::clone(&h.passthrough))?;
        if sig == SIGINT {
            flag::register_conditional_shutdown(sig, 128 + SIGINT, Arc::clone(&h.requested))?;
        }
        flag::register(sig, Arc::clone(&h.requested))?;
        flag::register_usize(sig, Arc::clone(&h.received), sig as usize)?;
    }
    Ok(h)
}

static HANDLERS: OnceLock<std::result::Result<Handlers, String>> = OnceLock::new();

fn handlers() -> Result<&'static Handlers> {
    HANDLERS
        .get_or_init(|| install().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| anyhow!("installing the SIGTERM / SIGINT handlers: {e}"))
}

/// While alive, SIGTERM and SIGINT ask for a stop ([`StopGuard::received`]) instead of
/// ending the process.
pub struct StopGuard {
    h: &'static Handlers,
}

impl StopGuard {
    /// Arms the handlers (installing them on first use); a signal that arrived before
    /// is forgotten.
    pub fn arm() -> Result<StopGuard> {
        let h = handlers()?;
        if h.armed.fetch_add(1, Ordering::SeqCst) == 0 {
            h.requested.store(false, Ordering::SeqCst);
            h.received.store(0, Ordering::SeqCst);
        }
        h.passthrough.store(false, Ordering::SeqCst);
        Ok(StopGuard { h })
    }

    /// The signal received since arming ("SIGTERM" or "SIGINT"), if any.
    pub fn received(&self) -> Option<&'static str> {
        name(self.h.received.load(Ordering::SeqCst))
    }
}

/// Whether a stop was asked for while a guard is armed: [`StopGuard::received`]
/// without the guard, for a loop that polls at its own moment (the trainer, just
/// before the step's sync, so a signal during a step stops after that step).
pub fn stop_requested() -> bool {
    matches!(HANDLERS.get(), Some(Ok(h))
        if h.armed.load(Ordering::SeqCst) > 0 && h.received.load(Ordering::SeqCst) != 0)
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        if self.h.armed.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.h.passthrough.store(true, Ordering::SeqCst);
        }
    }
}

fn name(sig: usize) -> Option<&'static str> {
    match sig as i32 {
        0 => None,
        SIGINT => Some("SIGINT"),
        _ => Some("SIGTERM"),
    }
}

/// The exit status of a process stopped by `signal` (128 + its number, the shell's
/// convention for a process the signal ended): 130 for SIGINT, 143 otherwise.
pub fn exit_status(signal: &str) -> i32 {
    128 + if signal.starts_with("SIGINT") {
        SIGINT
    } else {
        SIGTERM
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_statuses() {
        assert_eq!(name(0), None);
        assert_eq!(name(SIGINT as usize), Some("SIGINT"));
        assert_eq!(name(SIGTERM as usize), Some("SIGTERM"));
        assert_eq!(exit_status("SIGINT"), 130);
        assert_eq!(exit_status("SIGTERM"), 143);
        assert_eq!(exit_status("SIGTERM (on another rank)"), 143);
    }
}
