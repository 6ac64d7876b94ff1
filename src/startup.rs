//! Start-up and wiring: opens the WAL, starts the supervised actors, binds
//! the HTTP server. Tests build an [`Application`] on port 0 exactly as the
//! binary does.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;

use actix::{Addr, Supervisor};
use actix_web::middleware::{from_fn, Condition};
use actix_web::{web, App, HttpServer};
use actix_web_prom::PrometheusMetricsBuilder;
use anyhow::{bail, Context as _};
use gateway_actors::control::{
    ControlPlane, LogControl as _, Operator, OperatorParts, RuntimeOverrides,
};
use gateway_actors::dispatcher::Dispatcher;
use gateway_actors::fleet::{Bundles, FleetClient, SeenIds};
use gateway_actors::ingest::{IngestCore, IngestRouters};
use gateway_actors::mqtt::{MqttIngest, MqttStatus, ReloadTls};
use gateway_actors::route::SinkPolicy;
use gateway_actors::sink::s3::ArchiveKeeper;
use gateway_actors::sink::{Rebuild, SinkActor, SinkFactory};
use gateway_actors::wal::{Wal, WalHealth, WalReader, WalStore, WalWriter};
use gateway_actors::Metrics;
use openssl::ssl::{SslAcceptor, SslAcceptorBuilder, SslFiletype, SslMethod, SslVerifyMode};
use prometheus::Registry;

use crate::auth::{AdminAuth, DeviceAuth};
use crate::config::{MqttMode, Settings, SinkTarget};
use crate::http::{self, AppState};

/// A running gateway: actors started, HTTP bound.
pub struct Application {
    port: u16,
    server: actix_web::dev::Server,
    /// The upkeep threads of local archives (stop when dropped).
    _keepers: Vec<ArchiveKeeper>,
    /// Supervised actors, exposed for tests and the admin layer.
    pub handles: Handles,
}

/// Addresses of the running actors.
#[derive(Clone)]
pub struct Handles {
    /// The WAL's writer thread (its supervising actor: [`WalWriter::store`]).
    pub wal: WalWriter,
    /// The ingest routers (one per ingest thread).
    pub router: IngestRouters,
    /// Dispatchers by sink name.
    pub dispatchers: Vec<(String, Addr<Dispatcher>)>,
    /// Sink actors by sink name.
    pub sinks: Vec<(String, Addr<SinkActor>)>,
    /// WAL health.
    pub wal_health: Arc<WalHealth>,
    /// The metrics registry served on /metrics.
    pub registry: Registry,
    /// MQTT ingest, when on.
    pub mqtt: Option<Addr<MqttIngest>>,
    /// MQTT connection state, when on.
    pub mqtt_status: Option<Arc<MqttStatus>>,
    /// Operator commands (admin API, control plane).
    pub operator: Arc<Operator>,
    /// The MQTT control plane, when MQTT is on.
    pub control: Option<Addr<ControlPlane>>,
    /// The fleet channel, when `fleet.url` is set.
    pub fleet: Option<Addr<FleetClient>>,
}

/// Builds the client factory of a configured sink ([`gateway_actors::sink::factory`]).
pub fn sink_factory(target: &SinkTarget) -> SinkFactory {
    gateway_actors::sink::factory(target)
}

/// Every sink's configured route, TTLs and drain order.
pub fn base_policies(settings: &Settings) -> BTreeMap<String, SinkPolicy> {
    settings
        .sinks
        .iter()
        .map(|(n, s)| (n.clone(), s.policy.clone()))
        .collect()
}

