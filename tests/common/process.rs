//! Helpers for tests that run `minimesh up` as a real process.
#![allow(dead_code)]

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A running `minimesh up`; killed (and with it every child) when dropped.
pub(crate) struct Mesh {
    pub child: Child,
    pub data_dir: PathBuf,
    pub ready_line: String,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        // Children die with the supervisor (parent-death signal).
        let _ = self.child.start_kill();
    }
}

pub(crate) async fn start_mesh(data_dir: &Path, extra: &[&str]) -> Mesh {
    start_mesh_with_env(data_dir, extra, &[]).await
}

pub(crate) async fn start_mesh_with_env(
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Mesh {
    spawn_mesh(data_dir, extra, env, Stdio::inherit()).await
}

/// Like [`start_mesh`], with `up`'s own stderr written to `stderr_file`.
pub(crate) async fn start_mesh_logged(data_dir: &Path, extra: &[&str], stderr_file: &Path) -> Mesh {
    let file = std::fs::File::create(stderr_file).expect("create stderr file");
    spawn_mesh(data_dir, extra, &[], Stdio::from(file)).await
}

/// Like [`start_mesh`], with `up` run from `program` (a copy of minimesh elsewhere).
pub(crate) async fn start_mesh_from(program: &Path, data_dir: &Path, extra: &[&str]) -> Mesh {
    spawn_mesh_from(program, data_dir, extra, &[], Stdio::inherit()).await
}

async fn spawn_mesh(data_dir: &Path, extra: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Mesh {
    let program = Path::new(env!("CARGO_BIN_EXE_minimesh"));
    spawn_mesh_from(program, data_dir, extra, env, stderr).await
}

async fn spawn_mesh_from(
    program: &Path,
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
    stderr: Stdio,
) -> Mesh {
    let mut child = Command::new(program)
        .envs(env.iter().copied())
        .arg("up")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--gateway-addr")
        .arg("127.0.0.1:0")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("start minimesh up");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let ready_line = tokio::time::timeout(START_TIMEOUT, async {
        while let Some(line) = lines.next_line().await.expect("read stdout") {
            if line.starts_with("mesh ready") {
                return line;
            }
        }
        panic!("minimesh up exited before it was ready");
    })
    .await
    .expect("mesh ready in time");
    // Keep draining stdout so the supervisor never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Mesh {
        child,
        data_dir: data_dir.to_owned(),
        ready_line,
    }
}

impl Mesh {
    pub(crate) fn mesh_json(&self) -> Value {
        let text =
            std::fs::read_to_string(self.data_dir.join("mesh.json")).expect("read mesh.json");
        serde_json::from_str(&text).expect("mesh.json is JSON")
    }

    /// Instances of one service from mesh.json.
    pub(crate) fn instances(&self, service: &str) -> Vec<Value> {
        self.mesh_json()["instances"]
            .as_array()
            .expect("instances array")
            .iter()
            .filter(|i| i["service"] == service)
            .cloned()
            .collect()
    }

    /// The gateway's h2c URL.
    pub(crate) fn gateway_url(&self) -> String {
        format!(
            "http://{}",
            self.mesh_json()["gateway"]["addr"]
                .as_str()
                .expect("gateway addr")
        )
    }

    /// A connected channel to the gateway.
    pub(crate) async fn gateway_channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.gateway_url())
            .expect("gateway url")
            .connect()
            .await
            .expect("connect to the gateway")
    }

    pub(crate) fn app_url(&self, service: &str) -> String {
        format!(
            "http://{}",
            self.instances(service)[0]["app"]
                .as_str()
                .expect("app addr")
        )
    }

    /// Sends SIGTERM and returns the exit status.
    pub(crate) async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running") as i32;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("signal");
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("up stops within 30s")
            .expect("wait")
    }
}

pub(crate) fn process_alive(pid: i64) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}

pub(crate) async fn health_serving(url: &str) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let Ok(channel) = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
    else {
        return false;
    };
    matches!(
        HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await,
        Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
    )
}

/// Service names listed by server reflection v1alpha (what grpcurl 1.8 speaks).
pub(crate) async fn reflected_services_v1alpha(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect reflection");
    let mut client = ServerReflectionClient::new(channel);
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let describe = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "grpc.reflection.v1.ServerReflection".to_owned(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([list, describe]))
        .await
        .expect("reflection call")
        .into_inner();
    let listed = responses.message().await.expect("answer").expect("one");
    let described = responses.message().await.expect("answer").expect("two");
    assert!(
        matches!(
            described.message_response,
            Some(MessageResponse::FileDescriptorResponse(_))
        ),
        "v1 reflection is described through v1alpha: {described:?}"
    );
    match listed.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// Service names listed by server reflection (v1).
pub(crate) async fn reflected_services(url: &str) -> Vec<String> {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .expect("connect reflection");
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    let response = responses
        .message()
        .await
        .expect("reflection answer")
        .expect("one answer");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

/// The file name of the executable process `pid` runs.
pub(crate) fn executable(pid: &serde_json::Value) -> String {
    let pid = pid.as_i64().expect("a pid");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("the process's executable");
    exe.file_name().unwrap().to_string_lossy().into_owned()
}
