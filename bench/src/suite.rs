//! Every scenario side by side in one invocation: direct calls, the mesh
//! (two sidecars with mTLS between them), the gateway, an HAProxy pair and an
//! nginx pair doing the same job. Scenarios take turns in short rounds so a
//! noisy machine affects them alike; proxies' CPU time and peak memory come
//! from /proc.

use crate::load::{self, Call, Report, Workload};
use crate::procstat;
use anyhow::{Context, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// `minimesh bench suite`: every scenario side by side.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// The binary to run the proxies with, as `sidecar …` and `gateway …`
    /// (default: `minimesh-proxy` beside this binary, as `up` and the chart
    /// run them, else this binary).
    #[arg(long, env = "MINIMESH_PROXY_BIN")]
    pub proxy_bin: Option<PathBuf>,
    /// How long each scenario runs per round.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1500ms")]
    pub round: Duration,
    /// Rounds; every scenario runs once per round, in turn.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// A few hundred milliseconds per scenario, one round: checks the harness, measures nothing.
    #[arg(long)]
    pub smoke: bool,
    /// Where results.json and results.md go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Scenarios to skip (direct, minimesh, minimesh-v, minimesh-b, gateway, haproxy, nginx).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Run only these workloads, by their 1-based position in the plan (e.g. `2,6,10`):
    /// for a quick before/after of one change. The full plan is what BENCHMARKS.md quotes.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<usize>,
    /// A second minimesh binary whose three sidecars run as the scenario
    /// `minimesh-b`, beside the first, against the same backend: a change
    /// measured side by side in one run.
    #[arg(long)]
    pub compare_bin: Option<PathBuf>,
    /// The `--compare-bin` binary predates `--route` (it routes by the
    /// `shop.<name>.vN` path itself, as minimesh did before the proxy knew no protos).
    #[arg(long, requires = "compare_bin")]
    pub compare_without_routes: bool,
    /// Extra sidecar arguments for a third mesh of this binary, the scenario
    /// `minimesh-v` (e.g. "--stream-window 262144 --connection-window 1048576"):
    /// a setting measured side by side with the defaults.
    #[arg(long, allow_hyphen_values = true)]
    pub variant: Option<String>,
}

/// A running process that is killed when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> anyhow::Result<Proc> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut command = Command::new(program);
    // SAFETY: the closure runs between fork and exec and only makes prctl(2),
    // which is async-signal-safe. If the suite is killed outright, its
    // children follow instead of lingering.
    #[allow(unsafe_code)] // std has no safe way to run code between fork and exec
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // The components' own default (info) unless the caller sets RUST_LOG:
        // what users run is what gets measured.
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
        )
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name} ({})", program.display()))?;
    Ok(Proc {
        name: name.to_owned(),
        child,
    })
}

/// Starts a pair of proxies from their configuration files (written to
/// `dir/<name>.conf`, passed by `args(name, path)`); returns their pids.
fn spawn_pair(
    procs: &mut Vec<Proc>,
    dir: &Path,
    program: &Path,
    configs: [(&str, String); 2],
    args: impl Fn(&str, &Path) -> Vec<String>,
) -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for (name, config) in configs {
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, config).with_context(|| format!("writing {}", path.display()))?;
        let proc = spawn(
            name,
            program,
            &args(name, &path),
            &dir.join(format!("{name}.log")),
        )?;
        pids.extend(proc.pid());
        procs.push(proc);
    }
    Ok(pids)
}

/// A loopback port for a process the suite starts. Probing with a bind to
/// port 0 and releasing it raced: the kernel hands the same ephemeral ports
/// to outgoing connections (and to the next probe), and a proxy once failed
/// with "Address already in use". So ports come from below the ephemeral
/// range, and none is given out twice in a run.
fn free_port() -> anyhow::Result<SocketAddr> {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_low.max(10_001));
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let span = u32::from(high - low);
    // Spread by pid, so two suites at once start far apart.
    let start = std::process::id().wrapping_mul(7919) % span;
    for step in 0..span.min(5000) {
        let port = low + ((start + step * 97) % span) as u16;
        if given.contains(&port) {
            continue;
        }
        if let Ok(probe) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            given.insert(port);
            return Ok(probe.local_addr()?);
        }
    }
    anyhow::bail!("no free loopback port between {low} and {high}")
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