/// What the operator works with: for a running gateway its router and
/// dispatchers, for the CLI on a stopped one `None` and none.
pub fn operator_parts(
    settings: &Settings,
    wal: WalWriter,
    reader: WalReader,
    router: Option<IngestRouters>,
    dispatchers: &[(String, Addr<Dispatcher>)],
    runtime: RuntimeOverrides,
    metrics: Metrics,
) -> OperatorParts {
    let dispatcher = |name: &str| {
        dispatchers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
    };
    OperatorParts {
        gateway_id: settings.gateway_id.clone(),
        data_dir: settings.data_dir.clone(),
        wal,
        reader,
        router,
        base_rate: settings.ingest.rate,
        base_log_level: settings.log_level.clone(),
        sinks: settings
            .sinks
            .iter()
            .map(|(n, s)| (n.clone(), (s.dispatch.clone(), dispatcher(n))))
            .collect(),
        runtime,
        log: Arc::new(crate::telemetry::Logs),
        config_text: settings.rendered.clone(),
        base_priority: settings.priority.clone(),
        base_policies: base_policies(settings),
        topics: settings
            .mqtt
            .ingest()
            .map(|c| c.topics.clone())
            .unwrap_or_default(),
        limits: settings.ingest.limits.clone(),
        metrics,
    }
}

