//! A private PostgreSQL server for one test: its own cluster in a temporary
//! directory, listening on 127.0.0.1 only, on a free port, with trust auth.
//! Dropping it stops the server and removes every file, also when the test
//! panics.
//!
//! The postmaster is run directly (not through `pg_ctl`) so that the test
//! owns its process: `stop`, `pause` and `Drop` signal it by pid.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a start (initdb excluded) may take before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Ports to try when the one picked is taken before the server binds it.
const PORT_ATTEMPTS: usize = 10;

pub struct PgServer {
    bin: PathBuf,
    /// Holds `data/`, `sock/` and `server.log`; removed on drop.
    dir: tempfile::TempDir,
    port: u16,
    postmaster: Option<Child>,
    /// Processes stopped by `pause`, continued by `resume` or on drop.
    paused: Vec<i32>,
    /// The `postgres` user's uid and gid, when the tests run as root
    /// (initdb and postgres refuse to run as root).
    owner: Option<(u32, u32)>,
}

/// Where the server binaries are: `MINIMESH_TEST_PG_BIN`, or the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout).
fn find_bin() -> Option<PathBuf> {
    let complete = |dir: &Path| {
        ["initdb", "postgres", "pg_isready"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("MINIMESH_TEST_PG_BIN") {
        let dir = PathBuf::from(dir);
        return complete(&dir).then_some(dir);
    }
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            (version >= 15 && complete(&bin)).then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

/// uid and gid of `name` from /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() > 3 && fields[0] == name)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// A port that was free a moment ago (the server may still lose it to
/// another test: see `start_postmaster`).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
}

fn signal(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

/// Direct children of `pid` (the postmaster's backends and workers).
fn children(pid: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|child| {
            // Field 4 of /proc/PID/stat, after the parenthesised command name.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 2..];
                    rest.split(' ').nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

enum StartError {
    /// The port was taken between picking it and the server binding it.
    PortTaken,
    Failed(String),
}

impl PgServer {
    /// Creates and starts a cluster. `None` (after printing why) when no
    /// PostgreSQL server binaries are installed; under CI that panics
    /// instead, since CI must run these tests.
    pub async fn start() -> Option<Self> {
        let Some(bin) = find_bin() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "PostgreSQL 15 server binaries not found in /usr/lib/postgresql/*/bin \
                 (.ci/run installs Debian's postgresql package)"
            );
            eprintln!(
                "skipping: PostgreSQL 15 server binaries not found \
                 (/usr/lib/postgresql/*/bin; install Debian's postgresql package)"
            );
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("minimesh-pg-")
            .tempdir()
            .expect("tempdir");
        // The directory is ours: uid 0 means we run as root.
        let root = std::os::unix::fs::MetadataExt::uid(&dir.path().metadata().expect("stat")) == 0;
        let owner = if root {
            let ids = user_ids("postgres").expect(
                "running as root needs a `postgres` user to run the server as \
                 (Debian's postgresql package creates it)",
            );
            std::os::unix::fs::chown(dir.path(), Some(ids.0), Some(ids.1))
                .expect("hand the cluster directory to postgres");
            Some(ids)
        } else {
            None
        };
        let mut server = Self {
            bin,
            dir,
            port: 0,
            postmaster: None,
            paused: Vec::new(),
            owner,
        };
        server.initdb().await;
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port();
            match server.start_postmaster().await {
                Ok(()) => return Some(server),
                Err(StartError::PortTaken) => continue,
                Err(StartError::Failed(why)) => panic!("PostgreSQL did not start: {why}"),
            }
        }
        panic!("PostgreSQL found no free port in {PORT_ATTEMPTS} attempts");
    }

    /// A URL for database `dbname` on this server (user `postgres`, trusted).
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's directory (data, sockets, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    pub async fn create_database(&self, name: &str) {
        let out = tokio::process::Command::new(self.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", name])
            .output()
            .await
            .expect("run createdb");
        assert!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Fast shutdown (clients are disconnected), waiting until the server
    /// has exited.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.postmaster.take() else {
            return;
        };
        self.resume();
        signal(child.id() as i32, nix::sys::signal::Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().expect("wait for postgres").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("PostgreSQL took over 30 s to shut down");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops (if running) and starts the server again on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        match self.start_postmaster().await {
            Ok(()) => {}
            Err(StartError::PortTaken) => panic!(
                "PostgreSQL could not restart: port {} was taken meanwhile",
                self.port
            ),
            Err(StartError::Failed(why)) => panic!("PostgreSQL did not restart: {why}"),
        }
    }

    /// Freezes the server (SIGSTOP to the postmaster and every child): a
    /// store that hangs instead of refusing connections.
    pub fn pause(&mut self) {
        let Some(postmaster) = &self.postmaster else {
            panic!("pause: PostgreSQL is not running");
        };
        let pid = postmaster.id() as i32;
        // The postmaster first, so it forks no new child meanwhile.
        signal(pid, nix::sys::signal::Signal::SIGSTOP);
        self.paused.push(pid);
        for child in children(pid) {
            signal(child, nix::sys::signal::Signal::SIGSTOP);
            self.paused.push(child);
        }
    }

    /// Continues every process `pause` stopped.
    pub fn resume(&mut self) {
        for pid in self.paused.drain(..) {
            signal(pid, nix::sys::signal::Signal::SIGCONT);
        }
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// `program` from the server's bin dir, run as `postgres` when we are root.
    /// setpriv execs it in place, so the child's pid is the program's own.
    fn as_owner(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        match self.owner {
            Some((uid, gid)) => {
                let mut command = Command::new("setpriv");
                command
                    .arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .args(["--clear-groups", "--"])
                    .arg(program);
                command
            }
            None => Command::new(program),
        }
    }

    async fn initdb(&self) {
        let mut command = self.as_owner("initdb");
        command
            .arg("-D")
            .arg(self.data_dir())
            .args(["-U", "postgres", "--auth=trust", "--no-sync"])
            .args(["--encoding=UTF8", "--locale=C"])
            .stdin(Stdio::null());
        let out = tokio::process::Command::from(command)
            .output()
            .await
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts the postmaster on `self.port` and waits until it accepts
    /// connections (pg_isready), or until it exits.
    async fn start_postmaster(&mut self) -> Result<(), StartError> {
        let sockets = self.dir.path().join("sock");
        if !sockets.exists() {
            std::fs::create_dir(&sockets).expect("create the socket dir");
            if let Some((uid, gid)) = self.owner {
                std::os::unix::fs::chown(&sockets, Some(uid), Some(gid)).expect("chown sock");
            }
        }
        let mut log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the server log");
        let log_start = log.seek(SeekFrom::End(0)).expect("log position");
        let child = self
            .as_owner("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", sockets.display()))
            // A test cluster: durability does not matter, speed does.
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            // Several meshes of replicas, each with its connection pools.
            .args(["-c", "max_connections=300"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log.try_clone().expect("log fd"))
            .spawn()
            .expect("start postgres");
        self.postmaster = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let exited = self
                .postmaster
                .as_mut()
                .expect("postmaster")
                .try_wait()
                .expect("poll postgres");
            if let Some(status) = exited {
                self.postmaster = None;
                let mut text = String::new();
                let mut log = File::open(self.log_path()).expect("open the server log");
                log.seek(SeekFrom::Start(log_start)).expect("seek log");
                log.read_to_string(&mut text).expect("read the server log");
                return Err(if text.contains("could not bind") {
                    StartError::PortTaken
                } else {
                    StartError::Failed(format!("postgres exited with {status}:\n{text}"))
                });
            }
            if self.is_ready().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StartError::Failed(format!(
                    "not ready after {READY_TIMEOUT:?}:\n{}",
                    self.log()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn is_ready(&self) -> bool {
        tokio::process::Command::new(self.bin.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-t", "1"])
            .status()
            .await
            .is_ok_and(|s| s.success())
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.resume();
        if let Some(mut child) = self.postmaster.take() {
            let pid = child.id() as i32;
            signal(pid, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                // Backends exit by themselves once their postmaster is gone.
                let stragglers = children(pid);
                let _ = child.kill();
                let _ = child.wait();
                for straggler in stragglers {
                    signal(straggler, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        // `dir` (a TempDir) removes the cluster's files.
    }
}