struct Scenario {
    name: &'static str,
    target: String,
    /// Proxy processes on the path of calls to PaymentService (unary, bidi)...
    proxies: Vec<u32>,
    /// ...and to OrderService (server streaming), where they differ.
    order_proxies: Option<Vec<u32>>,
}

impl Scenario {
    fn proxies_for(&self, call: Call) -> &[u32] {
        match (call, &self.order_proxies) {
            (Call::ServerStream, Some(order)) => order,
            _ => &self.proxies,
        }
    }
}

#[derive(Debug, Default, Serialize)]
struct Cell {
    report: Report,
    /// CPU seconds of the scenario's proxies together...
    proxy_cpu_seconds: f64,
    /// ...and of each one, in path order.
    proxy_cpu_seconds_each: Vec<f64>,
    proxy_peak_rss_kib: Vec<u64>,
    /// Peak private anonymous memory per proxy, sampled every 20 ms.
    proxy_peak_anon_kib: Vec<u64>,
}

#[derive(Serialize)]
struct Results {
    machine: BTreeMap<String, String>,
    command: String,
    rounds: u32,
    round_seconds: f64,
    workloads: Vec<(Workload, BTreeMap<String, Cell>)>,
}

fn workloads(duration: Duration) -> Vec<Workload> {
    let w = |call, payload, concurrency| Workload {
        call,
        payload,
        concurrency,
        connections: 1,
        rate: None,
        duration,
        count: None,
    };
    vec![
        w(Call::Unary, 100, 1),
        w(Call::Unary, 100, 64),
        // Latency at a steady load, the way Linkerd reports it (2000 RPS):
        // calls start on schedule, so a slow proxy cannot hide its queueing.
        Workload {
            rate: Some(2000.0),
            ..w(Call::Unary, 100, 1)
        },
        w(Call::Unary, 10 * 1024, 1),
        w(Call::Unary, 10 * 1024, 64),
        w(Call::ServerStream, 100, 4),
        w(Call::ServerStream, 10 * 1024, 4),
        w(Call::Bidi, 100, 4),
        w(Call::Bidi, 10 * 1024, 4),
        w(Call::Bidi, 100, 64),
        // The RSS target: 256 concurrent calls, 32 on each of 8 connections
        // (h2load -c 8 -m 32, as the target was first measured).
        Workload {
            connections: 8,
            ..w(Call::Unary, 100, 256)
        },
    ]
}

async fn wait_for(target: &str, what: &str) -> anyhow::Result<()> {
    let probe = Workload {
        call: Call::Unary,
        payload: 10,
        concurrency: 1,
        connections: 1,
        rate: None,
        duration: Duration::from_millis(50),
        count: None,
    };
    for _ in 0..200 {
        if let Ok(report) = load::run(target, &probe).await
            && report.ok > 0
            && report.errors.is_empty()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what} at {target} never answered")
}

fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_default(),
    );
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_default();
    m.insert("cpu".into(), cpu);
    m.insert(
        "kernel".into(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
    );
    m
}

/// The listening addresses of one mesh of three sidecars.
struct MeshAddrs {
    outbound: SocketAddr,
    payment_inbound: SocketAddr,
    order_inbound: SocketAddr,
}

/// How one mesh's sidecars differ from the defaults.
#[derive(Clone, Copy)]
struct Flavor<'a> {
    /// Give the outbound `--route`s (binaries from before it route by path).
    routes: bool,
    /// Further arguments for every sidecar.
    extra: &'a [String],
}