impl Application {
    /// Builds everything; must run inside an actix `System`.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        Self::build_with(settings, |_, t| sink_factory(t)).await
    }

    /// Like [`Application::build`] with a custom sink factory (fault injection in tests).
    pub async fn build_with(
        settings: Settings,
        make_sink: impl Fn(&str, &SinkTarget) -> SinkFactory,
    ) -> anyhow::Result<Self> {
        let cert_identity = settings
            .http
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some());
        let auth = match &settings.http.device_tokens_file {
            Some(path) => DeviceAuth::load(path)?,
            // Client certificates are the devices' credentials.
            None if cert_identity => DeviceAuth::Protected,
            None => {
                if !settings.http.addr.ip().is_loopback() {
                    bail!(
                        "refusing to start: no device credentials are configured (http.device_tokens_file) \
                         and http.addr {} is not a loopback address. Create tokens with `gateway token new DEVICE` \
                         or bind to 127.0.0.1",
                        settings.http.addr
                    );
                }
                tracing::warn!(
                    addr = %settings.http.addr,
                    "protected mode: no device credentials configured; accepting unauthenticated ingest on loopback only"
                );
                DeviceAuth::Protected
            }
        };

        // Settings operators changed at run time win over the configuration.
        let runtime = RuntimeOverrides::load(&settings.data_dir)
            .map_err(|e| anyhow::anyhow!("runtime settings: {e}"))?;
        if let Some(level) = &runtime.log_level {
            if let Err(e) = crate::telemetry::Logs.set(level) {
                tracing::warn!(error = %e, "cannot apply the runtime log level");
            }
        }
        if runtime != RuntimeOverrides::default() {
            tracing::info!(overrides = ?runtime, "applying runtime settings from the data dir");
        }
        let admin_token = crate::auth::load_admin_token(&settings)?;
        let admin = AdminAuth::new(
            admin_token.expose(),
            settings
                .http
                .tls
                .as_ref()
                .and_then(|t| t.client_ca_file.as_ref())
                .map(|_| settings.http.admin_cert_cn.clone()),
        );

        let registry = Registry::new();
        let metrics = Metrics::new(&registry).context("registering metrics")?;
        let wal_health = Arc::new(WalHealth::default());
        let mut wal = Wal::open(settings.wal_config())
            .with_context(|| format!("opening the WAL in {}", settings.data_dir.display()))?;
        // Routes and priorities in force (configuration, then runtime
        // settings): the router decides them per record, the WAL drains by them.
        let policies = base_policies(&settings);
        let routing = Arc::new(runtime.routing(&settings.priority, &policies, &wal.sink_bits()));
        for (name, base) in &policies {
            wal.set_policy(name, runtime.policy(name, base))?;
        }
        let reader = WalReader::open(&settings.wal_config().path, 4)?;
        let prometheus = PrometheusMetricsBuilder::new("gateway")
            .registry(registry.clone())
            .endpoint("/metrics")
            .mask_unmatched_patterns("UNKNOWN")
            .build()
            .map_err(|e| anyhow::anyhow!("building HTTP metrics: {e}"))?;
        let listener = TcpListener::bind(settings.http.addr)
            .with_context(|| format!("binding http.addr {}", settings.http.addr))?;
        let port = listener.local_addr()?.port();
        let (tls, server_tls) = match settings.http.tls.as_ref().map(ServerTls::new).transpose()? {
            Some((acceptor, reload)) => (Some(acceptor), Some(reload)),
            None => (None, None),
        };
        #[cfg(feature = "embedded-broker")]
        if let (MqttMode::Embedded { addr, .. }, Some(cfg)) =
            (&settings.mqtt, settings.mqtt.ingest())
        {
            crate::broker::start_embedded(*addr, cfg.conn.max_packet_bytes)?;
        }

        // The fleet's accepted request ids (a replay stays refused across
        // restarts): a data dir where they cannot be kept stops start-up.
        let fleet_seen = settings
            .fleet
            .as_ref()
            .map(|_| SeenIds::open(&settings.data_dir))
            .transpose()
            .map_err(|e| anyhow::anyhow!("fleet: {e}"))?;

        // The local archives' upkeep threads (a thread that cannot start
        // stops start-up).
        let mut keepers = Vec::new();
        for (name, s) in &settings.sinks {
            if let SinkTarget::S3(c) = &s.target {
                if let Some(k) = c.keeper(name) {
                    keepers.push(ArchiveKeeper::start(k, metrics.clone())?);
                }
            }
        }

        // Every step that can fail has run: only now start the actors. An
        // actor started and then dropped unpolled (start-up failed after
        // it) runs its `started` outside the runtime and panics.
        let wal = {
            let (m, h) = (metrics.clone(), wal_health.clone());
            let store = Supervisor::start(move |_| WalStore::new(wal, m, h));
            WalWriter::new(store, wal_health.clone())
        };
        // Parsing, validation and enrichment run on the HTTP worker that
        // read a request, and for MQTT on one router per core (at most 4),
        // each on a thread of its own.
        let router = IngestRouters::start(
            std::thread::available_parallelism().map_or(1, |n| n.get().min(4)),
            IngestCore::new(
                wal.clone(),
                &settings.gateway_id,
                settings.ingest.limits.clone(),
                runtime.rate_limit(settings.ingest.rate),
                routing,
                metrics.clone(),
            ),
        );
        let (mqtt, mqtt_status) = match settings.mqtt.ingest() {
            None => (None, None),
            Some(cfg) => {
                metrics.mqtt_enabled.set(1);
                let status = Arc::new(MqttStatus::default());
                let (c, r, st, m) = (cfg.clone(), router.clone(), status.clone(), metrics.clone());
                tracing::info!(host = %cfg.conn.host, port = cfg.conn.port, tls = cfg.conn.tls.is_some(), client_id = %cfg.conn.client_id, "starting MQTT ingest");
                // Its client (socket reads, packet decoding, acks) runs on a
                // thread of its own, off the thread of the WAL front and the
                // dispatchers.
                let arbiter = actix::Arbiter::new();
                (
                    Some(Supervisor::start_in_arbiter(&arbiter.handle(), move |_| {
                        MqttIngest::new(c, r, st, m)
                    })),
                    Some(status),
                )
            }
        };
        let mut dispatchers = Vec::new();
        let mut sinks = Vec::new();
        for (name, s) in &settings.sinks {
            let factory = make_sink(name, &s.target);
            let sink = {
                let (n, m) = (name.clone(), metrics.clone());
                Supervisor::start(move |_| SinkActor::new(&n, factory, m))
            };
            let disp = {
                let mut cfg = s.dispatch.clone();
                runtime.apply_to(&mut cfg);
                let (w, sk, m) = (wal.clone(), sink.clone(), metrics.clone());
                Supervisor::start(move |_| Dispatcher::new(cfg, w, sk, m))
            };
            sinks.push((name.clone(), sink));
            dispatchers.push((name.clone(), disp));
        }

        // The WAL's growth, for `gateway_wal_full_in_seconds`.
        let m = metrics.clone();
        wal.downgrade()
            .sample_growth(move |s| m.wal_growth.observe(s, &m.wal_full_in_seconds));
        let operator = Arc::new(Operator::new(operator_parts(
            &settings,
            wal.clone(),
            reader,
            Some(router.clone()),
            &dispatchers,
            runtime,
            metrics.clone(),
        )));
        let control = settings.mqtt.ingest().filter(|c| c.control).map(|cfg| {
            let (c, id, op, m) = (
                cfg.clone(),
                settings.gateway_id.clone(),
                operator.clone(),
                metrics.clone(),
            );
            Supervisor::start(move |_| ControlPlane::new(&c, &id, op, m))
        });
        // Config bundles: with the fleet on, in `gateway run` (which read
        // the bundle store before building the settings).
        let (restart, restart_server) = crate::bundles::restarter();
        let bundles = settings
            .fleet
            .as_ref()
            .zip(crate::bundles::context())
            .map(|(cfg, ctx)| {
                Arc::new(Bundles::new(
                    ctx.store.clone(),
                    ctx.boot.state.clone(),
                    crate::bundles::validator(ctx),
                    restart.clone(),
                    cfg.probation,
                    metrics.clone(),
                ))
            });
        let fleet = settings.fleet.clone().zip(fleet_seen).map(|(cfg, seen)| {
            tracing::info!(host = %cfg.conn.host, port = cfg.conn.port, tls = cfg.conn.tls.is_some(), groups = ?cfg.groups, "starting the fleet channel");
            let (op, b, m) = (operator.clone(), bundles.clone(), metrics.clone());
            Supervisor::start(move |_| FleetClient::new(cfg, op, seen, b, m))
        });
        // `tls.reload` and SIGHUP read every TLS file again: HTTPS, the MQTT
        // connections with TLS, and the sinks whose clients read TLS files.
        let mqtt_tls = settings.mqtt.ingest().is_some_and(|c| c.conn.tls.is_some());
        let tls_parts = TlsParts {
            https: server_tls.clone(),
            mqtt: mqtt.clone().filter(|_| mqtt_tls),
            control: control.clone().filter(|_| mqtt_tls),
            fleet: fleet.clone().filter(|_| {
                settings
                    .fleet
                    .as_ref()
                    .is_some_and(|f| f.conn.tls.is_some())
            }),
            sinks: sinks
                .iter()
                .filter(|(name, _)| settings.sinks[name].target.reads_tls_files())
                .cloned()
                .collect(),
        };
        if !tls_parts.is_empty() {
            let parts = tls_parts.clone();
            operator.set_tls_reloader(Some(Arc::new(move || Box::pin(parts.clone().reload()))));
        }
        // SIGHUP is the usual way to tell a daemon "new certificates";
        // without TLS it is logged, never fatal.
        match actix_rt::signal::unix::signal(actix_rt::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                actix_rt::spawn(async move {
                    while hup.recv().await.is_some() {
                        if tls_parts.is_empty() {
                            tracing::info!("SIGHUP: no TLS is configured; nothing to reload");
                        } else if let Err(e) = tls_parts.clone().reload().await {
                            tracing::error!(error = %e, "SIGHUP: TLS files not reloaded; the current ones stay");
                        }
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
        }

        let state = web::Data::new(AppState {
            router: router.clone(),
            auth,
            limits: settings.ingest.limits.clone(),
            wal_health: wal_health.clone(),
            dispatchers: dispatchers.clone(),
            metrics: metrics.clone(),
            mqtt: mqtt_status.clone(),
            admin,
            operator: operator.clone(),
            request_timeout: settings.http.request_timeout,
            cert_identity,
            status: crate::status::StatusSource::started(
                &settings,
                &metrics,
                &mqtt_status,
                bundles.clone(),
            ),
        });

        // A bundle on probation is watched from now on.
        if let (Some(b), Some(ctx)) = (&bundles, crate::bundles::context()) {
            if let Some(candidate) = ctx.boot.layer.clone().filter(|_| ctx.boot.probation) {
                let st = state.clone();
                let ready: gateway_actors::fleet::apply::Ready =
                    Arc::new(move || match http::health::readiness(&st) {
                        Ok(_) => Ok(()),
                        Err((failing, _)) => Err(format!("not ready: {}", failing.join(", "))),
                    });
                actix_rt::spawn(b.clone().run_probation(candidate, operator.clone(), ready));
            }
        }

        // Request spans only when they are exported: without a trace layer
        // nobody reads them, and building one costs every request.
        let traces = gateway_actors::trace::enabled();
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap(from_fn(http::deadline))
                .wrap(from_fn(http::correlation))
                .wrap(prometheus.clone())
                .wrap(Condition::new(
                    traces,
                    tracing_actix_web::TracingLogger::default(),
                ))
                .app_data(state.clone())
                .configure(http::configure)
        })
        .on_connect(peer_certificate_cn)
        .backlog(4096)
        .client_request_timeout(settings.http.request_timeout)
        .client_disconnect_timeout(std::time::Duration::from_secs(1));
        let workers = match settings.http.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // actix counts connections per worker thread (TLS handshakes too).
        let per_worker = settings.http.max_connections.div_ceil(workers).max(1);
        server = server
            .workers(workers)
            .max_connections(per_worker)
            .max_connection_rate(per_worker.min(256));
        let server = match tls {
            Some(tls) => server.listen_openssl(listener, tls)?,
            None => server.listen(listener)?,
        }
        .run();
        if let Ok(mut g) = restart_server.lock() {
            *g = Some(server.handle());
        }
        tracing::info!(
            gateway_id = %settings.gateway_id,
            addr = %settings.http.addr,
            port,
            tls = settings.http.tls.is_some(),
            sinks = ?settings.sinks.keys().collect::<Vec<_>>(),
            data_dir = %settings.data_dir.display(),
            version = env!("CARGO_PKG_VERSION"),
            traces,
            "gateway started"
        );
        Ok(Self {
            port,
            server,
            _keepers: keepers,
            handles: Handles {
                wal,
                router,
                dispatchers,
                sinks,
                wal_health,
                registry,
                mqtt,
                mqtt_status,
                operator,
                control,
                fleet,
            },
        })
    }

    /// The bound HTTP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle that stops the HTTP server.
    pub fn server_handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    /// Serves until the server stops (SIGINT/SIGTERM or a handle), then
    /// stores the sinks' acknowledgements held in memory (`wal.ack_flush`):
    /// after a clean stop a restart delivers nothing again. (The WAL writer
    /// also stores them when its actor stops; this does not race the exit.)
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let res = self.server.await;
        if let Err(e) = self.handles.wal.with(|w| w.flush_acks()).await {
            tracing::warn!(error = %e, "storing the sinks' acknowledgements at stop failed")
        }
        res
    }
}

