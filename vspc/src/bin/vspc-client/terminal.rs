//! Stdin's terminal settings: saved at start, raw mode during a console
//! session, cooked again for the escape prompt, and restored on every way
//! out (explicitly, by a `Drop` guard, and by a panic hook). Also the
//! [`ReadState`] it shares with the stdin reader thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::termios::{self, OptionalActions, SpecialCodeIndex, Termios};

use crate::output::{failure, Failure, EXIT_ERROR};

/// Longest wait for the stdin reader to switch to cooked reads before the
/// escape prompt is shown anyway (it needs at most VTIME, 0.1 s).
const PROMPT_WAIT: Duration = Duration::from_millis(300);

/// Stdin's terminal settings: saved at start, raw during the session,
/// restored on drop.
///
/// Raw mode uses VMIN=0, VTIME=1: a read returns what is there, or nothing
/// after 0.1 s. A read keeps the rules of the mode it started in, so a read
/// begun in raw mode would swallow the end-of-file key (Ctrl-D) typed at the
/// escape prompt. With VTIME the reader thread starts a fresh read within
/// 0.1 s, and the prompt is shown once it has (see [`ReadState`]).
pub(crate) struct Terminal {
    saved: Option<Termios>,
    shared: Arc<ReadState>,
}

/// What the terminal and the stdin reader thread share.
#[derive(Default)]
pub(crate) struct ReadState {
    /// Raw mode is on (set before entering it, cleared after leaving it), so
    /// an empty read may be the VTIME timeout rather than end of input.
    pub(crate) raw: AtomicBool,
    /// The reader has started a read in cooked mode.
    pub(crate) cooked_read: AtomicBool,
}

impl Terminal {
    /// Look at stdin; save its settings if it is a terminal. Installs a panic
    /// hook that puts them back before the panic message is printed.
    pub(crate) fn new() -> Terminal {
        let stdin = std::io::stdin();
        let saved = if termios::isatty(&stdin) {
            termios::tcgetattr(&stdin).ok()
        } else {
            None
        };
        if let Some(saved) = saved.clone() {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &saved);
                previous(info);
            }));
        }
        Terminal {
            saved,
            shared: Arc::default(),
        }
    }

    pub(crate) fn is_tty(&self) -> bool {
        self.saved.is_some()
    }

    /// Raw mode: no echo, no line editing, no signal keys, no CR/NL
    /// translation, 8-bit characters, reads return what has been typed.
    pub(crate) fn raw(&mut self) -> Result<(), Failure> {
        self.try_raw().map_err(|e| {
            failure(
                EXIT_ERROR,
                format!("cannot set the terminal to raw mode: {e}"),
            )
        })
    }

    fn try_raw(&mut self) -> std::io::Result<()> {
        let Some(saved) = &self.saved else {
            return Ok(());
        };
        let mut t = saved.clone();
        t.make_raw();
        t.special_codes[SpecialCodeIndex::VMIN] = 0;
        t.special_codes[SpecialCodeIndex::VTIME] = 1;
        self.shared.raw.store(true, Ordering::SeqCst);
        if let Err(e) = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, &t) {
            self.shared.raw.store(false, Ordering::SeqCst);
            return Err(e.into());
        }
        Ok(())
    }

    /// Back to the saved settings (if they were changed).
    pub(crate) fn restore(&mut self) {
        if let (true, Some(saved)) = (self.shared.raw.load(Ordering::SeqCst), &self.saved) {
            let _ = termios::tcsetattr(std::io::stdin(), OptionalActions::Now, saved);
            self.shared.raw.store(false, Ordering::SeqCst);
        }
    }

    /// Back to the saved settings for a prompt, and wait (briefly) until
    /// the reader thread reads in cooked mode, so the prompt's answer,
    /// Ctrl-D included, is read with cooked rules.
    pub(crate) async fn cooked_for_prompt(&mut self) {
        if !self.shared.raw.load(Ordering::SeqCst) {
            return;
        }
        self.shared.cooked_read.store(false, Ordering::SeqCst);
        self.restore();
        let deadline = Instant::now() + PROMPT_WAIT;
        while !self.shared.cooked_read.load(Ordering::SeqCst) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What the stdin reader thread needs to know.
    pub(crate) fn shared(&self) -> Arc<ReadState> {
        self.shared.clone()
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.restore();
    }
}
