//! A throwaway mesh CA in a temporary directory, and identities it issues.

use anyhow::Context;
use minimesh_certs::{LeafRequest, init_ca, issue};
use std::path::{Path, PathBuf};

/// A mesh CA in `<dir>/ca`; each identity issued goes to `<dir>/<name>`.
/// The directory is removed when this is dropped.
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    /// A new CA valid for 30 days.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("temporary directory")?;
        init_ca(&dir.path().join("ca"), 30, false).context("create the test CA")?;
        Ok(Self { dir })
    }

    /// The temporary directory, for whatever else a test keeps there.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA directory (`ca.pem`, `ca.key`).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.path().join("ca")
    }

    /// The CA certificate (PEM) clients and proxies trust.
    pub fn ca_pem(&self) -> PathBuf {
        self.ca_dir().join("ca.pem")
    }

    /// Issues (or re-issues) `name`'s certificate and key into `<dir>/<name>`;
    /// returns their paths.
    pub fn issue(&self, name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        issue(
            &self.ca_dir(),
            &LeafRequest::new(name),
            &self.dir.path().join(name),
        )
        .with_context(|| format!("issue {name}"))
    }
}
