//! A loopback TCP proxy between the service and a dependency, driven by the test: hold traffic
//! (the dependency answers late) or cut it (the dependency is gone: connections reset, new ones
//! refused), at the moment the test chooses.

use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Open,
    Hold,
    Cut,
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    /// What reached the proxy from clients while traffic was held.
    held: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards every connection on a fresh loopback port to `upstream`.
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let (mode, mode_rx) = watch::channel(Mode::Open);
        let held = Arc::new(Mutex::new(Vec::new()));
        let upstream = upstream.to_owned();
        let recorder = held.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *mode_rx.borrow() == Mode::Cut {
                    continue; // dropped: the client sees its connection closed
                }
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, mode_rx.clone(), Some(recorder.clone())));
                tokio::spawn(pipe(sr, cw, mode_rx.clone(), None));
            }
        });
        Self {
            port,
            mode,
            held,
            task,
        }
    }

    /// From now on, bytes from clients wait in the proxy until [`Proxy::release`].
    pub fn hold(&self) {
        self.held.lock().expect("held").clear();
        self.mode.send_replace(Mode::Hold);
    }

    /// Lets traffic flow again (also after [`Proxy::cut`]: new connections are accepted).
    pub fn release(&self) {
        self.mode.send_replace(Mode::Open);
    }

    /// Closes every open connection and refuses new ones until [`Proxy::release`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Whether bytes waiting since [`Proxy::hold`] contain `needle` (a command name, a key).
    pub fn holds(&self, needle: &str) -> bool {
        let held = self.held.lock().expect("held");
        held.windows(needle.len()).any(|w| w == needle.as_bytes())
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.mode.send_replace(Mode::Cut);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    record: Option<Arc<Mutex<Vec<u8>>>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = mode.wait_for(|m| *m == Mode::Cut) => return,
        };
        let now = *mode.borrow();
        match now {
            Mode::Cut => return,
            Mode::Hold => {
                if let Some(record) = &record {
                    record.lock().expect("held").extend_from_slice(&buf[..n]);
                }
                match mode.wait_for(|m| *m != Mode::Hold).await {
                    Ok(m) if *m == Mode::Open => {}
                    _ => return,
                }
            }
            Mode::Open => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
