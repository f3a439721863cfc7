//! Faults between processes, on loopback only: a TCP proxy that delays, blackholes or resets
//! what passes through it, and a private PostgreSQL server that can be crashed and restarted
//! without touching the one the other tests share.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a [`FaultProxy`] does to the traffic through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forwards everything at once.
    Pass,
    /// Holds every chunk this long before forwarding it (each direction).
    Latency(Duration),
    /// Forwards nothing, in either direction, on open and new connections; nothing is lost
    /// either: as with TCP across a partition, what was held flows when the fault is lifted.
    Blackhole,
    /// Resets every open connection (RST) and every new one, until the fault is lifted.
    Reset,
}

/// A TCP proxy in front of one upstream address, with a [`Fault`] that can change at any time;
/// or in front of several instances of a service, each new connection to the next one (as a
/// Kubernetes Service spreads connections over the ready endpoints).
pub struct FaultProxy {
    pub port: u16,
    upstreams: Arc<Mutex<Vec<SocketAddr>>>,
    fault: watch::Sender<Fault>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    accepted: Arc<AtomicU64>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: impl tokio::net::ToSocketAddrs) -> anyhow::Result<Self> {
        let upstream: SocketAddr = tokio::net::lookup_host(upstream)
            .await?
            .next()
            .ok_or_else(|| anyhow::anyhow!("no upstream address"))?;
        anyhow::ensure!(
            upstream.ip().is_loopback(),
            "fault proxies only forward to loopback"
        );
        let upstreams = Arc::new(Mutex::new(vec![upstream]));
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let (fault, watcher) = watch::channel(Fault::Pass);
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accepted = Arc::new(AtomicU64::new(0));
        let acceptor = {
            let connections = connections.clone();
            let accepted = accepted.clone();
            let upstreams = upstreams.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let n = accepted.fetch_add(1, Ordering::Relaxed) as usize;
                    let upstream = {
                        let all = upstreams.lock().unwrap();
                        all.get(n % all.len().max(1)).copied()
                    };
                    let Some(upstream) = upstream else {
                        reset(client);
                        continue;
                    };
                    if *watcher.borrow() == Fault::Reset {
                        reset(client);
                        continue;
                    }
                    let watcher = watcher.clone();
                    let task = tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            reset(client);
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (mut client_rx, mut client_tx) = client.into_split();
                        let (mut server_rx, mut server_tx) = server.into_split();
                        // Either direction ending ends the connection.
                        tokio::select! {
                            () = pump(&mut client_rx, &mut server_tx, watcher.clone()) => {}
                            () = pump(&mut server_rx, &mut client_tx, watcher.clone()) => {}
                        }
                        if *watcher.borrow() == Fault::Reset {
                            if let Ok(client) = client_rx.reunite(client_tx) {
                                reset(client);
                            }
                            if let Ok(server) = server_rx.reunite(server_tx) {
                                reset(server);
                            }
                        }
                    });
                    let mut open = connections.lock().unwrap();
                    open.retain(|t| !t.is_finished());
                    open.push(task.abort_handle());
                }
            })
        };
        Ok(Self {
            port,
            upstreams,
            fault,
            connections,
            accepted,
            acceptor,
        })
    }

    /// The loopback ports new connections go to, in turn (open connections stay where they
    /// are, as with a Kubernetes Service whose endpoints change).
    pub fn set_upstreams(&self, ports: &[u16]) {
        *self.upstreams.lock().unwrap() = ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
    }

    /// Changes the fault; [`Fault::Reset`] also resets every open connection at once.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    pub fn fault(&self) -> Fault {
        *self.fault.borrow()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// `host:port` of the proxy.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.acceptor.abort();
        for task in self.connections.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Closes a connection with a reset rather than an orderly FIN.
fn reset(stream: TcpStream) {
    if let Ok(std) = stream.into_std() {
        let _ = socket2::SockRef::from(&std).set_linger(Some(Duration::ZERO));
    }
}

