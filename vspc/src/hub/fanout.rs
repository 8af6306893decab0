//! Fan-out: a VM's output to every console and backend, paced by its
//! fastest reader (the rule is in the hub's module doc), the VM's backlog,
//! and console input to the VM.

use super::*;

impl Hub {
    /// Serial output from the VM on connection `conn` (one call per read):
    /// to every console and the backends, as far as they have room (see
    /// [`Hub::deliver`]); the rest waits in the VM's backlog, in order.
    pub fn vm_output(&self, vm: &Vm, conn: ConnId, data: Bytes) -> Fanout {
        let mut st = vm.lock();
        if st.active.as_ref().map(|p| p.id) != Some(conn) {
            return Fanout::Retired;
        }
        vm.bytes_out.fetch_add(data.len() as u64, Ordering::Relaxed);
        let mut data = data;
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(PIECE));
            st.backlog.push_back(piece);
        }
        match self.deliver(vm, &mut st) {
            None => Fanout::Sent,
            Some(_) => Fanout::Held,
        }
    }

    /// Hand the backlog's pieces, oldest first, to every console and
    /// backend while there is room ([`consoles_have_room`]): while no
    /// lossless backend is over its budget, no console still being told
    /// apart has more than its high-water mark queued, the fastest decided
    /// console (the one with the least queued) has at most its high-water
    /// mark queued, and no full console is still owed a wait. A slower
    /// console's queue fills meanwhile, and once it is known to be behind
    /// it skips the oldest output and is told; a VM whose consoles all lag
    /// waits for them. Returns what still holds the rest back, if anything
    /// is left.
    pub(super) fn deliver(&self, vm: &Vm, st: &mut VmState) -> Option<Blocker> {
        let had = vm.held();
        // A few pieces at most (about VM_HOLD / PIECE).
        let mut left: usize = st.backlog.iter().map(Bytes::len).sum();
        let blocker = loop {
            let Some(next) = st.backlog.front().map(Bytes::len) else {
                break None;
            };
            if let Some(w) = self.backend.over_budget() {
                break Some(Blocker::Backend(w));
            }
            if !st.room {
                match consoles_have_room(&st.consoles, next) {
                    Room::Yes => {}
                    Room::No => break Some(Blocker::Consoles(Vec::new())),
                    Room::Laggers(l) => break Some(Blocker::Consoles(l)),
                }
            }
            let Some(piece) = st.backlog.pop_front() else {
                break None;
            };
            left -= piece.len();
            // Whether the next piece will certainly fit, from what each
            // push says is queued now.
            let mut all_fit = true;
            let mut fastest_fits = false;
            let mut decided = false;
            for c in &st.consoles {
                let o = &c.peer.outbox;
                let Some(q) = o.push(piece.clone()) else {
                    continue;
                };
                let high = o.high_water();
                if o.encoding() == Encoding::Hold {
                    all_fit &= q <= high;
                } else {
                    decided = true;
                    fastest_fits |= q <= high;
                }
                all_fit &= q + PIECE <= o.limit();
            }
            st.room = all_fit && (fastest_fits || !decided);
            st.said += piece.len() as u64;
            let cap = self.cfg.replay_bytes;
            if cap > 0 {
                st.replay
                    .get_or_insert_with(Default::default)
                    .push(&piece, cap);
            }
            if self.backend.wants_data() {
                self.backend.console_data(&st.rec, piece);
            }
        };
        vm.held.store(left, Ordering::SeqCst);
        if left < had {
            // Another task may be waiting for the backlog to shrink.
            vm.pace.notify_waiters();
        }
        blocker
    }

    /// Deliver `vm`'s backlog as its consoles and backends make room; ready
    /// when the backlog is empty. Any number of tasks may drive this for
    /// the same VM at once (an old and a new connection, a vMotion's source
    /// and destination): whichever is woken first delivers, under the VM's
    /// lock, in order. Every wait here has its wake-up: a console's outbox
    /// tells `vm.pace` when it drains to its high-water mark, is decided or
    /// closes; attaching a console tells it; a lossless backend's level
    /// wakes its waiters when it drains.
    pub fn pace(self: &Arc<Self>, vm: &Arc<Vm>) -> WaitFuture {
        let (hub, vm) = (self.clone(), vm.clone());
        Box::pin(async move {
            let pace = vm.pace.clone();
            loop {
                let notified = pace.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let blocker = {
                    let mut st = vm.lock();
                    hub.deliver(&vm, &mut st)
                };
                match blocker {
                    None => return,
                    // Another task may deliver meanwhile: look again then.
                    Some(Blocker::Backend(w)) => tokio::select! {
                        _ = w => {}
                        _ = notified => {}
                    },
                    Some(Blocker::Consoles(laggers)) if laggers.is_empty() => notified.await,
                    Some(Blocker::Consoles(laggers)) => {
                        let now = tokio::time::Instant::now();
                        let due = laggers
                            .iter()
                            .map(|l| {
                                tokio::time::Instant::from_std(l.lagging_since(now.into_std()))
                                    + PATIENCE
                            })
                            .min()
                            .unwrap_or(now);
                        tokio::select! {
                            _ = notified => {}
                            _ = tokio::time::sleep_until(due) => {
                                let now = tokio::time::Instant::now().into_std();
                                for l in &laggers {
                                    if l.lagging_since(now) + PATIENCE <= now {
                                        tracing::debug!(
                                            vm = %vm.name(),
                                            "a console held the VM back for the patience time; the VM goes on without it"
                                        );
                                        l.set_behind();
                                    }
                                }
                            }
                        }
                    }
                }
            }
        })
    }

    /// A [`Hub::pace`] for `vm` if output waits in its backlog (for a
    /// connection that now carries the VM and must see it delivered).
    pub fn pace_if_held(self: &Arc<Self>, vm: &Arc<Vm>) -> Option<WaitFuture> {
        (vm.held() > 0).then(|| self.pace(vm))
    }

    /// Console input for the VM. Returns the outbox it was queued on, so the
    /// console can wait for room; `None` if it was held (vMotion) or dropped
    /// (no VM connection).
    pub fn console_input(&self, vm: &Vm, data: &[u8]) -> Option<Arc<Outbox>> {
        let escaped = Bytes::copy_from_slice(data);
        let mut st = vm.lock();
        if st.vmotion.is_some() {
            if st.held_bytes + escaped.len() > HELD_LIMIT {
                tracing::warn!(vm = %st.name, "console input held during vMotion exceeds 1 MiB; dropping");
                return None;
            }
            vm.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
            st.held_bytes += escaped.len();
            st.held.push(escaped);
            return None;
        }
        let active = st.active.as_ref()?;
        vm.bytes_in.fetch_add(data.len() as u64, Ordering::Relaxed);
        active.outbox.push_always(escaped);
        Some(active.outbox.clone())
    }
}

