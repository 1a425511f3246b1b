//! A host that never completes the TCP handshake, on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

/// A listener on 127.0.0.1 that never accepts and whose accept queue is full, so a new
/// connection to it never completes: the kernel drops its SYNs, as a firewall in front of a GPU
/// box does. Connecting to [`addr`](Self::addr) ends only at the client's connect timeout.
#[derive(Debug)]
pub struct Blackhole {
    addr: SocketAddr,
    _listener: tokio::net::TcpListener,
    _queued: Vec<std::net::TcpStream>,
}

impl Blackhole {
    /// Binds a port with a backlog of 0 and fills its accept queue. Needs a tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((Ipv4Addr::LOCALHOST, 0).into())?;
        let listener = socket.listen(0)?;
        let addr = listener.local_addr()?;
        let mut queued = Vec::new();
        // Linux queues backlog + 1 connections; connect until one no longer completes.
        for _ in 0..16 {
            let connect = tokio::task::spawn_blocking(move || {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300))
            });
            match connect.await.map_err(std::io::Error::other)? {
                Ok(stream) => queued.push(stream),
                Err(_) => {
                    return Ok(Blackhole {
                        addr,
                        _listener: listener,
                        _queued: queued,
                    });
                }
            }
        }
        Err(std::io::Error::other(
            "the accept queue never filled: this system completes handshakes for a full backlog",
        ))
    }

    /// The address whose handshakes never complete.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}
