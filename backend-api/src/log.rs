//! Logging for backends. A plugin has its own copy of std and of any
//! logging crate, with no subscriber, so the daemon hands every backend a
//! callback instead; these functions go through it. Before a callback is
//! installed they write to standard error.

use crate::ffi::Logger;
use std::sync::OnceLock;

/// Severity, as the daemon maps it to its log levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Level {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Level {
    pub fn from_u8(v: u8) -> Level {
        match v {
            1 => Level::Error,
            2 => Level::Warn,
            3 => Level::Info,
            _ => Level::Debug,
        }
    }
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

/// Install the daemon's callback for this copy of the API (first one wins).
pub fn install(logger: Logger) {
    let _ = LOGGER.set(logger);
}

/// Log `msg` at `level`.
pub fn log(level: Level, msg: &str) {
    match LOGGER.get() {
        Some(l) => (l.log)(level as u8, msg.into()),
        None => eprintln!("vspc backend {level:?}: {msg}"),
    }
}

pub fn error(msg: &str) {
    log(Level::Error, msg);
}
pub fn warn(msg: &str) {
    log(Level::Warn, msg);
}
pub fn info(msg: &str) {
    log(Level::Info, msg);
}
pub fn debug(msg: &str) {
    log(Level::Debug, msg);
}