/// Puts the verified client certificate's names on the connection: its CN
/// (admin auth) and its CN with its DNS subject alternative names (device
/// identity).
fn peer_certificate_cn(conn: &dyn std::any::Any, ext: &mut actix_web::dev::Extensions) {
    use actix_tls::accept::openssl::TlsStream;
    use openssl::nid::Nid;
    let Some(tls) = conn.downcast_ref::<TlsStream<actix_web::rt::net::TcpStream>>() else {
        return;
    };
    let Some(cert) = tls.ssl().peer_certificate() else {
        return;
    };
    let cn = cert
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok());
    let mut names: Vec<String> = cn.iter().cloned().collect();
    if let Some(sans) = cert.subject_alt_names() {
        names.extend(sans.iter().filter_map(|n| n.dnsname().map(str::to_string)));
    }
    if let Some(cn) = cn {
        ext.insert(http::admin::PeerCn(cn));
    }
    ext.insert(http::PeerNames(names));
}

/// Everything that reads TLS files while the gateway runs.
#[derive(Clone, Default)]
struct TlsParts {
    https: Option<Arc<ServerTls>>,
    mqtt: Option<Addr<MqttIngest>>,
    control: Option<Addr<ControlPlane>>,
    fleet: Option<Addr<FleetClient>>,
    sinks: Vec<(String, Addr<SinkActor>)>,
}

