//! The end-to-end harness: the four service binaries started as real processes against fresh
//! PostgreSQL databases and a unique Redis prefix, plus an OTLP trace receiver (a real tonic
//! server speaking the OTLP/gRPC protocol) that collects their spans.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;

mod fault_proxy;
pub use fault_proxy::{Fault, FaultProxy, PrivatePostgres, PrivateRedis};

pub const SERVICES: [&str; 4] = ["scan-ingest", "trace-query", "erp-sync", "gateway"];

/// A span as received, with the `service.name` of its resource.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub span: Span,
}

impl ReceivedSpan {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Clone, Default)]
pub struct OtlpReceiver {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for OtlpReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s),
                    ) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(ReceivedSpan {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpReceiver {
    /// Starts the receiver on 127.0.0.1:0; returns it and its port.
    pub async fn start() -> anyhow::Result<(Self, u16)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let me = Self::default();
        let svc = TraceServiceServer::new(me.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ok((me, port))
    }

    pub fn spans_of_trace(&self, trace_id: &str) -> Vec<ReceivedSpan> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id() == trace_id)
            .cloned()
            .collect()
    }
}

/// The running system.
pub struct System {
    pub gateway: String,
    /// The internal key the services sign caller identities with (`MES_INTERNAL_KEY`).
    pub internal_key: String,
    pub grpc: HashMap<&'static str, u16>,
    /// The Prometheus `/metrics` port of each back-end service.
    pub metrics: HashMap<&'static str, u16>,
    pub otlp: OtlpReceiver,
    pub outbox: PathBuf,
    pub run_dir: tempfile::TempDir,
    db_urls: Vec<String>,
    children: Vec<(&'static str, Child)>,
    /// How each service was started (binary and environment), to start it again.
    commands: HashMap<&'static str, Vec<(String, String)>>,
    /// Every service's Redis keys are under `e2e:<tag>:`.
    redis_prefix: String,
    /// The Redis the cleanup talks to (the services may reach it through a proxy).
    redis_admin_url: String,
    /// The fault proxies in front of each back-end service, when asked for.
    backend_proxies: HashMap<&'static str, FaultProxy>,
    /// Further instances of back-end services: (service, gRPC port, process).
    instances: Vec<(&'static str, u16, Child)>,
    /// The binary each service runs (with fail points for some, [`Options::failpoints`]).
    binaries: HashMap<&'static str, PathBuf>,
}

/// Where the services find their dependencies, and what else they are told.
pub struct Options<'a> {
    /// Extra environment variables for every service.
    pub env: &'a [(&'a str, &'a str)],
    /// `host:port` of the PostgreSQL server the services use.
    pub postgres: String,
    /// The Redis URL the services use (a fault proxy's, say).
    pub redis: String,
    /// Put a [`FaultProxy`] in front of each back-end service: every other service calls it
    /// through the proxy, which can also spread connections over several instances
    /// ([`System::start_instance`]).
    pub proxy_backends: bool,
    /// Run scan-ingest and erp-sync built with their fail points (`make test` builds them
    /// into `target/<profile>/failpoints/`); a service's `FAILPOINTS` variable
    /// ([`System::set_env`]) then says where it crashes.
    pub failpoints: bool,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            env: &[],
            postgres: "127.0.0.1:5432".into(),
            redis: REDIS_URL.into(),
            proxy_backends: false,
            failpoints: false,
        }
    }
}

/// The test Redis (every test's keys under their own prefix).
pub const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The directory holding the workspace's binaries: the profile directory of the running test
/// (which sits in its `deps/`) or of the running binary (`mes-bench`, beside the services).
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("target profile dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The services built with their fail points (the `failpoints` feature).
pub const WITH_FAILPOINTS: [&str; 2] = ["scan-ingest", "erp-sync"];

/// The binary of each service: built first (`make test` runs `cargo build --workspace --bins`,
/// and `make failpoint-bins` for the fail-point builds).
fn binaries(failpoints: bool) -> HashMap<&'static str, PathBuf> {
    SERVICES
        .iter()
        .map(|s| {
            let path = if failpoints && WITH_FAILPOINTS.contains(s) {
                bin_dir().join("failpoints").join(s)
            } else {
                bin_dir().join(s)
            };
            assert!(
                path.exists(),
                "{} is missing: build the services first (`cargo build --workspace --bins`, and \
                 `make failpoint-bins` for the fail-point builds, as `make test` does)",
                path.display()
            );
            (*s, path)
        })
        .collect()
}