/// Copies one direction until it ends or the proxy resets it.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // A blackhole holds the data where it is: nothing is read, nothing is written.
        match fault
            .wait_for(|f| !matches!(f, Fault::Blackhole))
            .await
            .map(|f| *f)
        {
            Ok(Fault::Reset) | Err(_) => return,
            Ok(_) => {}
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // A blackhole (or a reset) starting while this side waits for data.
            _ = fault.changed() => continue,
        };
        let current = *fault.borrow();
        match current {
            Fault::Reset => return,
            Fault::Latency(d) => tokio::time::sleep(d).await,
            Fault::Blackhole => {
                if fault
                    .wait_for(|f| !matches!(f, Fault::Blackhole))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Fault::Pass => {}
        }
        let reset = fault.wait_for(|f| *f == Fault::Reset);
        tokio::select! {
            written = to.write_all(&buf[..n]) => if written.is_err() { return },
            _ = reset => return,
        }
    }
}

/// A PostgreSQL server of this test alone, on a free loopback port, started (and crashed,
/// and started again) by `scripts/deps.sh`: initdb as an unprivileged user when run as root,
/// trust authentication, user `postgres`, synchronous commits (`MES_PG_DURABLE`: what it
/// acknowledged survives its crash).
pub struct PrivatePostgres {
    pub port: u16,
    state: PathBuf,
    _dir: tempfile::TempDir,
}

fn deps_script() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/deps.sh"))
}

/// `scripts/deps.sh up` for a durable throwaway PostgreSQL on `port` (what it started listed
/// in `started`).
fn deps_up(port: u16, started: Option<&std::path::Path>) -> anyhow::Result<std::process::Output> {
    let mut cmd = Command::new("bash");
    cmd.arg(deps_script())
        .arg("up")
        .env("MES_PG_HOST", "127.0.0.1")
        .env("MES_PG_PORT", port.to_string())
        .env("MES_PG_DURABLE", "true")
        .env_remove("MES_DATABASE_URL");
    // Only this test stops its server: never list it in a caller's file (.ci/run exports one).
    match started {
        Some(file) => cmd.env("MES_DEPS_STARTED_FILE", file),
        None => cmd.env_remove("MES_DEPS_STARTED_FILE"),
    };
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "deps.sh up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

impl PrivatePostgres {
    pub fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let started = dir.path().join("started");
        let out = deps_up(port, Some(&started))?;
        let listed = std::fs::read_to_string(&started).unwrap_or_default();
        let state = listed
            .lines()
            .find(|l| l.contains(&format!("postgres-{port}")))
            .map(PathBuf::from)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "deps.sh did not start a PostgreSQL on {port}: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
        Ok(Self {
            port,
            state,
            _dir: dir,
        })
    }

    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the server as a crash would (`pg_ctl stop -m immediate`).
    pub fn crash(&self) -> anyhow::Result<()> {
        self.deps(&["crash"])
    }

    /// Starts it again (crash recovery runs first).
    pub fn start_again(&self) -> anyhow::Result<()> {
        deps_up(self.port, None).map(drop)
    }

    fn deps(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("bash")
            .arg(deps_script())
            .args(args)
            .arg(&self.state)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "deps.sh {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(deps_script())
            .args(["down", "--purge"])
            .arg(&self.state)
            .output();
    }
}

/// A Redis server of the test's own (`redis-server` on a free loopback port, nothing saved),
/// so a test can kill it without touching the one the other tests share.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut redis = Self { port, child: None };
        redis.start_again()?;
        Ok(redis)
    }

    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills it with SIGKILL: everything it held is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again, empty) and waits until it answers.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot start redis-server ({e}): `scripts/deps.sh up` installs it \
                     (apt-get install redis-server)"
                )
            })?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let mut pong = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut pong).is_ok()
                    && &pong == b"+PONG\r\n"
                {
                    return Ok(());
                }
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "redis-server on {} did not answer within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