impl TlsParts {
    fn is_empty(&self) -> bool {
        self.https.is_none()
            && self.mqtt.is_none()
            && self.control.is_none()
            && self.fleet.is_none()
            && self.sinks.is_empty()
    }

    /// Reloads each part; a part whose files do not load keeps its current
    /// ones. The parts reloaded, or what was refused.
    async fn reload(self) -> Result<Vec<String>, String> {
        let mut done = Vec::new();
        let mut refused = Vec::new();
        let mut note = |part: String, r: Result<bool, String>| match r {
            Ok(true) => done.push(part),
            Ok(false) => {}
            Err(e) => refused.push(format!("{part}: {e}")),
        };
        if let Some(t) = &self.https {
            note("https".into(), t.reload().map(|()| true));
        }
        if let Some(a) = &self.mqtt {
            note("mqtt.ingest".into(), flatten(a.send(ReloadTls).await));
        }
        if let Some(a) = &self.control {
            note("mqtt.control".into(), flatten(a.send(ReloadTls).await));
        }
        if let Some(a) = &self.fleet {
            note("fleet".into(), flatten(a.send(ReloadTls).await));
        }
        for (name, a) in &self.sinks {
            let r = flatten(a.send(Rebuild).await.map(|r| r.map(|()| true)));
            note(format!("sinks.{name}"), r);
        }
        if refused.is_empty() {
            tracing::info!(parts = ?done, "TLS files reloaded");
            Ok(done)
        } else {
            Err(refused.join("; "))
        }
    }
}