impl System {
    /// Starts all four services in demo mode and waits until the gateway is ready and the
    /// demo plant has arrived through erp-sync.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(&[]).await
    }

    /// [`System::start`] with extra environment variables for every service.
    pub async fn start_with(extra_env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::start_opts(Options {
            env: extra_env,
            ..Options::default()
        })
        .await
    }

    /// [`System::start`] with the given dependencies and environment.
    pub async fn start_opts(options: Options<'_>) -> anyhow::Result<Self> {
        let binaries = binaries(options.failpoints);
        let (otlp, otlp_port) = OtlpReceiver::start().await?;
        let run_dir = tempfile::tempdir()?;
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let outbox = run_dir.path().join("erp-confirmations.jsonl");
        let mut grpc = HashMap::new();
        let mut metrics = HashMap::new();
        for s in ["scan-ingest", "trace-query", "erp-sync"] {
            grpc.insert(s, free_port());
            metrics.insert(s, free_port());
        }
        let mut backend_proxies = HashMap::new();
        if options.proxy_backends {
            for (s, port) in &grpc {
                backend_proxies.insert(*s, FaultProxy::start(("127.0.0.1", *port)).await?);
            }
        }
        // The URL the gateway calls a back-end service at: its fault proxy, if any.
        let gateway_url = |s: &str| match backend_proxies.get(s) {
            Some(p) => format!("http://127.0.0.1:{}", p.port),
            None => format!("http://127.0.0.1:{}", grpc[s]),
        };
        let gateway_port = free_port();
        let mut commands = HashMap::new();
        for service in SERVICES {
            let prefix = format!("MES_{}_", service.to_uppercase().replace('-', "_"));
            let db_url = format!(
                "postgres://postgres@{}/mes_e2e_{}_{}",
                options.postgres,
                service.replace('-', "_"),
                &tag[..12]
            );
            let listen = match service {
                "gateway" => format!("127.0.0.1:{gateway_port}"),
                s => format!("127.0.0.1:{}", grpc[s]),
            };
            // With proxies, every service calls the others through them (the gateway its
            // back-ends, trace-query and erp-sync scan-ingest's feed), as through a Service.
            let url_of = |s: &str| gateway_url(s);
            let mut env: Vec<(String, String)> = vec![
                ("MES_DEMO".into(), "true".into()),
                ("MES_LOG_FORMAT".into(), "json".into()),
                ("MES_LOG_LEVEL".into(), "info,sqlx=warn".into()),
                (
                    "MES_OTLP_ENDPOINT".into(),
                    format!("http://127.0.0.1:{otlp_port}"),
                ),
                ("MES_REDIS_URL".into(), options.redis.clone()),
                ("MES_INTERNAL_KEY".into(), format!("e2e-internal-key-{tag}")),
                ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
                (format!("{prefix}DATABASE_URL"), db_url.clone()),
                (format!("{prefix}DATABASE_MAX_CONNECTIONS"), "5".into()),
                (format!("{prefix}LISTEN_ADDR"), listen),
                (
                    format!("{prefix}METRICS_ADDR"),
                    // The gateway serves /metrics on its own port.
                    match metrics.get(service) {
                        Some(port) => format!("127.0.0.1:{port}"),
                        None => String::new(),
                    },
                ),
                (
                    format!("{prefix}REDIS_PREFIX"),
                    format!("e2e:{tag}:{service}:"),
                ),
                (format!("{prefix}SCAN_INGEST_URL"), url_of("scan-ingest")),
                (format!("{prefix}TRACE_QUERY_URL"), url_of("trace-query")),
                (format!("{prefix}ERP_SYNC_URL"), url_of("erp-sync")),
                (
                    "MES_ERP_SYNC_ERP__PLANT_FILE".into(),
                    root.join("deploy/demo/plant.json").display().to_string(),
                ),
                (
                    "MES_ERP_SYNC_ERP__OUTBOX_FILE".into(),
                    outbox.display().to_string(),
                ),
            ];
            env.extend(
                options
                    .env
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            );
            commands.insert(service, env);
        }
        let mut sys = Self {
            gateway: format!("http://127.0.0.1:{gateway_port}"),
            internal_key: format!("e2e-internal-key-{tag}"),
            grpc,
            metrics,
            otlp,
            outbox,
            run_dir,
            db_urls: SERVICES
                .iter()
                .map(|s| {
                    let prefix = format!("MES_{}_DATABASE_URL", s.to_uppercase().replace('-', "_"));
                    commands[s]
                        .iter()
                        .find(|(k, _)| *k == prefix)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                })
                .collect(),
            children: Vec::new(),
            commands,
            redis_prefix: format!("e2e:{tag}:"),
            redis_admin_url: REDIS_URL.into(),
            backend_proxies,
            instances: Vec::new(),
            binaries,
        };
        for service in SERVICES {
            let child = sys.spawn(service)?;
            sys.children.push((service, child));
        }
        sys.wait_ready().await?;
        Ok(sys)
    }

    /// Starts another instance of a back-end service on its own gRPC and metrics ports, and
    /// waits until it serves: its gRPC port.
    pub async fn start_instance(
        &mut self,
        service: &'static str,
        within: Duration,
    ) -> anyhow::Result<u16> {
        self.start_instance_with(service, &[], within).await
    }

    /// [`System::start_instance`] with some settings of its own (another database, say).
    pub async fn start_instance_with(
        &mut self,
        service: &'static str,
        env_over: &[(&str, &str)],
        within: Duration,
    ) -> anyhow::Result<u16> {
        let (port, metrics) = (free_port(), free_port());
        let prefix = format!("MES_{}_", service.to_uppercase().replace('-', "_"));
        let mut env = self.commands[service].clone();
        env.extend(
            env_over
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        env.push((format!("{prefix}LISTEN_ADDR"), format!("127.0.0.1:{port}")));
        env.push((
            format!("{prefix}METRICS_ADDR"),
            format!("127.0.0.1:{metrics}"),
        ));
        let child = self.spawn_with(service, &env, &format!("{service}-{port}"))?;
        self.instances.push((service, port, child));
        let deadline = Instant::now() + within;
        while !serves_grpc(port).await {
            anyhow::ensure!(
                Instant::now() < deadline,
                "{service} instance on {port} did not serve within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(port)
    }

    /// Stops the instance of `service` on gRPC `port` as Kubernetes does (SIGTERM, then its
    /// graceful shutdown) and waits for it to exit.
    pub fn stop_instance(&mut self, service: &str, port: u16) -> Option<std::process::ExitStatus> {
        if self.grpc.get(service) == Some(&port) {
            return self.stop_service(service);
        }
        let i = self
            .instances
            .iter()
            .position(|(s, p, _)| *s == service && *p == port)?;
        let (_, _, mut child) = self.instances.remove(i);
        terminate(&mut child)
    }

    /// Starts one service process as it was started first (its log appended to).
    fn spawn(&self, service: &'static str) -> anyhow::Result<Child> {
        self.spawn_with(service, &self.commands[service], service)
    }

    /// Starts a service binary with `env`, its output appended to `<log>.log` in the run dir.
    fn spawn_with(
        &self,
        service: &str,
        env: &[(String, String)],
        log: &str,
    ) -> anyhow::Result<Child> {
        let root = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.run_dir.path().join(format!("{log}.log")))?;
        Command::new(&self.binaries[service])
            .current_dir(&root)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {service}: {e}"))
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let mut exited = None;
            for (name, child) in &mut self.children {
                if let Some(status) = child.try_wait()? {
                    exited = Some((*name, status));
                }
            }
            if let Some((name, status)) = exited {
                anyhow::bail!("{name} exited early ({status}):\n{}", self.log_tail(name));
            }
            let ready = http
                .get(format!("{}/readyz", self.gateway))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready && self.plant_loaded(&http).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = SERVICES
                    .iter()
                    .map(|s| format!("== {s}\n{}", self.log_tail(s)))
                    .collect();
                anyhow::bail!("the system did not become ready:\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn plant_loaded(&self, http: &reqwest::Client) -> bool {
        let Ok(token) = self.token_with(http, "admin", "demo-admin", None).await else {
            return false;
        };
        http.get(format!("{}/api/v1/work-orders/WO-1001", self.gateway))
            .bearer_auth(token)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    async fn token_with(
        &self,
        http: &reqwest::Client,
        user: &str,
        password: &str,
        device: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut body = serde_json::json!({"username": user, "password": password});
        if let Some(d) = device {
            // The demo tablets' enrolment secrets are `demo-<device>`.
            body["device_id"] = d.into();
            body["device_secret"] = format!("demo-{d}").into();
        }
        let r = http
            .post(format!("{}/api/v1/auth/token", self.gateway))
            .json(&body)
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "login {user}: {}", r.status());
        let v: serde_json::Value = r.json().await?;
        Ok(v["access_token"].as_str().unwrap_or_default().to_owned())
    }

    /// A bearer token for a demo user (password `demo-<user>`), optionally on a device.
    pub async fn token(&self, user: &str, device: Option<&str>) -> String {
        self.token_with(
            &reqwest::Client::new(),
            user,
            &format!("demo-{user}"),
            device,
        )
        .await
        .expect("login")
    }

    /// The captured stdout/stderr of a service.
    pub fn log(&self, service: &str) -> String {
        std::fs::read_to_string(self.run_dir.path().join(format!("{service}.log")))
            .unwrap_or_default()
    }

    fn log_tail(&self, service: &str) -> String {
        let log = self.log(service);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The value of one Prometheus sample (`name{labels}` exactly as exposed) of a back-end
    /// service, if it is there.
    pub async fn metric(&self, service: &str, sample: &str) -> Option<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics.get(service)?);
        let text = reqwest::get(url).await.ok()?.text().await.ok()?;
        text.lines().find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// A connected gRPC channel to one of the back-end services.
    pub async fn channel(&self, service: &str) -> tonic::transport::Channel {
        let url = format!("http://127.0.0.1:{}", self.grpc[service]);
        tonic::transport::Endpoint::from_shared(url)
            .expect("url")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {service}: {e}"))
    }

    /// The process id of each running service.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.children.iter().map(|(n, c)| (*n, c.id())).collect()
    }

    /// The PostgreSQL URL of a service's own database.
    pub fn database_url(&self, service: &str) -> Option<&str> {
        let i = SERVICES.iter().position(|s| *s == service)?;
        self.db_urls.get(i).map(String::as_str)
    }

    /// Sends SIGTERM to one service and waits for it to exit.
    pub fn stop_service(&mut self, service: &str) -> Option<std::process::ExitStatus> {
        let (_, child) = self.children.iter_mut().find(|(n, _)| *n == service)?;
        terminate(child)
    }

    /// Runs the gateway's admin command line (`gateway device enrol ...`) against the running
    /// system's gateway database: what it printed.
    pub fn gateway_admin(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(bin_dir().join("gateway"))
            .args(args)
            .envs(self.commands["gateway"].iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "gateway {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Sets (or, with `None`, removes) one environment variable of a service for its next
    /// starts ([`System::restart_service`], [`System::start_instance`]).
    pub fn set_env(&mut self, service: &str, key: &str, value: Option<&str>) {
        let env = self
            .commands
            .get_mut(service)
            .unwrap_or_else(|| panic!("no service {service}"));
        env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            env.push((key.to_owned(), v.to_owned()));
        }
    }

    /// Kills one service with SIGKILL (no shutdown of any kind) and reaps it.
    pub fn kill_service(&mut self, service: &str) {
        if let Some((_, child)) = self.children.iter_mut().find(|(n, _)| *n == service) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a stopped or killed service again, with the same settings, and waits until it
    /// serves (`within`).
    pub async fn restart_service(
        &mut self,
        service: &'static str,
        within: Duration,
    ) -> anyhow::Result<()> {
        let i = self
            .children
            .iter()
            .position(|(n, _)| *n == service)
            .ok_or_else(|| anyhow::anyhow!("no service {service}"))?;
        if self.children[i].1.try_wait()?.is_none() {
            anyhow::bail!("{service} is still running");
        }
        self.children[i].1 = self.spawn(service)?;
        let deadline = Instant::now() + within;
        while !self.serves(service).await {
            if let Some(status) = self.children[i].1.try_wait()? {
                anyhow::bail!(
                    "{service} exited again ({status}):\n{}",
                    self.log_tail(service)
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{service} did not serve within {within:?}:\n{}",
                    self.log_tail(service)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Whether a service answers: the gateway's `/readyz`, a back-end's gRPC health check.
    pub async fn serves(&self, service: &str) -> bool {
        if service == "gateway" {
            return reqwest::Client::new()
                .get(format!("{}/readyz", self.gateway))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
        }
        match self.grpc.get(service) {
            Some(port) => serves_grpc(*port).await,
            None => false,
        }
    }

    /// The fault proxy in front of a back-end service ([`Options::proxy_backends`]).
    pub fn backend_proxy(&self, service: &str) -> Option<&FaultProxy> {
        self.backend_proxies.get(service)
    }

    /// Whether a service process has exited.
    pub fn exited(&mut self, service: &str) -> bool {
        self.children
            .iter_mut()
            .find(|(n, _)| *n == service)
            .is_none_or(|(_, c)| !matches!(c.try_wait(), Ok(None)))
    }
}

/// Whether the gRPC server on a loopback port answers its health check with SERVING.
async fn serves_grpc(port: u16) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
    else {
        return false;
    };
    let Ok(channel) = endpoint
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(2))
        .connect()
        .await
    else {
        return false;
    };
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .is_ok_and(|r| {
            r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        })
}

fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().ok()
}

impl Drop for System {
    fn drop(&mut self) {
        for (_, _, child) in &mut self.instances {
            terminate(child);
        }
        for (_, child) in self.children.iter_mut().rev() {
            terminate(child);
        }
        for url in std::mem::take(&mut self.db_urls) {
            drop(mes_common::testing::DbGuard { url });
        }
        drop(mes_common::testing::RedisGuard {
            url: self.redis_admin_url.clone(),
            prefix: self.redis_prefix.clone(),
        });
    }
}

/// Where the reliability report's records go: `<target>/reliability/`.
pub fn reliability_dir() -> PathBuf {
    bin_dir()
        .parent()
        .map(|p| p.join("reliability"))
        .unwrap_or_else(|| PathBuf::from("target/reliability"))
}

/// Writes one scenario's figures for `make reliability-report` (`<target>/reliability/<name>.json`).
pub fn reliability_record(name: &str, record: &serde_json::Value) {
    let dir = reliability_dir();
    let file: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            dir.join(format!("{file}.json")),
            serde_json::to_vec_pretty(record).unwrap_or_default(),
        )
    });
    if let Err(e) = written {
        eprintln!("cannot write the reliability record {name}: {e}");
    }
}

/// A Python virtual environment with `packages`, created once under the target directory and
/// reused (a marker file records what was installed).
pub fn python_tool(name: &str, packages: &[&str]) -> anyhow::Result<PathBuf> {
    let root = bin_dir()
        .parent()
        .map(|p| p.join("py-tools"))
        .unwrap_or_else(|| PathBuf::from("target/py-tools"));
    let venv = root.join(name);
    let marker = venv.join("installed.txt");
    let want = packages.join(" ");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(venv.join("bin"));
    }
    std::fs::create_dir_all(&root)?;
    let status = Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv)
        .status()?;
    anyhow::ensure!(status.success(), "python3 -m venv failed");
    let status = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(packages)
        .status()?;
    anyhow::ensure!(status.success(), "pip install {want} failed");
    std::fs::write(&marker, &want)?;
    Ok(venv.join("bin"))
}
