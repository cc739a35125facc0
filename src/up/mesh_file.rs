//! Writing `mesh.json`: what it says about every process, and replacing it
//! atomically so readers never see a partial or stale file.

use super::TRUST_DOMAIN;
use super::plan::{Plan, identity, s};
use anyhow::Context;
use serde::Serialize;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Serialize)]
struct MeshJson {
    trust_domain: &'static str,
    ca_dir: PathBuf,
    version: &'static str,
    identity: IssuerEntry,
    gateway: GatewayEntry,
    instances: Vec<InstanceEntry>,
}

#[derive(Serialize)]
struct IssuerEntry {
    addr: String,
    metrics: String,
    pid: u32,
    cert_ttl: String,
    log: PathBuf,
}

#[derive(Serialize)]
struct GatewayEntry {
    addr: String,
    admin: String,
    pid: u32,
    identity: String,
    log: PathBuf,
}

#[derive(Serialize)]
struct InstanceEntry {
    service: &'static str,
    replica: u16,
    pid: u32,
    app: String,
    /// The service's own Prometheus `/metrics` (business counters, span export counts).
    metrics: String,
    sidecar_pid: u32,
    inbound: String,
    outbound: String,
    admin: String,
    identity: String,
    /// The SQLite file, or the PostgreSQL URL without its password.
    db: String,
    log: PathBuf,
    sidecar_log: PathBuf,
}

pub(super) fn mesh_json(plan: &Plan, certs: &Path) -> anyhow::Result<Vec<u8>> {
    let children = &plan.children;
    let pid = |i: usize| children[i].pid.unwrap_or(0);
    let file = MeshJson {
        trust_domain: TRUST_DOMAIN,
        ca_dir: certs.to_owned(),
        version: crate::VERSION,
        identity: IssuerEntry {
            addr: s(plan.issuer_addr),
            metrics: s(plan.issuer_metrics),
            pid: pid(plan.issuer_child),
            cert_ttl: s(humantime::format_duration(plan.cert_ttl)),
            log: children[plan.issuer_child].log.clone(),
        },
        gateway: GatewayEntry {
            addr: s(plan.gateway_addr),
            admin: s(plan.gateway_admin),
            pid: pid(plan.gateway_child),
            identity: identity("gateway"),
            log: children[plan.gateway_child].log.clone(),
        },
        instances: plan
            .instances
            .iter()
            .map(|i| InstanceEntry {
                service: i.service,
                replica: i.replica,
                pid: pid(i.child),
                app: s(i.app),
                metrics: s(i.metrics),
                sidecar_pid: pid(i.sidecar),
                inbound: s(i.inbound),
                outbound: s(i.outbound),
                admin: s(i.admin),
                identity: identity(i.service),
                db: i.db.clone(),
                log: children[i.child].log.clone(),
                sidecar_log: children[i.sidecar].log.clone(),
            })
            .collect(),
    };
    Ok(serde_json::to_vec_pretty(&file)?)
}

/// Writes `mesh.json` atomically; remembers a failed write so the
/// supervisor can try again until the disk takes it.
pub(super) struct MeshFile {
    path: PathBuf,
    pending: Option<Vec<u8>>,
}

impl MeshFile {
    pub(super) fn new(path: PathBuf) -> Self {
        Self {
            path,
            pending: None,
        }
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the file with `contents`; on failure keeps them for [`Self::retry`].
    pub(super) fn write(&mut self, contents: Vec<u8>) -> anyhow::Result<()> {
        self.pending = Some(contents);
        self.retry()
    }

    /// Whether a write is still owed.
    pub(super) fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Tries the owed write again.
    pub(super) fn retry(&mut self) -> anyhow::Result<()> {
        let Some(contents) = &self.pending else {
            return Ok(());
        };
        write_atomically(&self.path, contents)?;
        self.pending = None;
        Ok(())
    }

    /// The mesh has stopped: no file may name its dead pids.
    pub(super) fn remove(&mut self) {
        self.pending = None;
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(tmp_path(&self.path));
    }
}

fn tmp_path(path: &Path) -> PathBuf {
    path.with_extension("json.tmp")
}

/// Replaces `path` with `contents` so readers never see a partial file; a
/// failed attempt leaves no temporary file behind.
fn write_atomically(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = tmp_path(path);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(err) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(err).with_context(|| format!("replacing {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_file_is_removed_with_its_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = MeshFile::new(dir.path().join("mesh.json"));
        file.write(b"{}".to_vec()).unwrap();
        assert!(!file.is_pending());
        assert_eq!(std::fs::read(dir.path().join("mesh.json")).unwrap(), b"{}");
        file.remove();
        assert!(!dir.path().join("mesh.json").exists());
    }
}