fn flatten<T>(r: Result<Result<T, String>, actix::MailboxError>) -> Result<T, String> {
    r.map_err(|e| e.to_string()).and_then(|r| r)
}

/// The HTTPS server's certificate, key and client CA, reloadable while it
/// runs (SIGHUP, control command `tls.reload`): every new connection takes
/// the context current at its ClientHello; open connections keep theirs.
pub struct ServerTls {
    settings: crate::config::TlsSettings,
    current: Arc<std::sync::RwLock<openssl::ssl::SslContext>>,
}

impl ServerTls {
    /// The acceptor built from `tls`, with the reload hook.
    fn new(
        tls: &crate::config::TlsSettings,
    ) -> anyhow::Result<(SslAcceptorBuilder, Arc<ServerTls>)> {
        let ctx = Self::acceptor(tls)?.build().into_context();
        let me = Arc::new(ServerTls {
            settings: tls.clone(),
            current: Arc::new(std::sync::RwLock::new(ctx)),
        });
        let mut b = Self::acceptor(tls)?;
        let current = me.current.clone();
        b.set_client_hello_callback(move |ssl, _alert| {
            let ctx = current
                .read()
                .map_err(|_| openssl::error::ErrorStack::get())?;
            ssl.set_ssl_context(&ctx)?;
            Ok(openssl::ssl::ClientHelloResponse::SUCCESS)
        });
        Ok((b, me))
    }

    fn acceptor(tls: &crate::config::TlsSettings) -> anyhow::Result<SslAcceptorBuilder> {
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())?;
        b.set_private_key_file(&tls.key_file, SslFiletype::PEM)
            .with_context(|| format!("http.tls_key_file {}", tls.key_file.display()))?;
        b.set_certificate_chain_file(&tls.cert_file)
            .with_context(|| format!("http.tls_cert_file {}", tls.cert_file.display()))?;
        b.check_private_key()
            .context("http.tls_key_file does not match http.tls_cert_file")?;
        if let Some(ca) = &tls.client_ca_file {
            b.set_ca_file(ca)
                .with_context(|| format!("http.client_ca_file {}", ca.display()))?;
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
        }
        Ok(b)
    }

    /// Reads the files again; a set that does not load leaves the current
    /// one in place and says why.
    pub fn reload(&self) -> Result<(), String> {
        let ctx = Self::acceptor(&self.settings)
            .map_err(|e| format!("{e:#}"))?
            .build()
            .into_context();
        *self
            .current
            .write()
            .map_err(|_| "TLS context lock poisoned".to_string())? = ctx;
        tracing::info!(
            cert = %self.settings.cert_file.display(),
            "HTTPS certificate, key and client CA reloaded; new connections use them"
        );
        Ok(())
    }
}
