//! One thread accepts on every console port.
//!
//! A VM's console listener is idle nearly all its life. As a task of its own
//! it held a task (about 0.5 KB) and a runtime registration (0.25 KB) per
//! VM; in one epoll set shared by all of them it holds only a map entry.
//! Accepted connections are handed to the caller's callback, which spawns
//! their tasks on the runtime.
//!
//! The set is level-triggered: a listener with connections left (after a
//! batch, or after running out of descriptors) is reported again.

use rustix::event::epoll;
use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Connections accepted from one listener before the others get a turn.
const ACCEPT_BATCH: usize = 64;

/// How long the thread waits before checking whether it is still wanted.
const WAKE_EVERY: Duration = Duration::from_millis(500);

type OnConn<T> = Box<dyn Fn(&T, TcpStream) + Send + Sync>;

struct Shared<T> {
    epoll: std::os::fd::OwnedFd,
    ports: Mutex<HashMap<u64, Arc<Port<T>>>>,
    next_token: AtomicU64,
    on_conn: OnConn<T>,
    /// What the error log says the listeners are.
    what: &'static str,
    /// Failed accepts so far (for `/metrics`).
    errors: AtomicU64,
}

struct Port<T> {
    listener: TcpListener,
    payload: T,
}

/// Accepts on any number of listeners from one thread; `T` travels with
/// each listener to the callback.
pub struct Acceptor<T> {
    shared: Arc<Shared<T>>,
}

/// A listener in the set; dropping it closes the listener.
pub struct Registration<T> {
    shared: Weak<Shared<T>>,
    token: u64,
}

impl<T> Drop for Registration<T> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            // Closing the last descriptor of the listener also removes it
            // from the epoll set; a thread still accepting on it holds a
            // reference until it is done.
            lock(&shared.ports).remove(&self.token);
        }
    }
}

fn lock<M>(m: &Mutex<M>) -> std::sync::MutexGuard<'_, M> {
    // Every update of the map is a single insert or remove.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Send + Sync + 'static> Acceptor<T> {
    /// Start the accepting thread; `on_conn` gets each accepted
    /// (non-blocking) connection with its listener's payload.
    pub fn start<F>(what: &'static str, on_conn: F) -> io::Result<Acceptor<T>>
    where
        F: Fn(&T, TcpStream) + Send + Sync + 'static,
    {
        let shared = Arc::new(Shared {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            ports: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(0),
            on_conn: Box::new(on_conn),
            what,
            errors: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("vspc-accept".into())
            .spawn(move || run(weak))?;
        Ok(Acceptor { shared })
    }

    /// Failed accepts on every listener of the set so far.
    pub fn errors(&self) -> u64 {
        self.shared.errors.load(Ordering::Relaxed)
    }

    /// Accept on `listener` (made non-blocking here) until the returned
    /// registration is dropped.
    pub fn add(&self, listener: TcpListener, payload: T) -> io::Result<Registration<T>> {
        listener.set_nonblocking(true)?;
        let token = self.shared.next_token.fetch_add(1, Ordering::Relaxed);
        let port = Arc::new(Port { listener, payload });
        // In the map before the set, so the first event finds it.
        lock(&self.shared.ports).insert(token, port.clone());
        if let Err(e) = epoll::add(
            &self.shared.epoll,
            &port.listener,
            epoll::EventData::new_u64(token),
            epoll::EventFlags::IN,
        ) {
            lock(&self.shared.ports).remove(&token);
            return Err(e.into());
        }
        Ok(Registration {
            shared: Arc::downgrade(&self.shared),
            token,
        })
    }
}

fn run<T>(weak: Weak<Shared<T>>) {
    let mut events: Vec<epoll::Event> = Vec::with_capacity(256);
    let mut last_warn: Option<Instant> = None;
    let timeout = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: WAKE_EVERY.as_nanos() as i64,
    };
    loop {
        let Some(shared) = weak.upgrade() else {
            return;
        };
        events.clear();
        match epoll::wait(
            &shared.epoll,
            rustix::buffer::spare_capacity(&mut events),
            Some(&timeout),
        ) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!("{}: waiting for connections failed: {e}", shared.what);
                drop(shared);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        let mut pause = None;
        for ev in &events {
            let token = ev.data.u64();
            let port = lock(&shared.ports).get(&token).cloned();
            let Some(port) = port else {
                continue;
            };
            if let Some(p) = accept_batch(&shared, &port, &mut last_warn) {
                pause = Some(p);
            }
        }
        drop(shared);
        if let Some(p) = pause {
            std::thread::sleep(p);
        }
    }
}

/// Accept what `port` has waiting (up to a batch); returns how long to
/// pause after an accept error.
fn accept_batch<T>(
    shared: &Shared<T>,
    port: &Port<T>,
    last_warn: &mut Option<Instant>,
) -> Option<Duration> {
    for _ in 0..ACCEPT_BATCH {
        match port.listener.accept() {
            Ok((tcp, _)) => match tcp.set_nonblocking(true) {
                Ok(()) => (shared.on_conn)(&port.payload, tcp),
                Err(e) => tracing::warn!("{}: dropping a connection: {e}", shared.what),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                return Some(accept_failed(shared.what, &e, last_warn));
            }
        }
    }
    None
}

/// Log a failed accept on the `what` listener (at most once a second, by
/// `last_warn`) and say how long to pause before accepting again. Running
/// out of descriptors is an error that pauses longer; connections already
/// open go on.
pub(crate) fn accept_failed(
    what: &str,
    e: &io::Error,
    last_warn: &mut Option<Instant>,
) -> Duration {
    // EMFILE (24) and ENFILE (23): the process or system is out of descriptors.
    let out_of_fds = matches!(e.raw_os_error(), Some(24) | Some(23));
    if last_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
        *last_warn = Some(Instant::now());
        if out_of_fds {
            tracing::error!(
                "{what}: out of file descriptors; refusing new connections until some close"
            );
        } else {
            tracing::warn!("{what}: accept failed: {e}");
        }
    }
    Duration::from_millis(if out_of_fds { 100 } else { 10 })
}

