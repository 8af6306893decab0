//! Time passing: pending vMotions time out, and VMs idle (no connection,
//! no console) for `--vm-expire-time` are forgotten and their ports
//! returned. The sweep task reads the clock and passes `now` in.

use super::*;

impl Hub {
    /// Expire idle VMs and stale vMotions. Run periodically.
    pub fn sweep(&self, now: Instant) {
        self.expire_vmotions(now);
        self.expire_vms(now);
    }

    /// Drop the vMotions pending longer than `--vmotion-timeout`: held
    /// console input goes to the source, a bound destination is closed.
    pub(super) fn expire_vmotions(&self, now: Instant) {
        let stale: Vec<(Vec<u8>, Pending)> = {
            let mut table = self.vmotions();
            let keys: Vec<Vec<u8>> = table
                .iter()
                .filter(|(_, p)| now.duration_since(p.started) >= self.cfg.vmotion_timeout)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| table.remove(&k).map(|p| (k, p)))
                .collect()
        };
        for (cookie, p) in stale {
            if let Some(c) = self.cluster.get() {
                c.vmotion_ended(&p.vm.uuid, &p.seq);
            }
            let mut st = p.vm.lock();
            if st.vmotion.as_deref() == Some(&cookie[..]) {
                st.vmotion = None;
                flush_held(&mut st);
                self.metrics.vmotion(Vmotion::Timeout);
                if st.active.is_none() && st.consoles.is_empty() {
                    st.idle_since = Some(now);
                }
                tracing::warn!(vm = %st.name, source = p.source, "pending vMotion timed out; dropped it");
            }
            if let Some(d) = p.dest {
                d.outbox.close(None);
            }
        }
    }

    /// Forget the VMs idle (no connection, no console, no vMotion) longer
    /// than `--vm-expire-time`, and return their ports to the pool.
    pub(super) fn expire_vms(&self, now: Instant) {
        let mut expired = Vec::new();
        {
            let mut reg = self.reg();
            let mut gone_keys = Vec::new();
            for (key, vm) in reg.vms.iter() {
                let mut st = vm.lock();
                if let Some(since) = st.idle_since {
                    if now.duration_since(since) >= self.cfg.expire {
                        st.gone = true;
                        st.listener = None;
                        gone_keys.push(key.clone());
                    }
                }
            }
            for key in gone_keys {
                if let Some(vm) = reg.vms.remove(&key) {
                    // Still under the registry lock: see `totals`.
                    let m = &self.metrics;
                    m.retired_out
                        .fetch_add(vm.bytes_from_vm(), Ordering::Relaxed);
                    m.retired_in.fetch_add(vm.bytes_to_vm(), Ordering::Relaxed);
                    if let Some(port) = vm.port {
                        reg.ports.remove(&port);
                    }
                    expired.push(vm);
                }
            }
        }
        for vm in expired {
            let rec = vm.record();
            tracing::info!(vm = %rec.name, port = ?rec.port, "VM mapping expired; port returned to the pool");
            if let Some(c) = self.cluster.get() {
                c.expired(&rec.uuid);
            }
            self.backend.vm_expired(rec);
        }
    }
}
