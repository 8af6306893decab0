//! vMotion: BEGIN answered with a cookie (the sequence and a secret), the
//! destination's PEER matched to it, COMPLETE moving the VM and the input
//! held meanwhile, ABORT and timeouts keeping the source.

use super::*;

impl Hub {
    /// VMOTION-BEGIN on the VM's connection `conn`.
    pub fn vmotion_begin(&self, vm: &Arc<Vm>, conn: ConnId, seq: &[u8], now: Instant) -> Begin {
        let answer = self.vmotion_answer(vm, conn, seq, now);
        match &answer {
            // From the moment BEGIN was read to now, when GOAHEAD is queued.
            Begin::GoAhead(_) => self.metrics.goahead.observe(now.elapsed()),
            Begin::NotNow(_) => self.metrics.vmotion(Vmotion::NotNow),
        }
        answer
    }

    pub(super) fn vmotion_answer(
        &self,
        vm: &Arc<Vm>,
        conn: ConnId,
        seq: &[u8],
        started: Instant,
    ) -> Begin {
        let mut st = vm.lock();
        let Some(active) = st.active.clone().filter(|p| p.id == conn) else {
            return Begin::NotNow("the connection does not carry the VM");
        };
        if st.vmotion.is_some() {
            return Begin::NotNow("another vMotion of this port is pending");
        }
        let mut secret = [0u8; SECRET_LEN];
        if let Err(e) = getrandom::fill(&mut secret) {
            tracing::error!(error = %e, "no random bytes for a vMotion secret");
            return Begin::NotNow("no random bytes for a secret");
        }
        let mut cookie = seq.to_vec();
        cookie.extend_from_slice(&secret);
        // Input not yet written to the source waits for the winner.
        let backlog = active.outbox.take_data();
        st.held_bytes += backlog.iter().map(|b| b.len()).sum::<usize>();
        st.held.splice(0..0, backlog);
        st.vmotion = Some(cookie.clone());
        self.vmotions().insert(
            cookie.clone(),
            Pending {
                vm: vm.clone(),
                seq: seq.to_vec(),
                source: conn,
                dest: None,
                started,
            },
        );
        Begin::GoAhead(cookie)
    }

    /// VMOTION-PEER on a new connection: the VM and sequence if the cookie
    /// is pending.
    pub fn vmotion_peer(&self, cookie: &[u8], dest: Attached) -> Option<(Arc<Vm>, Vec<u8>)> {
        let mut table = self.vmotions();
        let Some(p) = table.get_mut(cookie) else {
            drop(table);
            self.metrics.vmotion(Vmotion::RefusedPeer);
            return None;
        };
        if let Some(old) = p.dest.replace(dest) {
            tracing::warn!("a second destination for one vMotion; dropping the first");
            old.outbox.close(None);
        }
        Some((p.vm.clone(), p.seq.clone()))
    }

    /// VMOTION-COMPLETE on the destination `dest`: it becomes the VM's
    /// connection, held input goes to it, and the source is closed.
    pub fn vmotion_complete(&self, vm: &Vm, cookie: &[u8], seq: &[u8], dest: &Attached) -> bool {
        let addr = self.addr_of(dest.id);
        let mut st = vm.lock();
        if st.vmotion.as_deref() != Some(cookie) {
            return false;
        }
        let started = {
            let mut table = self.vmotions();
            let started = match table.get(cookie) {
                Some(p) if p.seq == seq && p.dest.as_ref().map(|d| d.id) == Some(dest.id) => {
                    p.started
                }
                _ => return false,
            };
            table.remove(cookie);
            started
        };
        self.metrics.vmotion(Vmotion::Complete);
        self.metrics.complete.observe(started.elapsed());
        if let Some(c) = self.cluster.get() {
            c.vmotion_ended(&vm.uuid, seq);
        }
        st.vmotion = None;
        let old = st.active.replace(dest.clone());
        st.connected_since.get_or_insert_with(SystemTime::now);
        st.peer_addr = addr;
        st.idle_since = None;
        for chunk in st.held.drain(..) {
            dest.outbox.push_always(chunk);
        }
        st.held_bytes = 0;
        let name = st.name.clone();
        drop(st);
        if let Some(old) = old {
            old.outbox.close(None);
        }
        tracing::info!(vm = %name, "vMotion complete; the destination now carries the VM");
        true
    }

    /// VMOTION-ABORT on connection `conn`: the source keeps the VM.
    pub fn vmotion_abort(&self, vm: &Vm, conn: ConnId) -> bool {
        let mut st = vm.lock();
        if st.active.as_ref().map(|p| p.id) != Some(conn) {
            return false;
        }
        let Some(cookie) = st.vmotion.take() else {
            return false;
        };
        if let Some(p) = self.vmotions().remove(&cookie) {
            if let Some(c) = self.cluster.get() {
                c.vmotion_ended(&vm.uuid, &p.seq);
            }
            if let Some(d) = p.dest {
                d.outbox.close(None);
            }
        }
        flush_held(&mut st);
        self.metrics.vmotion(Vmotion::Abort);
        tracing::info!(vm = %st.name, "vMotion aborted; the source keeps the VM");
        true
    }

    /// A destination connection closed before COMPLETE.
    pub fn vmotion_dest_closed(&self, cookie: &[u8], conn: ConnId) {
        if let Some(p) = self.vmotions().get_mut(cookie) {
            if p.dest.as_ref().map(|d| d.id) == Some(conn) {
                p.dest = None;
            }
        }
    }
}