/// Starts order's sidecar (outbound) and the payment and order sidecars
/// (inbound, in front of the backend) from `bin`, their process names
/// prefixed with `prefix`.
fn spawn_mesh(
    procs: &mut Vec<Proc>,
    dir: &Path,
    bin: &Path,
    prefix: &str,
    backend: SocketAddr,
    identity: &dyn Fn(&str) -> Vec<String>,
    flavor: Flavor<'_>,
) -> anyhow::Result<MeshAddrs> {
    let Flavor { routes, extra } = flavor;
    let (pay_in, ord_in, out) = (free_port()?, free_port()?, free_port()?);
    for (service, inbound) in [("payment", pay_in), ("order", ord_in)] {
        let mut a = vec![
            s("sidecar"),
            s("--service"),
            s(service),
            s("--inbound"),
            s(inbound),
            s("--outbound"),
            s(free_port()?),
        ];
        a.extend([
            s("--admin"),
            s(free_port()?),
            s("--app"),
            s(backend),
            s("--allow"),
            s("order,gateway"),
        ]);
        a.extend(identity(service));
        a.extend(extra.iter().cloned());
        let name = format!("{prefix}{service}-inbound");
        procs.push(spawn(&name, bin, &a, &dir.join(format!("{name}.log")))?);
    }
    let mut a = vec![
        s("sidecar"),
        s("--service"),
        s("order"),
        s("--inbound"),
        s(free_port()?),
        s("--outbound"),
        s(out),
    ];
    a.extend([s("--admin"), s(free_port()?), s("--app"), s(free_port()?)]);
    a.extend([
        s("--upstream"),
        format!("payment={pay_in}"),
        s("--upstream"),
        format!("order={ord_in}"),
    ]);
    if routes {
        a.extend([
            s("--route"),
            s("shop.payment.=payment"),
            s("--route"),
            s("shop.order.=order"),
        ]);
    }
    a.extend(identity("order"));
    a.extend(extra.iter().cloned());
    let name = format!("{prefix}order-outbound");
    procs.push(spawn(&name, bin, &a, &dir.join(format!("{name}.log")))?);
    Ok(MeshAddrs {
        outbound: out,
        payment_inbound: pay_in,
        order_inbound: ord_in,
    })
}

