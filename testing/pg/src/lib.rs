//! A private PostgreSQL cluster for one test, from the server binaries of the
//! machine (Debian's `postgresql` package): its own data directory, socket
//! directory and loopback port, removed when dropped, also on panic.
//!
//! Tests call [`PgServer::start`]; without PostgreSQL installed it returns
//! `None` (the test prints why and returns) unless `CI=true`, where a
//! missing server is a failure.

#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A running private PostgreSQL server, stopped and removed when dropped.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
    paused: bool,
}

/// Highest installed PostgreSQL version's binary directory.
fn find_bin() -> Option<PathBuf> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|(_, bin)| bin)
}

impl PgServer {
    /// Starts a server, or returns `None` when PostgreSQL is not installed
    /// and this is not CI.
    pub fn start() -> Option<Self> {
        let Some(bin) = find_bin() else {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!(
                    "PostgreSQL server binaries not found under /usr/lib/postgresql (CI=true): install `postgresql`"
                );
            }
            eprintln!("skipping: PostgreSQL server binaries not found under /usr/lib/postgresql");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("minimesh-pg-")
            .tempdir()
            .expect("temp dir");
        // initdb and postgres refuse to run as root.
        let as_postgres = nix::unistd::geteuid().is_root();
        if as_postgres {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown of the test cluster dir failed");
        }
        let mut server = Self {
            bin,
            dir,
            port: 0,
            as_postgres,
            paused: false,
        };
        let out = server.run(
            "initdb",
            &[
                "-D",
                &server.data().display().to_string(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A port picked then freed may be taken before the server binds it:
        // then pick another (that is the only failure retried here).
        for _ in 0..20 {
            server.port = free_port();
            match server.try_start() {
                Ok(()) => return Some(server),
                Err(log)
                    if log.contains("could not bind") || log.contains("Address already in use") =>
                {
                    continue;
                }
                Err(log) => panic!("PostgreSQL did not start:\n{log}"),
            }
        }
        panic!("PostgreSQL found no free port in 20 tries");
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn run(&self, tool: &str, args: &[&str]) -> Output {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap_or_else(|err| panic!("running {}: {err}", program.display()))
    }

    fn try_start(&self) -> Result<(), String> {
        let _ = std::fs::remove_file(self.log());
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.log().display().to_string(),
                "-o",
                &options,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.log()).unwrap_or_default()
            ))
        }
    }

    /// Its loopback TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for `database` as the superuser, over TCP without TLS.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{database}?sslmode=disable",
            self.port
        )
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        let port = self.port.to_string();
        let out = self.run(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", name],
        );
        assert!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(name)
    }

    /// Fast shutdown: clients are disconnected, the port closes.
    pub fn stop(&mut self) {
        self.resume();
        let out = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        );
        assert!(
            out.status.success(),
            "pg_ctl stop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts again on the same port after [`stop`](Self::stop).
    pub fn restart(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.try_start() {
                Ok(()) => return,
                Err(log) if Instant::now() < deadline && log.contains("could not bind") => {
                    // The old socket may linger in TIME_WAIT-free close; the
                    // port is ours, so wait for the kernel to release it.
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(log) => panic!("PostgreSQL did not restart:\n{log}"),
            }
        }
    }

    /// The postmaster's pid while the server runs.
    pub fn pid(&self) -> Option<i32> {
        let pid_file = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    fn processes(&self) -> Vec<i32> {
        let Some(postmaster) = self.pid() else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<i32>().ok())
                else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                    continue;
                };
                // Field 4, after the parenthesised command name.
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    .and_then(|p| p.parse::<i32>().ok());
                if ppid == Some(postmaster) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    fn signal_all(&self, signal: nix::sys::signal::Signal) {
        for pid in self.processes() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn pause(&mut self) {
        self.signal_all(nix::sys::signal::Signal::SIGSTOP);
        self.paused = true;
    }

    /// Continues a server stopped by `pause`.
    pub fn resume(&mut self) {
        if self.paused {
            self.signal_all(nix::sys::signal::Signal::SIGCONT);
            self.paused = false;
        }
    }

    /// The data directory, for tests that look at the server's files.
    pub fn data_dir(&self) -> PathBuf {
        self.data()
    }

    /// The temporary directory that holds the data and socket directories.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.resume();
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}
