//! The escape menu: Ctrl-] on a terminal leaves the console for a `vspc>`
//! prompt, read in cooked mode, that continues, sends a Ctrl-] to the VM,
//! or quits. Input typed past the command line is kept for the console.

use tokio::sync::mpsc;

use crate::output::{write_stdout, Failure};
use crate::signals::Signals;
use crate::terminal::Terminal;

/// Ctrl-]: opens the command menu (terminal sessions only).
pub(crate) const ESCAPE: u8 = 0x1d;

/// What the escape menu decided.
pub(crate) enum Choice {
    Continue,
    SendEscape,
    Quit,
    Signal(u8, &'static str),
}

/// The prompt's state between two visits: input read past the end of the
/// command line.
#[derive(Default)]
pub(crate) struct Menu {
    buf: Vec<u8>,
}

impl Menu {
    /// The escape prompt, in cooked mode; back in raw mode unless quitting.
    pub(crate) async fn prompt(
        &mut self,
        term: &mut Terminal,
        stdin: &mut mpsc::Receiver<Vec<u8>>,
        signals: &mut Signals,
    ) -> Result<Choice, Failure> {
        term.cooked_for_prompt().await;
        loop {
            write_stdout(b"\r\nvspc> ")?;
            let Some(line) = self.line(stdin, signals).await else {
                write_stdout(b"\r\n")?;
                return Ok(Choice::Quit);
            };
            let line = match line {
                Ok(line) => line,
                Err((n, what)) => return Ok(Choice::Signal(n, what)),
            };
            let choice = match line.trim() {
                "quit" | "q" => return Ok(Choice::Quit),
                "continue" | "c" | "" => Choice::Continue,
                "print-escape" => Choice::SendEscape,
                _ => {
                    write_stdout(
                        b"commands:\r\n  continue (c, or an empty line)  back to the console\r\n  \
                          print-escape                    send Ctrl-] to the VM\r\n  \
                          quit (q)                        leave\r\n",
                    )?;
                    continue;
                }
            };
            term.raw()?;
            return Ok(choice);
        }
    }

    /// What was typed after the command line, for the console.
    pub(crate) fn take_typed_ahead(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// One command line from stdin: `None` at end of input, the signal if
    /// one came first.
    async fn line(
        &mut self,
        stdin: &mut mpsc::Receiver<Vec<u8>>,
        signals: &mut Signals,
    ) -> Option<Result<String, (u8, &'static str)>> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n' || b == b'\r') {
                let mut line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.last() == Some(&b'\r') && self.buf.first() == Some(&b'\n') {
                    self.buf.remove(0);
                }
                line.pop();
                return Some(Ok(String::from_utf8_lossy(&line).into_owned()));
            }
            tokio::select! {
                sig = signals.recv() => return Some(Err(sig)),
                chunk = stdin.recv() => match chunk {
                    Some(chunk) => self.buf.extend_from_slice(&chunk),
                    None => return None,
                },
            }
        }
    }
}
