//! Loopback ports for the children, picked once so a restarted child gets
//! its own back.

use anyhow::Context;

/// Loopback listeners reserved for the children, each bound once here so no
/// port can be given twice.
///
/// Ports come from below the kernel's ephemeral range, so when a restarted
/// child's port is bound again, no outgoing connection of this machine
/// (which takes ephemeral ports) can be holding it; a random start keeps
/// several meshes on one machine apart.
pub(super) struct Ports {
    next: u32,
    low: u16,
    span: u32,
}

impl Ports {
    pub(super) fn new() -> Self {
        let (low, high) = reservable_range();
        let span = u32::from(high - low).max(1);
        Self {
            next: rand_below(span),
            low,
            span,
        }
    }

    pub(super) fn reserve(&mut self) -> anyhow::Result<std::net::TcpListener> {
        let ip = std::net::Ipv4Addr::LOCALHOST;
        for _ in 0..self.span {
            let port = self.low + (self.next % self.span) as u16;
            self.next = self.next.wrapping_add(1);
            if let Ok(listener) = std::net::TcpListener::bind((ip, port)) {
                return Ok(listener);
            }
        }
        std::net::TcpListener::bind((ip, 0)).context("reserving a loopback port")
    }
}

/// Ports from 10000 up to the start of the ephemeral range.
fn reservable_range() -> (u16, u16) {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_start > 11000 {
        (10000, ephemeral_start)
    } else {
        (ephemeral_start.max(1024), 65535)
    }
}

fn rand_below(n: u32) -> u32 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded randomly per process; enough to spread ports.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (hasher.finish() % u64::from(n.max(1))) as u32
}
