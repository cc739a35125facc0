//! Supervised children: start with their listeners handed down, probe,
//! stop, and explain a child that died.

use super::probe::Probe;
use anyhow::{Context, bail};
use command_fds::{CommandFdExt, FdMapping};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::Command;
use tokio::sync::mpsc;

pub(crate) use minimesh_telemetry::process::{ERROR_PREFIX, SUPERVISED_ENV};
const STOP_GRACE: Duration = Duration::from_secs(10);

/// (child index, generation, exit status)
pub(super) type Exit = (usize, u64, String);

/// One supervised process: how to start it and where it is now.
pub(super) struct Child {
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    pub probe: Probe,
    /// The addresses it listens on; `up` binds them and hands them down.
    listen: Vec<SocketAddr>,
    /// Sockets bound for the next start (the child owns them once started).
    bound: Vec<Option<std::net::TcpListener>>,
    pub pid: Option<u32>,
    pub generation: u64,
    pub started: Instant,
    /// Where this start's output begins in the log.
    log_start: u64,
    pub restarts: u32,
    /// When set, the child is down and will be started again then.
    pub restart_at: Option<Instant>,
    /// A proxy's identity: each start gets a fresh one-time bootstrap token for it.
    bootstrap: Option<String>,
}

impl Child {
    pub(super) fn new(
        name: String,
        args: Vec<String>,
        env: Vec<(String, String)>,
        logs: &Path,
        probe: Probe,
        listeners: Vec<std::net::TcpListener>,
    ) -> anyhow::Result<Self> {
        let listen = listeners
            .iter()
            .map(|l| l.local_addr().context("reading a reserved address"))
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            log: logs.join(format!("{name}.log")),
            name,
            args,
            env,
            probe,
            listen,
            bound: listeners.into_iter().map(Some).collect(),
            pid: None,
            generation: 0,
            started: Instant::now(),
            log_start: 0,
            restarts: 0,
            restart_at: None,
            bootstrap: None,
        })
    }

    /// Gives the child a one-time token for `identity` at every start.
    pub(super) fn with_bootstrap(mut self, identity: String) -> Self {
        self.bootstrap = Some(identity);
        self
    }

    /// Binds again whatever the last start consumed (its addresses are
    /// fixed, so peers' configuration stays valid).
    fn rebind(&mut self) -> anyhow::Result<Vec<OwnedFd>> {
        let mut fds = Vec::with_capacity(self.listen.len());
        for (addr, slot) in self.listen.iter().zip(self.bound.iter_mut()) {
            if slot.is_none() {
                *slot = Some(
                    std::net::TcpListener::bind(addr)
                        .with_context(|| format!("binding {addr} for {}", self.name))?,
                );
            }
        }
        for listener in self.bound.iter_mut().filter_map(Option::take) {
            fds.push(OwnedFd::from(listener));
        }
        Ok(fds)
    }

    /// The error the current start's output ends with, if any.
    pub(super) fn failure(&self) -> Option<String> {
        let text = read_from(&self.log, self.log_start)?;
        failure_line(&text)
    }
}

fn read_from(path: &Path, offset: u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    file.seek(SeekFrom::Start(offset)).ok()?;
    let mut text = String::new();
    file.take(1 << 20).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The child's own error line: what it printed after [`ERROR_PREFIX`], else
/// the message of its last ERROR log record, else its last line of output.
pub(super) fn failure_line(output: &str) -> Option<String> {
    if let Some(line) = output
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(ERROR_PREFIX))
    {
        return Some(line.trim().to_owned());
    }
    let json_error = output.lines().rev().find_map(|line| {
        let record: serde_json::Value = serde_json::from_str(line).ok()?;
        (record["level"] == "ERROR")
            .then(|| record["fields"]["message"].as_str().map(str::to_owned))?
    });
    json_error.or_else(|| {
        output
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim().to_owned())
    })
}

/// How long a bootstrap token stays usable: enough for a slow start.
const BOOTSTRAP_TTL: Duration = Duration::from_secs(300);

/// The executables `up` starts: itself for the services and the issuer, the
/// proxy-only `minimesh-proxy` for sidecars and the gateway.
pub(super) struct Programs {
    minimesh: PathBuf,
    proxy: PathBuf,
}

impl Programs {
    /// `proxy` if given, else `minimesh-proxy` beside this executable if it
    /// is there (`cargo build` makes it; `cargo run` builds only `minimesh`),
    /// else this executable, whose `sidecar` and `gateway` are the same proxy.
    pub(super) fn find(proxy: Option<PathBuf>) -> anyhow::Result<Self> {
        let minimesh = std::env::current_exe().context("finding the minimesh binary")?;
        let proxy = match proxy {
            Some(path) if path.is_file() => path,
            Some(path) => bail!("--proxy-bin {} is not a file", path.display()),
            None => {
                let beside = minimesh.with_file_name("minimesh-proxy");
                if beside.is_file() {
                    beside
                } else {
                    tracing::info!(
                        "no minimesh-proxy beside {}: proxies run as `minimesh sidecar` \
                         (`cargo build --release --bins` builds it)",
                        minimesh.display()
                    );
                    minimesh.clone()
                }
            }
        };
        tracing::info!(proxy = %proxy.display(), "sidecars and the gateway run as");
        Ok(Self { minimesh, proxy })
    }