/// A non-blocking listening socket on `addr` with a `backlog`-deep accept
/// queue and SO_REUSEADDR, not yet registered with anything.
pub fn listen_std(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = if addr.is_ipv4() {
        AddressFamily::INET
    } else {
        AddressFamily::INET6
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )?;
    rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, backlog)?;
    Ok(TcpListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::mpsc;

    fn loopback() -> TcpListener {
        listen_std("127.0.0.1:0".parse().unwrap(), 16).unwrap()
    }

    #[test]
    fn hands_each_connection_over_with_its_payload() {
        let (tx, rx) = mpsc::channel::<(u32, TcpStream)>();
        let tx = Mutex::new(tx);
        let acc = Acceptor::start("test port", move |p: &u32, s| {
            let _ = lock(&tx).send((*p, s));
        })
        .unwrap();
        let (a, b) = (loopback(), loopback());
        let (addr_a, addr_b) = (a.local_addr().unwrap(), b.local_addr().unwrap());
        let _ra = acc.add(a, 1).unwrap();
        let _rb = acc.add(b, 2).unwrap();
        let mut got = Vec::new();
        let mut clients = Vec::new();
        for addr in [addr_b, addr_a, addr_a] {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
            let (p, mut s) = rx.recv_timeout(Duration::from_secs(5)).unwrap();
            s.set_nonblocking(false).unwrap();
            s.write_all(&[p as u8]).unwrap();
            got.push(p);
        }
        assert_eq!(got, [2, 1, 1]);
        for (c, want) in clients.iter_mut().zip([2u8, 1, 1]) {
            let mut byte = [0u8];
            c.read_exact(&mut byte).unwrap();
            assert_eq!(byte[0], want);
        }
    }

    #[test]
    fn dropping_the_registration_closes_the_port() {
        let acc = Acceptor::start("test port", |_: &(), _s| {}).unwrap();
        let l = loopback();
        let addr = l.local_addr().unwrap();
        let reg = acc.add(l, ()).unwrap();
        assert!(std::net::TcpStream::connect(addr).is_ok());
        drop(reg);
        // The thread may still be accepting on it for a moment.
        let t0 = Instant::now();
        loop {
            match std::net::TcpStream::connect(addr) {
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
                    break;
                }
                Ok(_) => assert!(t0.elapsed() < Duration::from_secs(3), "port stayed open"),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn thread_ends_with_the_acceptor() {
        let acc = Acceptor::start("test port", |_: &(), _s| {}).unwrap();
        let weak = Arc::downgrade(&acc.shared);
        drop(acc);
        let t0 = Instant::now();
        // The thread's own reference lasts at most one wait.
        while weak.strong_count() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(3), "thread kept it");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
