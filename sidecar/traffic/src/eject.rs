//! Circuit breaking per endpoint: after `consecutive_failures` failures in a
//! row (connect errors, UNAVAILABLE) the endpoint is ejected for a back-off
//! that doubles with every ejection in a row, with jitter so replicas of a
//! caller do not return in lockstep. When the back-off ends, one probe call
//! is let through; its success brings the endpoint back, its failure ejects
//! it again for longer.

use rand::Rng;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct EjectionPolicy {
    pub consecutive_failures: u32,
    pub base: Duration,
    pub max: Duration,
    /// Fraction of the back-off added or taken off at random (0.0 to 1.0).
    pub jitter: f64,
    /// A probe that has not finished after this long no longer blocks the next one.
    pub probe_timeout: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: 0.25,
            probe_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Healthy,
    Ejected { until: Instant },
    Probing { since: Instant },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Route calls to it as usual.
    Open,
    /// Its back-off is over: this one call is the probe.
    Probe,
    /// Ejected (or a probe is in flight): do not route to it.
    Closed,
}

#[derive(Debug, Clone)]
pub struct Health {
    state: State,
    failures: u32,
    /// Ejections in a row without a success in between; grows the back-off.
    ejections: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            state: State::Healthy,
            failures: 0,
            ejections: 0,
        }
    }
}

impl Health {
    /// Whether a call may go to this endpoint now. Taking `Probe` commits the
    /// caller to report the call's outcome.
    pub fn admit(&mut self, now: Instant, policy: &EjectionPolicy) -> Admission {
        match self.state {
            State::Healthy => Admission::Open,
            State::Ejected { until } if now >= until => {
                self.state = State::Probing { since: now };
                Admission::Probe
            }
            State::Probing { since } if now >= since + policy.probe_timeout => {
                self.state = State::Probing { since: now };
                Admission::Probe
            }
            State::Ejected { .. } | State::Probing { .. } => Admission::Closed,
        }
    }

    /// True when calls may be routed here without a probe.
    pub fn is_open(&self) -> bool {
        self.state == State::Healthy
    }

    /// When an ejected endpoint may be probed; None unless ejected.
    pub fn ejected_until(&self) -> Option<Instant> {
        match self.state {
            State::Ejected { until } => Some(until),
            _ => None,
        }
    }

    pub fn success(&mut self) {
        self.state = State::Healthy;
        self.failures = 0;
        self.ejections = 0;
    }

    /// Records a failure; returns true when this failure ejected the endpoint.
    pub fn failure(&mut self, now: Instant, policy: &EjectionPolicy, rng: &mut impl Rng) -> bool {
        self.failures = self.failures.saturating_add(1);
        let eject = match self.state {
            State::Probing { .. } => true,
            State::Healthy => self.failures >= policy.consecutive_failures,
            State::Ejected { .. } => false,
        };
        if eject {
            self.ejections = self.ejections.saturating_add(1);
            let until = now + backoff(self.ejections, policy, rng);
            self.state = State::Ejected { until };
        }
        eject
    }
}

/// Back-off of the n-th ejection in a row (n >= 1): base * 2^(n-1), capped,
/// then jittered by ±jitter.
pub fn backoff(ejections: u32, policy: &EjectionPolicy, rng: &mut impl Rng) -> Duration {
    let exponent = ejections.saturating_sub(1).min(20);
    let raw = policy.base.saturating_mul(1u32 << exponent).min(policy.max);
    let jitter = policy.jitter.clamp(0.0, 1.0);
    let factor = if jitter > 0.0 {
        rng.random_range(1.0 - jitter..=1.0 + jitter)
    } else {
        1.0
    };
    raw.mul_f64(factor).min(policy.max.mul_f64(1.0 + jitter))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn policy() -> EjectionPolicy {
        EjectionPolicy {
            consecutive_failures: 3,
            base: Duration::from_secs(1),
            max: Duration::from_secs(8),
            jitter: 0.0,
            probe_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_and_jitter_stays_in_bounds() {
        let mut rng = StdRng::seed_from_u64(7);
        let p = policy();
        let seq: Vec<u64> = (1..=6)
            .map(|n| backoff(n, &p, &mut rng).as_secs())
            .collect();
        assert_eq!(seq, [1, 2, 4, 8, 8, 8]);
        let jittery = EjectionPolicy {
            jitter: 0.25,
            ..policy()
        };
        for _ in 0..200 {
            let d = backoff(2, &jittery, &mut rng);
            assert!(
                d >= Duration::from_millis(1500) && d <= Duration::from_millis(2500),
                "{d:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_n_failures_then_probes_and_recovers() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        let t0 = Instant::now();
        assert!(!health.failure(t0, &p, &mut rng));
        health.success(); // a success resets the count
        assert!(!health.failure(t0, &p, &mut rng));
        assert!(!health.failure(t0, &p, &mut rng));
        assert!(
            health.failure(t0, &p, &mut rng),
            "third failure in a row ejects"
        );
        assert_eq!(health.admit(t0, &p), Admission::Closed);
        assert_eq!(health.ejected_until(), Some(t0 + Duration::from_secs(1)));

        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(health.admit(t1, &p), Admission::Probe);
        assert_eq!(
            health.admit(t1, &p),
            Admission::Closed,
            "one probe at a time"
        );
        assert!(
            health.failure(t1, &p, &mut rng),
            "a failed probe ejects again"
        );
        assert_eq!(
            health.ejected_until(),
            Some(t1 + Duration::from_secs(2)),
            "back-off doubled"
        );

        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(health.admit(t2, &p), Admission::Probe);
        health.success();
        assert_eq!(health.admit(t2, &p), Admission::Open);
        // After recovery the back-off starts from the base again.
        for _ in 0..3 {
            health.failure(t2, &p, &mut rng);
        }
        assert_eq!(health.ejected_until(), Some(t2 + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_probe_does_not_block_forever() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            health.failure(t0, &p, &mut rng);
        }
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(health.admit(t1, &p), Admission::Probe);
        assert_eq!(
            health.admit(t1 + Duration::from_secs(4), &p),
            Admission::Closed
        );
        assert_eq!(
            health.admit(t1 + Duration::from_secs(5), &p),
            Admission::Probe
        );
    }
}
