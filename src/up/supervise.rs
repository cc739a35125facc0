//! Supervising: start every child, say when the mesh is ready, restart a
//! child that dies (backing off while it keeps dying), keep `mesh.json`
//! naming live pids, and stop everything on a shutdown signal.

use super::MESH_FILE_RETRY;
use super::child::{self, Exit, Programs};
use super::mesh_file::{MeshFile, mesh_json};
use super::plan::Plan;
use super::probe;
use anyhow::bail;
use minimesh_identity::bootstrap::BootstrapKey;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Runs the planned mesh until a shutdown signal; an error when it never
/// became ready.
pub(super) async fn supervise(
    mut plan: Plan,
    programs: &Programs,
    data_dir: &Path,
    certs: &Path,
    bootstrap: &BootstrapKey,
    restart_delay: Duration,
) -> anyhow::Result<()> {
    let (exits_tx, mut exits) = mpsc::unbounded_channel::<Exit>();
    for index in 0..plan.children.len() {
        if let Err(err) = child::spawn(
            programs,
            &mut plan.children[index],
            index,
            &exits_tx,
            bootstrap,
        ) {
            child::stop_all(&mut plan.children, &mut exits).await;
            return Err(err);
        }
    }
    let mut mesh_file = MeshFile::new(data_dir.join("mesh.json"));
    if let Err(err) = mesh_file.write(mesh_json(&plan, certs)?) {
        tracing::warn!("cannot write mesh.json yet ({err:#}); retrying");
    }

    let shutdown = minimesh_runtime::shutdown::signal();
    tokio::pin!(shutdown);
    tokio::select! {
        ready = probe::wait_ready(&plan.children) => if let Err(err) = ready {
            child::stop_all(&mut plan.children, &mut exits).await;
            mesh_file.remove();
            return Err(err);
        },
        _ = &mut shutdown => {
            child::stop_all(&mut plan.children, &mut exits).await;
            mesh_file.remove();
            return Ok(());
        }
        Some((index, _, status)) = exits.recv() => {
            // That child is gone: nothing to signal or wait for.
            plan.children[index].pid = None;
            child::stop_all(&mut plan.children, &mut exits).await;
            mesh_file.remove();
            let failed = &plan.children[index];
            let why = failed.failure().unwrap_or_else(|| format!("exited ({status})"));
            bail!("{} failed to start: {why} (log: {})", failed.name, failed.log.display());
        }
    }
    println!(
        "mesh ready: gateway {} ({} instances; details in {})",
        plan.gateway_addr,
        plan.instances.len(),
        mesh_file.path().display()
    );

    loop {
        let next_restart = plan.children.iter().filter_map(|c| c.restart_at).min();
        let restart_due = async {
            match next_restart {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let mesh_retry = async {
            if mesh_file.is_pending() {
                tokio::time::sleep(MESH_FILE_RETRY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            Some((index, generation, status)) = exits.recv() => {
                let child = &mut plan.children[index];
                if generation != child.generation {
                    continue;
                }
                child.pid = None;
                // Back off when a child keeps dying right after start.
                let delay = if child.started.elapsed() > Duration::from_secs(10) {
                    child.restarts = 0;
                    restart_delay
                } else {
                    restart_delay.saturating_mul(2u32.pow(child.restarts.min(6)))
                };
                child.restarts += 1;
                tracing::warn!(
                    "{} exited ({status}); restarting in {}",
                    child.name,
                    humantime::format_duration(delay)
                );
                child.restart_at = Some(Instant::now() + delay);
            }
            _ = restart_due => {
                let now = Instant::now();
                for index in 0..plan.children.len() {
                    let child = &mut plan.children[index];
                    if child.restart_at.is_some_and(|at| at <= now) {
                        child.restart_at = None;
                        if let Err(err) = child::spawn(programs, child, index, &exits_tx, bootstrap) {
                            tracing::error!("cannot restart {} ({err:#}); trying again in 1s", child.name);
                            child.restart_at = Some(now + Duration::from_secs(1));
                        }
                    }
                }
                if let Err(err) = mesh_file.write(mesh_json(&plan, certs)?) {
                    tracing::error!("cannot rewrite mesh.json ({err:#}); retrying every {}", humantime::format_duration(MESH_FILE_RETRY));
                }
            }
            _ = mesh_retry => {
                if mesh_file.retry().is_ok() {
                    tracing::info!("mesh.json rewritten");
                }
            }
        }
    }
    child::stop_all(&mut plan.children, &mut exits).await;
    mesh_file.remove();
    println!("mesh stopped");
    Ok(())
}
