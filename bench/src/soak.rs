//! The soak: mixed unary and streaming traffic through a running mesh's
//! gateway for a long time, one service replica or sidecar killed with
//! SIGKILL at a fixed interval, and every proxy's RSS and open file
//! descriptors sampled at another. What it answers: do the proxies hold on
//! to memory or descriptors as calls, streams and broken connections pile
//! up? `bench/soak.sh` starts the mesh and runs it.

use crate::orders::{order_request, run_token};
use anyhow::Context as _;
use minimesh_proto::order::v1::order_service_client::OrderServiceClient;
use minimesh_proto::order::v1::{
    GetOrderRequest, ListOrdersRequest, OrderStatus, TrackRequest, WatchOrderRequest, track_request,
};
use minimesh_proto::user::v1::user_service_client::UserServiceClient;
use minimesh_proto::user::v1::{CreateUserRequest, GetUserRequest};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tonic::transport::Channel;

/// Deadline of every unary call: a call that outlives it counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a stream may take to see its orders to the end.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// The flags of `minimesh bench soak`.
#[derive(Debug, clap::Args)]
pub struct SoakArgs {
    /// `mesh.json` of a running `minimesh up`: the gateway to call, the processes to sample and kill.
    #[arg(long)]
    pub mesh: PathBuf,
    /// How long to run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    pub duration: Duration,
    /// SIGKILL one replica this often, in turn a service process and a sidecar (0s: never).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub kill_every: Duration,
    /// Sample every proxy's RSS and open descriptors this often.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub sample_every: Duration,
    /// Unary workers: CreateOrder, GetOrder, ListOrders and GetUser in turn.
    #[arg(long, default_value_t = 8)]
    pub unary: usize,
    /// Streaming workers: WatchOrder (server streaming) and TrackOrders (bidirectional) in turn,
    /// each following new orders until they are delivered.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One process's memory and descriptors at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessSample {
    /// The process sampled (a restarted proxy has a new one).
    pub pid: u32,
    /// Resident set size (VmRSS).
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
}

/// Every proxy at one moment, by name (`gateway`, `order-0-sidecar`, …).
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the traffic started.
    pub at_s: u64,
    /// Each proxy's numbers.
    pub proxies: BTreeMap<String, ProcessSample>,
}

/// Calls and streams by kind: successes and errors by gRPC code.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Successes by call (`CreateOrder`, `WatchOrder`, …).
    pub ok: BTreeMap<&'static str, u64>,
    /// Failures by call and gRPC code (`GetUser Unavailable`).
    pub errors: BTreeMap<String, u64>,
    /// Events the streams received.
    pub stream_messages: u64,
}

impl Tally {
    fn ok(&mut self, what: &'static str) {
        *self.ok.entry(what).or_default() += 1;
    }

    fn error(&mut self, what: &'static str, status: &tonic::Status) {
        *self
            .errors
            .entry(format!("{what} {:?}", status.code()))
            .or_default() += 1;
    }
}

/// A proxy whose memory or descriptors kept growing while it lived.
#[derive(Debug, Clone, Serialize)]
pub struct Growth {
    /// The proxy's name.
    pub proxy: String,
    /// Samples of its last life judged.
    pub samples: usize,
    /// RSS at the first of them.
    pub rss_kib_first: u64,
    /// RSS at the last.
    pub rss_kib_last: u64,
    /// The highest RSS among them.
    pub rss_kib_max: u64,
    /// Descriptors at the first.
    pub fds_first: usize,
    /// Descriptors at the last.
    pub fds_last: usize,
}

/// What a soak found, as written to `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// How long the traffic ran.
    pub duration_s: u64,
    /// When which process was killed.
    pub kills: Vec<String>,
    /// Calls and streams by outcome.
    pub traffic: Tally,
    /// Every proxy at every sample.
    pub samples: Vec<Sample>,
    /// Per proxy, over the samples of its last life (its current pid),
    /// skipping the first sample (warm-up).
    pub growth: Vec<Growth>,
    /// "no leak" or "possible leak: …" naming the proxies.
    pub verdict: String,
}

