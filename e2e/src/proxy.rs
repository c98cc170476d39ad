//! A TCP proxy in the root network namespace, so that processes in
//! simulated nodes reach the local API server (which listens on loopback)
//! at the gateway address. Threads, no runtime: it works from sync and
//! async tests alike.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

/// Forwards every connection to `listen` to `target`; stops on drop.
pub(crate) struct TcpProxy {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

impl TcpProxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `target`.
    pub(crate) fn start(listen: SocketAddr, target: SocketAddr) -> io::Result<TcpProxy> {
        let listener = TcpListener::bind(listen)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::Builder::new()
            .name(format!("proxy-{addr}"))
            .spawn(move || {
                while !stopped.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let _ = client.set_nonblocking(false);
                            let Ok(server) =
                                TcpStream::connect_timeout(&target, Duration::from_secs(5))
                            else {
                                continue;
                            };
                            let (c2, s2) = match (client.try_clone(), server.try_clone()) {
                                (Ok(c), Ok(s)) => (c, s),
                                _ => continue,
                            };
                            thread::spawn(move || pipe(client, server));
                            thread::spawn(move || pipe(s2, c2));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(20));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(20)),
                    }
                }
            })?;
        Ok(TcpProxy { addr, stop })
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