    fn for_args(&self, args: &[String]) -> &Path {
        match args.first().map(String::as_str) {
            Some("sidecar" | "gateway") => &self.proxy,
            _ => &self.minimesh,
        }
    }
}

pub(super) fn spawn(
    programs: &Programs,
    child: &mut Child,
    index: usize,
    exits: &mpsc::UnboundedSender<Exit>,
    bootstrap: &minimesh_identity::bootstrap::BootstrapKey,
) -> anyhow::Result<()> {
    let fds = child.rebind()?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&child.log)
        .with_context(|| format!("opening log {}", child.log.display()))?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let log_err = log.try_clone().context("duplicating the log handle")?;
    let addrs = child
        .listen
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let count = fds.len();
    let mappings = fds
        .into_iter()
        .enumerate()
        .map(|(i, fd)| FdMapping {
            parent_fd: fd,
            child_fd: 3 + i as i32,
        })
        .collect();
    let mut command = Command::new(programs.for_args(&child.args));
    // Secrets from up's own environment go to no child; the child's own env may set them.
    command
        .env_remove(minimesh_identity::bootstrap::TOKEN_ENV)
        .env_remove(minimesh_identity::bootstrap::KEY_ENV)
        .args(&child.args)
        .envs(child.env.iter().map(|(k, v)| (k, v)))
        .env(SUPERVISED_ENV, "1")
        .env("LISTEN_FDS", count.to_string())
        .env(minimesh_runtime::listen::LISTEN_ADDRS_ENV, addrs)
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDNAMES")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true);
    command
        .fd_mappings(mappings)
        .context("mapping listener sockets")?;
    if let Some(identity) = &child.bootstrap {
        let id: minimesh_certs::SpiffeId = identity
            .parse()
            .with_context(|| format!("the identity of {}", child.name))?;
        command.env(
            minimesh_identity::bootstrap::TOKEN_ENV,
            bootstrap.mint(&id, BOOTSTRAP_TTL),
        );
    }
    let mut process = command
        .spawn()
        .with_context(|| format!("starting {}", child.name))?;
    // `command` (and with it this process's copy of each socket) is dropped
    // below: the child alone holds its listeners, so its death closes them.
    child.generation += 1;
    child.pid = process.id();
    child.started = Instant::now();
    child.log_start = log_start;
    tracing::info!(child = %child.name, pid = child.pid.unwrap_or(0), "started");
    let generation = child.generation;
    let exits = exits.clone();
    tokio::spawn(async move {
        let status = match process.wait().await {
            Ok(status) => status.to_string(),
            Err(err) => format!("wait failed: {err}"),
        };
        let _ = exits.send((index, generation, status));
    });
    Ok(())
}

/// SIGTERM to every running child, then SIGKILL to whatever is left after
/// the grace period.
pub(super) async fn stop_all(children: &mut [Child], exits: &mut mpsc::UnboundedReceiver<Exit>) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for child in children.iter_mut() {
        child.restart_at = None;
        if let Some(pid) = child.pid {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
    }
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while children.iter().any(|c| c.pid.is_some()) {
        match tokio::time::timeout_at(deadline, exits.recv()).await {
            Ok(Some((index, generation, _))) => {
                if children[index].generation == generation {
                    children[index].pid = None;
                }
            }
            Ok(None) => break,
            Err(_) => {
                for child in children.iter().filter(|c| c.pid.is_some()) {
                    tracing::warn!(child = %child.name, "did not stop in time; killing");
                    if let Some(pid) = child.pid {
                        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                    }
                }
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_childs_own_error_line_is_quoted_not_its_backtrace() {
        let output = "{\"level\":\"INFO\",\"fields\":{\"message\":\"listening\"}}\n\
            minimesh: error: binding the admin listener to 127.0.0.1:9: Address already in use (os error 98)\n\
            \n\
            Stack backtrace:\n   0: std::backtrace::Backtrace::capture\n";
        assert_eq!(
            failure_line(output).as_deref(),
            Some("binding the admin listener to 127.0.0.1:9: Address already in use (os error 98)")
        );
        let json = "{\"level\":\"ERROR\",\"fields\":{\"message\":\"store is down\"}}\n{\"level\":\"INFO\",\"fields\":{\"message\":\"bye\"}}\n";
        assert_eq!(failure_line(json).as_deref(), Some("store is down"));
    }
}