struct MeshView {
    gateway_url: String,
    /// (name, pid) of every proxy.
    proxies: Vec<(String, u32)>,
    /// (name, pid) of every service process and sidecar that may be killed.
    victims: Vec<(String, u32)>,
}

fn read_mesh(path: &Path) -> anyhow::Result<MeshView> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mesh: serde_json::Value = serde_json::from_str(&text).context("parsing mesh.json")?;
    let addr = mesh["gateway"]["addr"]
        .as_str()
        .context("mesh.json has no gateway.addr")?;
    let pid = |v: &serde_json::Value| v.as_u64().and_then(|p| u32::try_from(p).ok());
    let mut proxies = vec![(
        "gateway".to_owned(),
        pid(&mesh["gateway"]["pid"]).context("mesh.json has no gateway.pid")?,
    )];
    let mut victims = Vec::new();
    for instance in mesh["instances"].as_array().into_iter().flatten() {
        let name = format!(
            "{}-{}",
            instance["service"].as_str().unwrap_or("?"),
            instance["replica"]
        );
        if let Some(sidecar) = pid(&instance["sidecar_pid"]) {
            proxies.push((format!("{name}-sidecar"), sidecar));
            victims.push((format!("{name}-sidecar"), sidecar));
        }
        if let Some(service) = pid(&instance["pid"]) {
            victims.push((name, service));
        }
    }
    Ok(MeshView {
        gateway_url: format!("http://{addr}"),
        proxies,
        victims,
    })
}

fn sample_process(pid: u32) -> Option<ProcessSample> {
    let proc = crate::procstat::sample(pid)?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some(ProcessSample {
        pid,
        rss_kib: proc.rss_kib,
        fds,
    })
}

fn kill(pid: u32) -> bool {
    // The bench crate keeps unsafe to a minimum: kill(1) instead of libc::kill.
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}

fn is_terminal(status: i32) -> bool {
    status == OrderStatus::Delivered as i32 || status == OrderStatus::Cancelled as i32
}

async fn new_order(
    orders: &mut OrderServiceClient<Channel>,
    user: &str,
    key: String,
) -> Result<String, tonic::Status> {
    let mut request = tonic::Request::new(order_request(user, key));
    request.set_timeout(CALL_TIMEOUT);
    Ok(orders.create_order(request).await?.into_inner().id)
}

fn timed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

async fn unary_worker(
    channel: Channel,
    user: String,
    token: String,
    worker: usize,
    until: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    let mut orders = OrderServiceClient::new(channel.clone());
    let mut users = UserServiceClient::new(channel);
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let created = new_order(&mut orders, &user, format!("soak-{token}-u{worker}-{n}")).await;
        let mut t = Vec::new();
        match created {
            Ok(id) => {
                t.push(("CreateOrder", Ok(())));
                let got = orders.get_order(timed(GetOrderRequest { id })).await;
                t.push(("GetOrder", got.map(|_| ())));
            }
            Err(status) => t.push(("CreateOrder", Err(status))),
        }
        let listed = orders
            .list_orders(timed(ListOrdersRequest {
                user_id: user.clone(),
                page_size: 20,
                page_token: String::new(),
            }))
            .await;
        t.push(("ListOrders", listed.map(|_| ())));
        let got = users
            .get_user(timed(GetUserRequest { id: user.clone() }))
            .await;
        t.push(("GetUser", got.map(|_| ())));
        let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
        for (what, outcome) in t {
            match outcome {
                Ok(()) => tally.ok(what),
                Err(status) => tally.error(what, &status),
            }
        }
    }
}

