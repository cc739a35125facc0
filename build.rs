//! Embeds build metadata (version and git commit) into the `minimesh` binary.
use std::process::Command;

fn main() {
    // An image build has no .git: the Dockerfile passes the commit instead.
    println!("cargo:rerun-if-env-changed=MINIMESH_GIT_COMMIT");
    let from_env = std::env::var("MINIMESH_GIT_COMMIT")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let commit = from_env.unwrap_or_else(|| git_commit().unwrap_or_else(|| "unknown".to_owned()));
    println!("cargo:rustc-env=MINIMESH_COMMIT={commit}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}

fn git_commit() -> Option<String> {
    Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
