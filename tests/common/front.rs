//! A loopback TCP front for a storage server: the address clients are
//! given, which a test takes down (listener closed, every open connection
//! cut) and brings up again on the same port, while the server behind it
//! keeps its objects.
//!
//! Why not kill the server itself: moto (5.x) keeps objects in memory only
//! and has no persistence option, so a killed moto comes back empty and
//! the outage would end in a different, bucketless store. Seen from the
//! client, a front that is down is a server that is down: connections are
//! refused, requests in flight end mid-way.
//!
//! ```text
//! client ──▶ 127.0.0.1:<front port> ──(copy both ways)──▶ 127.0.0.1:<server port>
//! ```

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Open connections by id: (client side, server side), to cut them.
type Conns = Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>;

/// A TCP front on 127.0.0.1 forwarding to `127.0.0.1:<target>`.
pub struct TcpFront {
    port: u16,
    target: u16,
    running: Option<Running>,
}

struct Running {
    stop: Arc<AtomicBool>,
    conns: Conns,
    accept: JoinHandle<()>,
}

impl TcpFront {
    /// Starts a front for `target` on a free port.
    pub fn start(target: u16) -> TcpFront {
        let mut front = TcpFront {
            port: super::pg::free_port(),
            target,
            running: None,
        };
        front.up();
        front
    }

    /// The front's port (clients use it).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<front port>`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Whether the front accepts connections.
    pub fn is_up(&self) -> bool {
        self.running.is_some()
    }

    /// Listens again, on the same port (retried for a few seconds should
    /// the port be slow to free).
    pub fn up(&mut self) {
        if self.running.is_some() {
            return;
        }
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(_) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("front: bind 127.0.0.1:{}: {e}", self.port),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Conns = Arc::default();
        let accept = {
            let (stop, conns, target) = (stop.clone(), conns.clone(), self.target);
            std::thread::spawn(move || accept_loop(listener, target, &stop, &conns))
        };
        self.running = Some(Running {
            stop,
            conns,
            accept,
        });
    }

    /// Stops listening and cuts every open connection.
    pub fn down(&mut self) {
        let Some(r) = self.running.take() else {
            return;
        };
        r.stop.store(true, Ordering::SeqCst);
        let _ = r.accept.join();
        for (_, (client, server)) in r.conns.lock().unwrap().drain() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpFront {
    fn drop(&mut self) {
        self.down();
    }
}

fn accept_loop(listener: TcpListener, target: u16, stop: &AtomicBool, conns: &Conns) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    while !stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(_) => continue,
        };
        let _ = client.set_nonblocking(false);
        let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let id = NEXT.fetch_add(1, Ordering::SeqCst);
        conns.lock().unwrap().insert(
            id,
            (client.try_clone().unwrap(), server.try_clone().unwrap()),
        );
        let pipe = |mut from: TcpStream, mut to: TcpStream, conns: Option<Conns>| {
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from, &mut to);
                // One direction ended: the connection is over both ways.
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                if let Some(c) = conns {
                    c.lock().unwrap().remove(&id);
                }
            });
        };
        pipe(
            client.try_clone().unwrap(),
            server.try_clone().unwrap(),
            Some(conns.clone()),
        );
        pipe(server, client, None);
    }
}