/// What keeps a VM's backlog from its consoles.
pub enum Blocker {
    /// The fastest console (or one still being told apart) is full; or,
    /// with these in it, consoles are full and their clients behind: the
    /// VM waits [`PATIENCE`] for them at most.
    Consoles(Vec<Arc<Outbox>>),
    /// A lossless backend is over its budget: this completes when it is
    /// back under.
    Backend(WaitFuture),
}

/// Whether the consoles can take another piece of output (of `piece`
/// bytes): no console still being told apart is past its high-water mark;
/// the fastest decided console (the one with the least queued) is not past
/// its own; and no console whose queue is full would have output skipped
/// before it is known to be behind. A full console is waited for if its
/// socket takes more (it is behind only because the daemon has not written
/// to it yet); if its client is behind, it is a lagger, waited for at most
/// [`PATIENCE`] without catching up (the pacer keeps that time), and then
/// it skips the oldest output and is told, and is not waited for again
/// until it has caught up to its high-water mark.
pub(super) fn consoles_have_room(consoles: &[Console], piece: usize) -> Room {
    let mut fastest: Option<usize> = None;
    let mut room = true;
    let mut laggers = Vec::new();
    for c in consoles {
        let o = &c.peer.outbox;
        let lvl = o.level();
        if lvl.closed {
            continue;
        }
        let past = lvl.queued > o.high_water();
        if lvl.undecided {
            if past {
                return Room::No;
            }
            continue;
        }
        if lvl.queued + piece > o.limit() && !lvl.behind {
            if !o.client_behind() {
                return Room::No;
            }
            laggers.push(o.clone());
        }
        if fastest.is_none_or(|f| lvl.queued < f) {
            fastest = Some(lvl.queued);
            room = !past;
        }
    }
    match (room, laggers.is_empty()) {
        (false, _) => Room::No,
        (true, true) => Room::Yes,
        (true, false) => Room::Laggers(laggers),
    }
}

/// Whether the consoles can take another piece.
pub(super) enum Room {
    Yes,
    /// The fastest console, one still being told apart, or one the daemon
    /// has not written to yet, is full.
    No,
    /// Only these hold the VM back: full, their clients behind, not yet
    /// behind for [`PATIENCE`].
    Laggers(Vec<Arc<Outbox>>),
}

/// Send held console input to the VM's connection, or drop it if none.
pub(super) fn flush_held(st: &mut VmState) {
    let held = std::mem::take(&mut st.held);
    st.held_bytes = 0;
    if let Some(active) = &st.active {
        for chunk in held {
            active.outbox.push_always(chunk);
        }
    } else if !held.is_empty() {
        tracing::info!(vm = %st.name, "dropping console input held for a VM that is not connected");
    }
}
