//! Ctrl-C, SIGTERM and SIGHUP (what Slurm and Kubernetes send before they preempt a job).
//!
//! A training loop (`lm_train`) holds a [`Graceful`] guard: a signal then asks it to checkpoint
//! after the current step and return, and a second signal quits at once. Anywhere else (sampling,
//! scoring, PPO's rollouts) there is no checkpoint to save, so the process stops at once, as it
//! would without a handler, rather than running the stage to its end. Either way a recipe does not
//! mark the step done ([`ever`]); a rerun continues pretraining and SFT from their checkpoint and
//! redoes any other step.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Set by a signal, consumed by the training loop that stops on it.
static REQUESTED: AtomicBool = AtomicBool::new(false);
/// Set with [`REQUESTED`] and never cleared: the loop consumes its flag when it stops, and a
/// caller running several stages (a recipe) must still learn that this one stopped early.
static EVER: AtomicBool = AtomicBool::new(false);
/// Training loops running now (data-parallel ranks may be threads of one process).
static GRACEFUL: AtomicUsize = AtomicUsize::new(0);
/// The recipe step running now, for the message.
static STEP: Mutex<Option<String>> = Mutex::new(None);

/// Installs the handler once per process.
pub fn install() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            EVER.store(true, Ordering::SeqCst);
            let during = match STEP.lock().ok().and_then(|s| s.clone()) {
                Some(s) => format!(" during recipe step {s}"),
                None => String::new(),
            };
            if REQUESTED.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted again{during}: quitting now");
                std::process::exit(130);
            }
            if GRACEFUL.load(Ordering::SeqCst) == 0 {
                let rerun = if during.is_empty() {
                    ""
                } else {
                    "; the step is not marked done: run the recipe again to do it again and go on"
                };
                eprintln!(
                    "\ninterrupted{during} (Ctrl-C or SIGTERM): nothing to checkpoint here, \
                     stopping now{rerun}"
                );
                std::process::exit(130);
            }
            eprintln!(
                "\ninterrupted{during} (Ctrl-C or SIGTERM): saving a checkpoint after this step \
                 (interrupt again to quit now)"
            );
        });
    });
}

/// Whether a signal arrived since the process started.
pub fn ever() -> bool {
    EVER.load(Ordering::SeqCst)
}

/// Takes the pending request, if any (the training loop stopping on it).
pub fn take() -> bool {
    REQUESTED.swap(false, Ordering::SeqCst)
}

/// Names the recipe step running now (`None` between steps) for the handler's message.
pub fn set_step(name: Option<&str>) {
    if let Ok(mut s) = STEP.lock() {
        *s = name.map(str::to_string);
    }
}

/// While alive, a signal asks the holder to checkpoint and stop instead of quitting at once.
pub struct Graceful(());

impl Graceful {
    pub fn enter() -> Graceful {
        GRACEFUL.fetch_add(1, Ordering::SeqCst);
        Graceful(())
    }
}

impl Drop for Graceful {
    fn drop(&mut self) {
        GRACEFUL.fetch_sub(1, Ordering::SeqCst);
    }
}