/// Runs every scenario and writes results.json and results.md.
pub async fn run(args: SuiteArgs) -> anyhow::Result<()> {
    let this = std::env::current_exe().context("finding the minimesh binary")?;
    let bin = match &args.proxy_bin {
        Some(path) => path.clone(),
        None => Some(this.with_file_name("minimesh-proxy"))
            .filter(|beside| beside.is_file())
            .unwrap_or_else(|| this.clone()),
    };
    eprintln!("proxies run as {}", bin.display());
    let (round, rounds) = if args.smoke {
        (Duration::from_millis(300), 1)
    } else {
        (args.round, args.rounds.max(1))
    };
    let work = tempfile::tempdir().context("creating a scratch directory")?;
    let dir = work.path();
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;

    // Credentials: the mesh CA and the identities both proxy pairs use.
    let ca = dir.join("ca");
    minimesh_certs::init_ca(&ca, 2, false)?;
    let mut files = BTreeMap::new();
    for name in ["order", "payment", "gateway"] {
        let (cert, key) = minimesh_certs::issue(
            &ca,
            &minimesh_certs::LeafRequest::new(name),
            &dir.join(name),
        )?;
        files.insert(name, (cert, key));
    }
    let ca_pem = ca.join(minimesh_certs::CA_CERT);
    let identity = |name: &str| -> Vec<String> {
        let (cert, key) = &files[name];
        vec![
            s("--ca"),
            s(ca_pem.display()),
            s("--cert"),
            s(cert.display()),
            s("--key"),
            s(key.display()),
        ]
    };

    let mut procs: Vec<Proc> = Vec::new();
    let backend = free_port()?;
    procs.push(spawn(
        "backend",
        &this,
        &[s("bench"), s("backend"), s("--listen"), s(backend)],
        &dir.join("backend.log"),
    )?);
    let mut scenarios = vec![Scenario {
        name: "direct",
        target: format!("http://{backend}"),
        proxies: vec![],
        order_proxies: None,
    }];

    // minimesh: order's sidecar (outbound) → mTLS → payment's (or order's) sidecar (inbound) → backend.
    let mesh = spawn_mesh(
        &mut procs,
        dir,
        &bin,
        "",
        backend,
        &identity,
        Flavor {
            routes: true,
            extra: &[],
        },
    )?;
    let (pay_in, ord_in) = (mesh.payment_inbound, mesh.order_inbound);
    let mesh_b = match &args.compare_bin {
        Some(other) => Some(spawn_mesh(
            &mut procs,
            dir,
            other,
            "b-",
            backend,
            &identity,
            Flavor {
                routes: !args.compare_without_routes,
                extra: &[],
            },
        )?),
        None => None,
    };
    let mesh_v = match &args.variant {
        Some(extra) => {
            let extra: Vec<String> = extra.split_whitespace().map(str::to_owned).collect();
            Some(spawn_mesh(
                &mut procs,
                dir,
                &bin,
                "v-",
                backend,
                &identity,
                Flavor {
                    routes: true,
                    extra: &extra,
                },
            )?)
        }
        None => None,
    };
    let gateway = free_port()?;
    let mut g = vec![
        s("gateway"),
        s("--listen"),
        s(gateway),
        s("--admin"),
        s(free_port()?),
    ];
    g.extend([
        s("--upstream"),
        format!("payment={pay_in}"),
        s("--upstream"),
        format!("order={ord_in}"),
        s("--route"),
        s("shop.payment.=payment"),
        s("--route"),
        s("shop.order.=order"),
        // The benchmark backend stands in for payment, so the edge serves it.
        s("--expose"),
        s("payment,order"),
    ]);
    g.extend(identity("gateway"));
    procs.push(spawn("gateway", &bin, &g, &dir.join("gateway.log"))?);
    let pid =
        |procs: &[Proc], name: &str| procs.iter().find(|p| p.name == name).and_then(Proc::pid);
    let path = |first: &str, second: &str| -> Vec<u32> {
        [first, second]
            .iter()
            .filter_map(|n| pid(&procs, n))
            .collect()
    };
    scenarios.push(Scenario {
        name: "minimesh",
        target: format!("http://{}", mesh.outbound),
        proxies: path("order-outbound", "payment-inbound"),
        order_proxies: Some(path("order-outbound", "order-inbound")),
    });
    if let Some(v) = &mesh_v {
        scenarios.push(Scenario {
            name: "minimesh-v",
            target: format!("http://{}", v.outbound),
            proxies: path("v-order-outbound", "v-payment-inbound"),
            order_proxies: Some(path("v-order-outbound", "v-order-inbound")),
        });
    }
    if let Some(b) = &mesh_b {
        scenarios.push(Scenario {
            name: "minimesh-b",
            target: format!("http://{}", b.outbound),
            proxies: path("b-order-outbound", "b-payment-inbound"),
            order_proxies: Some(path("b-order-outbound", "b-order-inbound")),
        });
    }
    scenarios.push(Scenario {
        name: "gateway",
        target: format!("http://{gateway}"),
        proxies: path("gateway", "payment-inbound"),
        order_proxies: Some(path("gateway", "order-inbound")),
    });

    // HAProxy and nginx pairs, when installed (bench/run.sh installs them).
    let (cert, key) = &files["payment"];
    let (client_cert, client_key) = &files["order"];
    let combined = |cert: &Path, key: &Path, out: &Path| -> anyhow::Result<()> {
        let mut pem = std::fs::read(cert)?;
        pem.extend(std::fs::read(key)?);
        std::fs::write(out, pem)?;
        Ok(())
    };
    if let Some(haproxy) = which("haproxy") {
        combined(cert, key, &dir.join("server.pem"))?;
        combined(client_cert, client_key, &dir.join("client.pem"))?;
        let (a_port, b_port) = (free_port()?, free_port()?);
        // http-no-delay: streams are interactive, do not wait to fill buffers.
        let defaults = "defaults\n  mode http\n  option http-no-delay\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";
        let a_cfg = format!(
            "global\n  maxconn 4000\n{defaults}frontend edge\n  bind {a_port} proto h2\n  default_backend mesh\nbackend mesh\n  server b {b_port} ssl verify required ca-file {ca} crt {client} alpn h2 sni str(payment) verifyhost payment\n",
            ca = ca_pem.display(),
            client = dir.join("client.pem").display()
        );
        let b_cfg = format!(
            "global\n  maxconn 4000\n{defaults}frontend mesh\n  bind {b_port} ssl crt {server} ca-file {ca} verify required alpn h2\n  default_backend app\nbackend app\n  server app {backend} proto h2\n",
            ca = ca_pem.display(),
            server = dir.join("server.pem").display()
        );
        let pids = spawn_pair(
            &mut procs,
            dir,
            &haproxy,
            [("haproxy-a", a_cfg), ("haproxy-b", b_cfg)],
            |_, config| vec![s("-db"), s("-f"), s(config.display())],
        )?;
        scenarios.push(Scenario {
            name: "haproxy",
            target: format!("http://{a_port}"),
            proxies: pids,
            order_proxies: None,
        });
    } else {
        eprintln!("haproxy not installed: skipping the HAProxy pair");
    }
    if let Some(nginx) = which("nginx") {
        let (a_port, b_port) = (free_port()?, free_port()?);
        let common = |name: &str| {
            let base = dir.join(name);
            let _ = std::fs::create_dir_all(&base);
            format!(
                "master_process off;\ndaemon off;\npid {base}/nginx.pid;\nerror_log {base}/error.log warn;\nevents {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {base}/body;\n  proxy_temp_path {base}/proxy;\n  fastcgi_temp_path {base}/fastcgi;\n  uwsgi_temp_path {base}/uwsgi;\n  scgi_temp_path {base}/scgi;\n  http2_max_requests 100000000;\n  keepalive_requests 100000000;\n",
                base = base.display()
            )
        };
        let a_cfg = format!(
            "{}  upstream mesh {{ server {b_port}; keepalive 64; }}\n  server {{\n    listen {a_port} http2;\n    location / {{\n      grpc_pass grpcs://mesh;\n      grpc_ssl_certificate {cert};\n      grpc_ssl_certificate_key {key};\n      grpc_ssl_trusted_certificate {ca};\n      grpc_ssl_verify on;\n      grpc_ssl_name payment;\n      grpc_ssl_server_name on;\n      grpc_ssl_protocols TLSv1.3;\n      grpc_read_timeout 60s;\n      grpc_send_timeout 60s;\n    }}\n  }}\n}}\n",
            common("nginx-a"),
            cert = client_cert.display(),
            key = client_key.display(),
            ca = ca_pem.display()
        );
        let b_cfg = format!(
            "{}  upstream app {{ server {backend}; keepalive 64; }}\n  server {{\n    listen {b_port} ssl http2;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n    ssl_client_certificate {ca};\n    ssl_verify_client on;\n    ssl_protocols TLSv1.3;\n    location / {{\n      grpc_pass grpc://app;\n      grpc_read_timeout 60s;\n      grpc_send_timeout 60s;\n    }}\n  }}\n}}\n",
            common("nginx-b"),
            cert = cert.display(),
            key = key.display(),
            ca = ca_pem.display()
        );
        let pids = spawn_pair(
            &mut procs,
            dir,
            &nginx,
            [("nginx-a", a_cfg), ("nginx-b", b_cfg)],
            |name, config| {
                vec![
                    s("-c"),
                    s(config.display()),
                    s("-e"),
                    s(dir.join(name).join("startup.log").display()),
                ]
            },
        )?;
        scenarios.push(Scenario {
            name: "nginx",
            target: format!("http://{a_port}"),
            proxies: pids,
            order_proxies: None,
        });
    } else {
        eprintln!("nginx not installed: skipping the nginx pair");
    }
    scenarios.retain(|sc| !args.skip.iter().any(|skip| skip == sc.name));

    for scenario in &scenarios {
        if let Err(err) = wait_for(&scenario.target, scenario.name).await {
            // Keep the configs and logs for a look.
            let kept = work.keep();
            bail!("{err}; configs and logs kept in {}", kept.display());
        }
    }

    let mut plan = workloads(round);
    if !args.only.is_empty() {
        let total = plan.len();
        let mut position = 0;
        plan.retain(|_| {
            position += 1;
            args.only.contains(&position)
        });
        if plan.is_empty() {
            bail!(
                "--only {:?} names no workload (there are {total})",
                args.only
            );
        }
    }
    let mut cells: Vec<BTreeMap<String, Cell>> = plan.iter().map(|_| BTreeMap::new()).collect();
    for round_no in 0..rounds {
        for (w, workload) in plan.iter().enumerate() {
            for scenario in &scenarios {
                let proxies = scenario.proxies_for(workload.call);
                let before: Vec<f64> = proxies
                    .iter()
                    .map(|&p| {
                        procstat::reset_peak(p);
                        procstat::sample(p).map(|x| x.cpu_seconds).unwrap_or(0.0)
                    })
                    .collect();
                let anon = procstat::AnonPeaks::start(proxies);
                let report = load::run(&scenario.target, workload).await?;
                let anon = anon.finish();
                let after: Vec<procstat::ProcSample> = proxies
                    .iter()
                    .map(|&p| procstat::sample(p).unwrap_or_default())
                    .collect();
                let cell = cells[w].entry(scenario.name.to_owned()).or_default();
                let used: Vec<f64> = after
                    .iter()
                    .zip(&before)
                    .map(|(a, b)| (a.cpu_seconds - b).max(0.0))
                    .collect();
                cell.proxy_cpu_seconds += used.iter().sum::<f64>();
                cell.proxy_cpu_seconds_each.resize(used.len(), 0.0);
                for (total, more) in cell.proxy_cpu_seconds_each.iter_mut().zip(&used) {
                    *total += more;
                }
                // The highest peak any round of this workload reached.
                cell.proxy_peak_rss_kib.resize(after.len(), 0);
                for (peak, sample) in cell.proxy_peak_rss_kib.iter_mut().zip(&after) {
                    *peak = (*peak).max(sample.peak_rss_kib);
                }
                cell.proxy_peak_anon_kib.resize(anon.len(), 0);
                for (peak, sampled) in cell.proxy_peak_anon_kib.iter_mut().zip(&anon) {
                    *peak = (*peak).max(*sampled);
                }
                if cell.report.elapsed_s == 0.0 && cell.report.ok == 0 {
                    cell.report = report;
                } else {
                    cell.report.merge(&report);
                }
                eprintln!(
                    "round {}/{rounds} {:?} {}B c={} {:>9}: {:>10.0}/s",
                    round_no + 1,
                    workload.call,
                    workload.payload,
                    workload.concurrency,
                    scenario.name,
                    cell.report.per_second
                );
            }
        }
    }
    drop(procs);

    let results = Results {
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        rounds,
        round_seconds: round.as_secs_f64(),
        workloads: plan.into_iter().zip(cells).collect(),
    };
    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(args.out.join("results.json"), json)?;
    let table = markdown(&results);
    std::fs::write(args.out.join("results.md"), &table)?;
    println!("{table}");
    Ok(())
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

fn markdown(results: &Results) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Machine: {} cores, {}, Linux {}. {} round(s) of {:.1} s per scenario and workload, scenarios interleaved.\n\n",
        results.machine.get("cores").cloned().unwrap_or_default(),
        results.machine.get("cpu").cloned().unwrap_or_default(),
        results.machine.get("kernel").cloned().unwrap_or_default(),
        results.rounds,
        results.round_seconds
    ));
    for (workload, cells) in &results.workloads {
        let kind = match workload.call {
            Call::Unary => "unary calls/s",
            Call::ServerStream => "server-stream msgs/s",
            Call::Bidi => "bidi msgs/s",
        };
        let load = match workload.rate {
            Some(rate) => format!("open loop at {rate:.0} calls/s"),
            None if workload.connections > 1 => format!(
                "concurrency {} over {} connections",
                workload.concurrency, workload.connections
            ),
            None => format!("concurrency {}", workload.concurrency),
        };
        out.push_str(&format!(
            "### {:?}, {} B, {load}\n\n",
            workload.call, workload.payload
        ));
        out.push_str(&format!("| scenario | {kind} | × direct | mean µs | p50 µs | p99 µs | p99.9 µs | errors | proxy CPU s | done per proxy CPU-s | × HAProxy | proxy peak RSS MiB | proxy peak anon MiB |\n"));
        out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n");
        let direct = cells
            .get("direct")
            .map(|c| c.report.per_second)
            .unwrap_or(0.0);
        let efficiency = |c: &Cell| {
            if c.proxy_cpu_seconds > 0.0 {
                c.report.ok as f64 / c.proxy_cpu_seconds
            } else {
                0.0
            }
        };
        let haproxy = cells.get("haproxy").map(efficiency).unwrap_or(0.0);
        for (name, cell) in cells {
            let r = &cell.report;
            let (mean, p50, p99, p999) = r
                .latency
                .as_ref()
                .map(|l| {
                    (
                        format!("{:.0}", l.mean_us),
                        l.p50_us.to_string(),
                        l.p99_us.to_string(),
                        l.p999_us.to_string(),
                    )
                })
                .unwrap_or_default();
            let errors: u64 = r.errors.values().sum();
            let per_cpu = efficiency(cell);
            let rss = cell
                .proxy_peak_rss_kib
                .iter()
                .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" + ");
            let anon = cell
                .proxy_peak_anon_kib
                .iter()
                .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" + ");
            out.push_str(&format!(
                "| {name} | {:.0} | {} | {mean} | {p50} | {p99} | {p999} | {errors} | {:.2} | {} | {} | {} | {} |\n",
                r.per_second,
                if direct > 0.0 { format!("{:.2}", r.per_second / direct) } else { "-".into() },
                cell.proxy_cpu_seconds,
                if per_cpu > 0.0 { format!("{per_cpu:.0}") } else { "-".into() },
                if haproxy > 0.0 && per_cpu > 0.0 { format!("{:.2}", per_cpu / haproxy) } else { "-".into() },
                if rss.is_empty() { "-".into() } else { rss },
                if anon.is_empty() { "-".into() } else { anon },
            ));
        }
        out.push('\n');
    }
    out.push_str(&targets(results));
    out
}