/// Follows one new order with WatchOrder until it is delivered.
async fn watch_one(
    orders: &mut OrderServiceClient<Channel>,
    id: String,
) -> Result<u64, tonic::Status> {
    let mut events = orders
        .watch_order(WatchOrderRequest { id })
        .await?
        .into_inner();
    let mut seen = 0;
    while let Some(event) = events.message().await? {
        seen += 1;
        if is_terminal(event.status) {
            return Ok(seen);
        }
    }
    Err(tonic::Status::unknown(
        "the stream ended before the order did",
    ))
}

/// Follows two new orders on one TrackOrders stream until both are delivered.
async fn track_two(
    orders: &mut OrderServiceClient<Channel>,
    ids: [String; 2],
) -> Result<u64, tonic::Status> {
    let (requests, rx) = tokio::sync::mpsc::channel(2);
    for id in &ids {
        let _ = requests
            .send(TrackRequest {
                action: Some(track_request::Action::Watch(id.clone())),
            })
            .await;
    }
    let mut events = orders
        .track_orders(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut open: Vec<String> = ids.to_vec();
    let mut seen = 0;
    while let Some(event) = events.message().await? {
        seen += 1;
        if is_terminal(event.status) {
            open.retain(|id| *id != event.order_id);
            if open.is_empty() {
                drop(requests);
                return Ok(seen);
            }
        }
    }
    Err(tonic::Status::unknown(
        "the stream ended before its orders did",
    ))
}

async fn stream_worker(
    channel: Channel,
    user: String,
    token: String,
    worker: usize,
    until: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    let mut orders = OrderServiceClient::new(channel);
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let key = |i: u32| format!("soak-{token}-s{worker}-{n}-{i}");
        let (what, outcome) = if !n.is_multiple_of(2) {
            let outcome = match new_order(&mut orders, &user, key(0)).await {
                Ok(id) => tokio::time::timeout(STREAM_TIMEOUT, watch_one(&mut orders, id))
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("stream timed out"))),
                Err(status) => Err(status),
            };
            ("WatchOrder", outcome)
        } else {
            let first = new_order(&mut orders, &user, key(1)).await;
            let second = new_order(&mut orders, &user, key(2)).await;
            let outcome = match (first, second) {
                (Ok(a), Ok(b)) => {
                    tokio::time::timeout(STREAM_TIMEOUT, track_two(&mut orders, [a, b]))
                        .await
                        .unwrap_or_else(|_| {
                            Err(tonic::Status::deadline_exceeded("stream timed out"))
                        })
                }
                (Err(status), _) | (_, Err(status)) => Err(status),
            };
            ("TrackOrders", outcome)
        };
        let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Ok(messages) => {
                tally.ok(what);
                tally.stream_messages += messages;
            }
            Err(status) => tally.error(what, &status),
        }
    }
}

/// Growth of each proxy over its last life, and the verdict: a leak is RSS
/// still rising in the second half of that life by more than 10% (and 2
/// MiB), or descriptors up by more than 16 from its first sample.
fn judge(samples: &[Sample]) -> (Vec<Growth>, String) {
    let mut growth = Vec::new();
    let mut leaks = Vec::new();
    let Some(last) = samples.last() else {
        return (growth, "no samples".into());
    };
    for (name, now) in &last.proxies {
        // Its last life, without the first (warm-up) sample.
        let life: Vec<&ProcessSample> = samples
            .iter()
            .filter_map(|s| s.proxies.get(name))
            .filter(|p| p.pid == now.pid)
            .skip(1)
            .collect();
        let (Some(first), Some(latest)) = (life.first(), life.last()) else {
            continue;
        };
        let half = life.len() / 2;
        let first_half_max = life[..half.max(1)]
            .iter()
            .map(|p| p.rss_kib)
            .max()
            .unwrap_or(0);
        let second_half_max = life[half..].iter().map(|p| p.rss_kib).max().unwrap_or(0);
        let g = Growth {
            proxy: name.clone(),
            samples: life.len(),
            rss_kib_first: first.rss_kib,
            rss_kib_last: latest.rss_kib,
            rss_kib_max: life.iter().map(|p| p.rss_kib).max().unwrap_or(0),
            fds_first: first.fds,
            fds_last: latest.fds,
        };
        let rss_rising = life.len() >= 4
            && second_half_max > first_half_max + first_half_max / 10
            && second_half_max > first_half_max + 2048;
        let fds_rising = latest.fds > first.fds + 16;
        if rss_rising || fds_rising {
            leaks.push(format!(
                "{name}: RSS {} → {} KiB, fds {} → {}",
                first.rss_kib, latest.rss_kib, first.fds, latest.fds
            ));
        }
        growth.push(g);
    }
    let verdict = if leaks.is_empty() {
        "no leak: no proxy's RSS rose past its first half's peak by more than 10% and 2 MiB, or its descriptors by more than 16".into()
    } else {
        format!("possible leak: {}", leaks.join("; "))
    };
    (growth, verdict)
}

