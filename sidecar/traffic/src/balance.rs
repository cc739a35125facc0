//! Power of two choices over peak-EWMA latency.
//!
//! Written here rather than taken from `tower::balance::p2c` because a retry
//! must be able to avoid the endpoint that just failed, and a call must fail
//! fast when every endpoint is ejected; tower's balancer only knows readiness
//! and would make such calls wait. The estimator follows the same idea as
//! tower's `PeakEwma` (and Finagle's): latency jumps up to a slow sample at
//! once and decays back with time, and cost is the estimate times the calls
//! in flight plus one. [`crate::endpoint`] adds what the estimate cannot see:
//! calls still waiting, whose age is a lower bound on the latency now.

use rand::Rng;
use std::time::Duration;
use tokio::time::Instant;

/// Peak-EWMA latency of one endpoint: jumps up to a slow sample at once, decays back slowly.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    estimate_ns: f64,
    updated: Instant,
    decay_ns: f64,
}

impl PeakEwma {
    /// An estimate starting at `default_rtt`, forgetting peaks over about `decay`.
    pub fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            estimate_ns: default_rtt.as_nanos() as f64,
            updated: now,
            decay_ns: decay.as_nanos().max(1) as f64,
        }
    }

    /// The estimate now, in nanoseconds.
    pub fn estimate(&self, now: Instant) -> f64 {
        self.decayed(now)
    }

    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
        self.estimate_ns * (-elapsed / self.decay_ns).exp()
    }

    /// Folds in one observed latency.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let current = self.decayed(now).max(0.0);
        self.estimate_ns = if sample > current {
            sample // peak: react to a slow endpoint at once
        } else {
            let elapsed = now.saturating_duration_since(self.updated).as_nanos() as f64;
            let w = (-elapsed / self.decay_ns).exp();
            current * w + sample * (1.0 - w)
        };
        self.updated = now;
    }

    /// Folds in a latency known only from below (a call that timed out,
    /// failed or was cancelled after `rtt`): the estimate never drops for it.
    pub fn at_least(&mut self, rtt: Duration, now: Instant) {
        self.estimate_ns = self.decayed(now).max(rtt.as_nanos() as f64);
        self.updated = now;
    }

    /// Expected cost of one more call: latency times outstanding calls.
    pub fn cost(&self, in_flight: usize, now: Instant) -> f64 {
        // Keep a floor so an idle endpoint's estimate never decays to zero,
        // which would make its in-flight count meaningless.
        let latency = self.decayed(now).max(1_000.0);
        latency * (in_flight as f64 + 1.0)
    }
}

/// Picks one of `candidates` (indexes into the caller's endpoint list): two
/// at random, the cheaper one wins. None when there are no candidates.
pub fn p2c(candidates: &[usize], cost: impl Fn(usize) -> f64, rng: &mut impl Rng) -> Option<usize> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[tokio::test(start_paused = true)]
    async fn peak_rises_at_once_and_decays_back() {
        let now = Instant::now();
        let mut ewma = PeakEwma::new(Duration::from_millis(30), Duration::from_secs(10), now);
        ewma.observe(Duration::from_millis(500), now);
        assert!(
            (ewma.cost(0, now) - 500e6).abs() < 1.0,
            "a slow sample is taken whole"
        );
        let later = now + Duration::from_secs(10);
        ewma.observe(Duration::from_millis(1), later);
        let cost = ewma.cost(0, later);
        assert!(
            cost < 500e6 * 0.5 && cost > 1e6,
            "decays towards fast samples: {cost}"
        );
        assert!(
            ewma.cost(3, later) > ewma.cost(0, later) * 3.9,
            "in-flight calls raise the cost"
        );
    }

    #[test]
    fn p2c_prefers_the_cheaper_and_never_picks_outside_candidates() {
        let mut rng = StdRng::seed_from_u64(42);
        assert_eq!(p2c(&[], |_| 0.0, &mut rng), None);
        assert_eq!(p2c(&[4], |_| 0.0, &mut rng), Some(4));
        // Endpoint 0 is ten times slower: it loses every comparison it is in.
        let costs = [10.0, 1.0, 1.0];
        let mut picks = [0usize; 3];
        for _ in 0..3000 {
            picks[p2c(&[0, 1, 2], |i| costs[i], &mut rng).unwrap()] += 1;
        }
        assert_eq!(picks[0], 0, "{picks:?}");
        assert!(picks[1] > 1200 && picks[2] > 1200, "{picks:?}");
        for _ in 0..100 {
            assert_ne!(p2c(&[1, 2], |i| costs[i], &mut rng), Some(0));
        }
    }
}