/// The three proxy targets, read off this run's cells.
fn targets(results: &Results) -> String {
    let find = |call: Call, payload: usize, concurrency: usize, connections: usize| {
        results.workloads.iter().find(|(w, _)| {
            w.call == call
                && w.payload == payload
                && w.concurrency == concurrency
                && w.connections == connections
                && w.rate.is_none()
        })
    };
    let verdict = |met: bool| if met { "met" } else { "missed" };
    let mut out = String::from("### Targets\n\n| target | this run | |\n|---|---|---|\n");
    if let Some((_, cells)) = find(Call::Unary, 100, 1, 1) {
        let mean = |name: &str| {
            cells
                .get(name)
                .and_then(|c| c.report.latency.as_ref())
                .map(|l| l.mean_us)
        };
        if let (Some(direct), Some(mesh)) = (mean("direct"), mean("minimesh")) {
            let added = mesh - direct;
            let haproxy = mean("haproxy").map_or(String::new(), |h| {
                format!(" (HAProxy pair +{:.0} µs)", h - direct)
            });
            out.push_str(&format!(
                "| added mean latency, 100 B unary at c=1 ≤ 150 µs | +{added:.0} µs ({mesh:.0} vs {direct:.0}){haproxy} | {} |\n",
                verdict(added <= 150.0)
            ));
        }
    }
    let per_cpu =
        |c: &Cell| (c.proxy_cpu_seconds > 0.0).then(|| c.report.ok as f64 / c.proxy_cpu_seconds);
    let mut ratios = Vec::new();
    for (w, cells) in &results.workloads {
        if w.call != Call::Unary {
            continue;
        }
        let mesh = cells.get("minimesh").and_then(per_cpu);
        let haproxy = cells.get("haproxy").and_then(per_cpu);
        if let (Some(mesh), Some(haproxy)) = (mesh, haproxy) {
            let load = match w.rate {
                Some(rate) => format!("{rate:.0}/s"),
                None => format!("c={}", w.concurrency),
            };
            ratios.push((format!("{} B {load}", w.payload), mesh / haproxy));
        }
    }
    if !ratios.is_empty() {
        let worst = ratios.iter().map(|(_, r)| *r).fold(f64::INFINITY, f64::min);
        let each: Vec<String> = ratios
            .iter()
            .map(|(what, r)| format!("{what}: {r:.2}×"))
            .collect();
        out.push_str(&format!(
            "| unary calls per CPU-second of both sidecars ≥ 1.25× the HAProxy pair's | {} | {} |\n",
            each.join(", "),
            verdict(worst >= 1.25)
        ));
    }
    if let Some((_, cells)) = find(Call::Unary, 100, 256, 8)
        && let Some(mesh) = cells.get("minimesh")
        && let Some(peak) = mesh.proxy_peak_rss_kib.iter().max()
    {
        let mib = |k: &u64| format!("{:.1}", *k as f64 / 1024.0);
        out.push_str(&format!(
            "| each sidecar's peak RSS with 256 concurrent streams (unary, 8 connections × 32) ≤ 15 MiB | {} MiB (private anon {} MiB) | {} |\n",
            mesh.proxy_peak_rss_kib.iter().map(mib).collect::<Vec<_>>().join(" + "),
            mesh.proxy_peak_anon_kib.iter().map(mib).collect::<Vec<_>>().join(" + "),
            verdict(*peak as f64 / 1024.0 <= 15.0)
        ));
    }
    out.push('\n');
    out
}