/// The per-minute table: one row per sample, one column per proxy ("RSS MiB / fds").
pub fn table(report: &SoakReport) -> String {
    let names: Vec<&String> = report
        .samples
        .last()
        .map(|s| s.proxies.keys().collect())
        .unwrap_or_default();
    let mut out = format!(
        "| t (s) | {} |\n|---|{}\n",
        names
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(names.len())
    );
    for sample in &report.samples {
        let cells: Vec<String> = names
            .iter()
            .map(|n| {
                sample.proxies.get(*n).map_or("–".into(), |p| {
                    format!("{:.1} / {}", p.rss_kib as f64 / 1024.0, p.fds)
                })
            })
            .collect();
        out.push_str(&format!("| {} | {} |\n", sample.at_s, cells.join(" | ")));
    }
    out
}

/// Runs the soak against the mesh `args.mesh` describes and prints the report.
pub async fn command(args: SoakArgs) -> anyhow::Result<()> {
    let mesh = read_mesh(&args.mesh)?;
    let channel = tonic::transport::Endpoint::from_shared(mesh.gateway_url.clone())?
        .connect()
        .await
        .with_context(|| format!("connecting to the gateway at {}", mesh.gateway_url))?;
    let token = run_token();
    let mut users = UserServiceClient::new(channel.clone());
    let workers = args.unary + args.streams;
    let mut user_ids = Vec::new();
    for worker in 0..workers {
        let user = users
            .create_user(CreateUserRequest {
                email: format!("soak-{token}-{worker}@example.com"),
                display_name: format!("soak worker {worker}"),
            })
            .await
            .with_context(|| format!("creating the user of worker {worker}"))?;
        user_ids.push(user.into_inner().id);
    }
    let started = Instant::now();
    let until = started + args.duration;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = Vec::new();
    for (worker, user) in user_ids.into_iter().enumerate() {
        let (channel, token, tally) = (channel.clone(), token.clone(), tally.clone());
        tasks.push(if worker < args.unary {
            tokio::spawn(unary_worker(channel, user, token, worker, until, tally))
        } else {
            tokio::spawn(stream_worker(channel, user, token, worker, until, tally))
        });
    }

    let mut samples = Vec::new();
    let mut kills = Vec::new();
    let take_sample = |at: Instant| -> anyhow::Result<Sample> {
        let view = read_mesh(&args.mesh)?;
        let proxies = view
            .proxies
            .iter()
            .filter_map(|(name, pid)| Some((name.clone(), sample_process(*pid)?)))
            .collect();
        Ok(Sample {
            at_s: at.saturating_duration_since(started).as_secs(),
            proxies,
        })
    };
    samples.push(take_sample(Instant::now())?);
    let mut next_sample = started + args.sample_every;
    let mut next_kill = (!args.kill_every.is_zero()).then(|| started + args.kill_every);
    let mut kill_turn = 0usize;
    loop {
        let wake = next_kill
            .map_or(next_sample, |k| k.min(next_sample))
            .min(until);
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        if now >= until {
            break;
        }
        if next_kill.is_some_and(|k| now >= k) {
            let view = read_mesh(&args.mesh)?;
            // Services and sidecars in turn, replica after replica.
            let services: Vec<_> = view
                .victims
                .iter()
                .filter(|(n, _)| !n.ends_with("-sidecar"))
                .collect();
            let sidecars: Vec<_> = view
                .victims
                .iter()
                .filter(|(n, _)| n.ends_with("-sidecar"))
                .collect();
            let pool = if kill_turn.is_multiple_of(2) {
                &services
            } else {
                &sidecars
            };
            if let Some((name, pid)) = pool.get((kill_turn / 2) % pool.len().max(1)) {
                let at = now.saturating_duration_since(started).as_secs();
                if kill(*pid) {
                    eprintln!("soak: {at} s: killed {name} (pid {pid})");
                    kills.push(format!("{at} s: {name}"));
                }
            }
            kill_turn += 1;
            next_kill = Some(now + args.kill_every);
        }
        if now >= next_sample {
            let sample = take_sample(now)?;
            eprintln!(
                "soak: {} s: {}",
                sample.at_s,
                sample
                    .proxies
                    .iter()
                    .map(|(n, p)| format!("{n} {:.1} MiB {} fds", p.rss_kib as f64 / 1024.0, p.fds))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            samples.push(sample);
            next_sample += args.sample_every;
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    // The last sample after the traffic stopped and every call ended.
    samples.push(take_sample(Instant::now())?);
    let (growth, verdict) = judge(&samples);
    let traffic = tally.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let report = SoakReport {
        duration_s: started.elapsed().as_secs(),
        kills,
        traffic,
        samples,
        growth,
        verdict,
    };
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(path) = &args.json {
        std::fs::write(path, &json).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", table(&report));
    println!("traffic: {}", serde_json::to_string(&report.traffic)?);
    println!("kills: {}", report.kills.join(", "));
    println!("verdict: {}", report.verdict);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_s: u64, pid: u32, rss_kib: u64, fds: usize) -> Sample {
        Sample {
            at_s,
            proxies: BTreeMap::from([("gateway".to_owned(), ProcessSample { pid, rss_kib, fds })]),
        }
    }

    #[test]
    fn flat_memory_is_no_leak_and_steady_growth_is_one() {
        let flat: Vec<_> = (0..11)
            .map(|m| sample(m * 60, 7, 15_000 + (m % 2) * 300, 40))
            .collect();
        assert!(judge(&flat).1.starts_with("no leak"), "{}", judge(&flat).1);
        let rising: Vec<_> = (0..11)
            .map(|m| sample(m * 60, 7, 15_000 + m * 1_500, 40))
            .collect();
        assert!(
            judge(&rising).1.starts_with("possible leak"),
            "{}",
            judge(&rising).1
        );
        let fds: Vec<_> = (0..11)
            .map(|m| sample(m * 60, 7, 15_000, 40 + m as usize * 5))
            .collect();
        assert!(
            judge(&fds).1.starts_with("possible leak"),
            "{}",
            judge(&fds).1
        );
    }

    #[test]
    fn a_restarted_proxy_is_judged_on_its_last_life_only() {
        // A restart drops RSS to a new baseline: not growth, and not a leak.
        let mut samples: Vec<_> = (0..5).map(|m| sample(m * 60, 7, 30_000, 60)).collect();
        samples.extend((5..11).map(|m| sample(m * 60, 8, 14_000, 30)));
        let (growth, verdict) = judge(&samples);
        assert!(verdict.starts_with("no leak"), "{verdict}");
        assert_eq!(growth[0].samples, 5);
        assert_eq!(growth[0].rss_kib_first, 14_000);
    }
}
