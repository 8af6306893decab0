//! The registry's Lua scripts (in `lua/`), each with the shared prelude
//! before it. Run by EVALSHA, with the source sent again when Redis does
//! not know them (after a restart).

use redis::Script;

const PRELUDE: &str = include_str!("lua/prelude.lua");

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// One of each, loaded once per registry.
pub(super) struct Scripts {
    pub register: Script,
    pub heartbeat: Script,
    pub claim: Script,
    pub cas: Script,
    pub orphans: Script,
    pub reassert: Script,
    pub ticket: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            register: script(include_str!("lua/register.lua")),
            heartbeat: script(include_str!("lua/heartbeat.lua")),
            claim: script(include_str!("lua/claim.lua")),
            cas: script(include_str!("lua/cas.lua")),
            orphans: script(include_str!("lua/orphans.lua")),
            reassert: script(include_str!("lua/reassert.lua")),
            ticket: script(include_str!("lua/ticket.lua")),
        }
    }
}
