//! Consoles joining and leaving a VM, under vSPC.py's lock rules
//! (exclusive, write, free-for-all, free-for-all-or-read-only), and admins
//! clearing them.

use super::*;

impl Hub {
    /// Attach a console to `vm` with the lock it asks for, unless the VM is
    /// full or gone or the lock cannot be had. Returns what was granted.
    pub fn attach_console(
        &self,
        vm: &Vm,
        peer: Attached,
        mode: LockMode,
        replay: Replay<'_>,
    ) -> Result<(Access, Vec<u8>), AttachError> {
        let mut st = vm.lock();
        let name = st.name.clone();
        if st.gone {
            return Err(AttachError::Gone { name });
        }
        if let Some(limit) = self.cfg.client_limit {
            if st.consoles.len() >= limit {
                return Err(AttachError::Full { name, limit });
            }
        }
        let held = |a: Access| st.consoles.iter().any(|c| c.access == a);
        let fail = |why| {
            Err(AttachError::LockFailed {
                name: name.clone(),
                why,
            })
        };
        if held(Access::Exclusive) && !matches!(mode, LockMode::Keep(_)) {
            return fail("someone holds an exclusive lock on it");
        }
        let access = match mode {
            LockMode::Keep(access) => access,
            LockMode::Exclusive if !st.consoles.is_empty() => {
                return fail("an exclusive lock needs no other console attached")
            }
            LockMode::Exclusive => Access::Exclusive,
            LockMode::Write if st.consoles.iter().any(|c| c.access.writes()) => {
                return fail("someone else may write to it (a write lock needs no other writer)")
            }
            LockMode::Write => Access::Write,
            LockMode::FreeForAll if held(Access::Write) => {
                return fail("someone holds a write lock on it")
            }
            LockMode::FreeForAll => Access::FreeForAll,
            LockMode::FreeForAllOrReadOnly if held(Access::Write) => Access::ReadOnly,
            LockMode::FreeForAllOrReadOnly => Access::FreeForAll,
            LockMode::ReadOnly => Access::ReadOnly,
        };
        // The ring is read under the lock the fan-out takes, so what it
        // holds is history and everything after it is live.
        let past = |fallback: &[u8]| match st.replay.as_deref() {
            Some(ring) if !ring.is_empty() => ring.replay(),
            _ => fallback.to_vec(),
        };
        let returned = match replay {
            Replay::None => Vec::new(),
            Replay::Follow(pos) => {
                let from = match pos {
                    Some(p) if p.origin == st.origin => p.said,
                    _ => st.base,
                };
                let (missed, lost) = replay::since(st.replay.as_deref(), st.said, from);
                if lost > 0 {
                    tracing::warn!(vm = %name, lost, "a console following its VM here lost output the replay ring no longer held (--replay-bytes)");
                }
                if !missed.is_empty() {
                    peer.outbox.push_always(Bytes::from(missed));
                }
                Vec::new()
            }
            Replay::Return(fallback) => past(fallback),
            Replay::Show(fallback) => {
                let mut shown = past(fallback);
                if !shown.is_empty() {
                    shown.extend_from_slice(replay::MARKER);
                    peer.outbox.push_always(Bytes::from(shown));
                }
                Vec::new()
            }
        };
        peer.outbox.pace_with(vm.pace.clone());
        // It may come with output queued already (recent output).
        st.room = false;
        st.consoles.push(Console { peer, access });
        st.idle_since = None;
        drop(st);
        // An empty console is the fastest one: output held back may flow.
        vm.pace.notify_waiters();
        self.backend.console_attached(vm.record());
        Ok((access, returned))
    }

    /// Disconnect every console of `vm` (vSPC.py's "port clear"), telling
    /// each why. Returns how many there were.
    pub fn clear_consoles(&self, vm: &Vm, msg: &[u8], now: Instant) -> usize {
        let mut st = vm.lock();
        let gone: Vec<Console> = std::mem::take(&mut st.consoles);
        if st.active.is_none() && st.vmotion.is_none() {
            st.idle_since.get_or_insert(now);
        }
        let name = st.name.clone();
        drop(st);
        for c in &gone {
            c.peer.outbox.close(Some(Bytes::copy_from_slice(msg)));
            self.metrics.disconnect(Disconnect::Cleared);
            self.backend.console_detached(vm.record());
        }
        tracing::info!(vm = %name, consoles = gone.len(), "consoles cleared");
        gone.len()
    }

    /// A console of `vm` went away.
    pub fn detach_console(&self, vm: &Vm, conn: ConnId, now: Instant) {
        self.detach_console_for(vm, conn, Disconnect::Closed, now);
    }

    /// A console of `vm` went away, for `reason` (as the metrics count it;
    /// a console already cleared is not counted again).
    pub fn detach_console_for(&self, vm: &Vm, conn: ConnId, reason: Disconnect, now: Instant) {
        let mut st = vm.lock();
        let before = st.consoles.len();
        st.consoles.retain(|c| c.peer.id != conn);
        let removed = st.consoles.len() != before;
        if st.consoles.is_empty() && st.active.is_none() && st.vmotion.is_none() {
            st.idle_since.get_or_insert(now);
        }
        drop(st);
        if removed {
            self.metrics.disconnect(reason);
            self.backend.console_detached(vm.record());
        }
    }
}
