//! Circuit breaking per endpoint, as a state machine:
//!
//! ```text
//!            N failures in a row (and the ejection cap allows)
//!  Healthy ─────────────────────────────────────────────▶ Ejected{until}
//!     ▲                                                     │  back-off over:
//!     │ any success                                         │  the next call
//!     │                                                     ▼  is the probe
//!     └──────────────────────────────────────────────── Probing{since}
//!         probe failed or timed out, or its lease ran out:  ejected again, back-off doubled
//!         probe cancelled by its caller:                    ejected again, same back-off
//! ```
//!
//! Failures are what Envoy calls gateway failures (connect errors, resets,
//! timeouts, UNAVAILABLE from the peer's proxy); one timeout that found the
//! endpoint hung counts as a whole streak; the back-off doubles with
//! every ejection in a row, with jitter so the callers of one endpoint do not
//! probe it in lockstep (Linkerd's failure accrual). A probe that is neither
//! answered nor cancelled within a fraction of the back-off (its lease) counts
//! as failed, so no lost report can keep an endpoint out.

use rand::Rng;
use std::time::Duration;
use tokio::time::Instant;

/// When an endpoint is ejected and for how long.
#[derive(Debug, Clone)]
pub struct EjectionPolicy {
    /// Failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; each ejection in a row doubles it.
    pub base: Duration,
    /// The longest ejection.
    pub max: Duration,
    /// Fraction of the back-off added or taken off at random (0.0 to 1.0).
    pub jitter: f64,
    /// A probe still unanswered after this fraction of the back-off before
    /// it counts as failed (its lease).
    pub probe_lease: f64,
    /// At most this share of an upstream's endpoints is ejected at once, in
    /// percent; one endpoint may always be (Envoy's `max_ejection_percent`).
    pub max_ejection_percent: u32,
    /// A call that times out after waiting at least this long, with the
    /// endpoint answering nothing meanwhile, ejects it at once when other
    /// endpoints can take its calls: it is hung, not slow.
    pub hang_after: Duration,
}

impl Default for EjectionPolicy {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: 0.25,
            probe_lease: 0.5,
            max_ejection_percent: 50,
            hang_after: Duration::from_secs(1),
        }
    }
}

impl EjectionPolicy {
    /// How long a probe may stay unanswered after a back-off of `backoff`.
    pub fn lease(&self, backoff: Duration) -> Duration {
        backoff.mul_f64(self.probe_lease.clamp(0.01, 1.0))
    }
}

/// Where an endpoint is in the ejection cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// In rotation.
    Healthy,
    /// Out of rotation until `until`; `backoff` is how long that was.
    Ejected {
        /// When it may be probed.
        until: Instant,
        /// The length of this ejection.
        backoff: Duration,
    },
    /// One probe call is on its way; nothing else is routed here.
    Probing {
        /// When the probe started.
        since: Instant,
        /// The ejection the probe ends, should it succeed.
        backoff: Duration,
    },
}

/// Whether a call may go to an endpoint now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Route calls to it as usual.
    Open,
    /// Its back-off is over: this one call is the probe.
    Probe,
    /// Ejected (or a probe is in flight): do not route to it.
    Closed,
}

/// What an event did to the endpoint, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// Taken out of rotation (again) for `backoff` after failures.
    Ejected {
        /// How long it is out.
        backoff: Duration,
    },
    /// Its probe was cancelled by the caller: out again for the same back-off.
    ProbeCancelled {
        /// How long it is out.
        backoff: Duration,
    },
    /// Back in rotation.
    Restored,
}

/// One endpoint's ejection state machine: failures counted, back-off, probe.
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
    /// Where the endpoint is in the cycle.
    pub fn state(&self) -> State {
        self.state
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a call may go to this endpoint now. `Probe` commits the caller
    /// to report the call's outcome (success, failure or cancellation).
    pub fn admit(
        &mut self,
        now: Instant,
        policy: &EjectionPolicy,
        rng: &mut impl Rng,
    ) -> (Admission, Transition) {
        match self.state {
            State::Healthy => (Admission::Open, Transition::None),
            State::Ejected { until, backoff } if now >= until => {
                self.state = State::Probing {
                    since: now,
                    backoff,
                };
                (Admission::Probe, Transition::None)
            }
            State::Probing { since, backoff } if now >= since + policy.lease(backoff) => {
                // The probe's answer is overdue: as good as a failure.
                (Admission::Closed, self.eject(now, policy, rng))
            }
            State::Ejected { .. } | State::Probing { .. } => (Admission::Closed, Transition::None),
        }
    }

    /// True when calls may be routed here without a probe.
    pub fn is_open(&self) -> bool {
        self.state == State::Healthy
    }

    /// When an ejected endpoint may be probed; None unless ejected.
    pub fn ejected_until(&self) -> Option<Instant> {
        match self.state {
            State::Ejected { until, .. } => Some(until),
            _ => None,
        }
    }

    /// Any success, probe or not, is evidence enough to route here again.
    pub fn success(&mut self) -> Transition {
        let was_out = self.state != State::Healthy;
        self.state = State::Healthy;
        self.failures = 0;
        self.ejections = 0;
        if was_out {
            Transition::Restored
        } else {
            Transition::None
        }
    }

    /// Records a failed call (`probe` when it was this endpoint's probe).
    /// `may_eject` is asked before a healthy endpoint is ejected, and takes a
    /// place under the upstream's ejection cap when it answers true.
    pub fn failure(
        &mut self,
        now: Instant,
        probe: bool,
        policy: &EjectionPolicy,
        rng: &mut impl Rng,
        may_eject: impl FnOnce() -> bool,
    ) -> Transition {
        self.failures = self.failures.saturating_add(1);
        match self.state {
            State::Healthy if self.failures >= policy.consecutive_failures.max(1) => {
                if may_eject() {
                    self.eject(now, policy, rng)
                } else {
                    Transition::None
                }
            }
            State::Probing { .. } if probe => self.eject(now, policy, rng),
            // A call that started before the ejection ended late: no news.
            State::Healthy | State::Probing { .. } | State::Ejected { .. } => Transition::None,
        }
    }

    /// Records a timeout that found the endpoint hung (it answered nothing
    /// while the call waited, see [`EjectionPolicy::hang_after`]): one is
    /// enough to eject, where other failures need a streak.
    pub fn hang(
        &mut self,
        now: Instant,
        probe: bool,
        policy: &EjectionPolicy,
        rng: &mut impl Rng,
        may_eject: impl FnOnce() -> bool,
    ) -> Transition {
        self.failures = self.failures.max(policy.consecutive_failures.max(1) - 1);
        self.failure(now, probe, policy, rng, may_eject)
    }

    /// The probe was dropped before it had an answer: it proved nothing, so
    /// the endpoint waits one more back-off of the same length.
    pub fn probe_cancelled(&mut self, now: Instant) -> Transition {
        match self.state {
            State::Probing { backoff, .. } => {
                self.state = State::Ejected {
                    until: now + backoff,
                    backoff,
                };
                Transition::ProbeCancelled { backoff }
            }
            _ => Transition::None,
        }
    }

    fn eject(&mut self, now: Instant, policy: &EjectionPolicy, rng: &mut impl Rng) -> Transition {
        self.ejections = self.ejections.saturating_add(1);
        let backoff = backoff(self.ejections, policy, rng);
        self.state = State::Ejected {
            until: now + backoff,
            backoff,
        };
        Transition::Ejected { backoff }
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
            probe_lease: 0.5,
            max_ejection_percent: 100,
            hang_after: Duration::from_secs(1),
        }
    }

    const S: Duration = Duration::from_secs(1);

    fn eject(health: &mut Health, now: Instant, p: &EjectionPolicy, rng: &mut StdRng) {
        for _ in 0..p.consecutive_failures {
            health.failure(now, false, p, rng, || true);
        }
        assert!(health.ejected_until().is_some());
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
    async fn healthy_to_ejected_after_n_failures_in_a_row_only() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        let t0 = Instant::now();
        let mut fail = |h: &mut Health| h.failure(t0, false, &p, &mut rng, || true);
        assert_eq!(fail(&mut health), Transition::None);
        assert_eq!(fail(&mut health), Transition::None);
        assert_eq!(health.success(), Transition::None, "was never out");
        assert_eq!(health.failures(), 0, "a success resets the count");
        assert_eq!(fail(&mut health), Transition::None);
        assert_eq!(fail(&mut health), Transition::None);
        assert_eq!(
            fail(&mut health),
            Transition::Ejected { backoff: S },
            "third failure in a row ejects"
        );
        assert_eq!(health.ejected_until(), Some(t0 + S));
        assert_eq!(
            fail(&mut health),
            Transition::None,
            "late failures while ejected change nothing"
        );
        assert_eq!(health.ejected_until(), Some(t0 + S));
    }

    #[tokio::test(start_paused = true)]
    async fn one_hang_ejects_a_healthy_endpoint_and_counts_as_a_failure_elsewhere() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        let t0 = Instant::now();
        assert_eq!(
            health.hang(t0, false, &p, &mut rng, || true),
            Transition::Ejected { backoff: S }
        );
        assert_eq!(
            health.hang(t0, false, &p, &mut rng, || unreachable!()),
            Transition::None,
            "late while ejected"
        );
        assert_eq!(health.admit(t0 + S, &p, &mut rng).0, Admission::Probe);
        assert_eq!(
            health.hang(t0 + S, true, &p, &mut rng, || unreachable!()),
            Transition::Ejected { backoff: 2 * S },
            "a hung probe"
        );
        let mut refused = Health::default();
        assert_eq!(
            refused.hang(t0, false, &p, &mut rng, || false),
            Transition::None,
            "the cap still applies"
        );
        assert!(refused.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn the_ejection_cap_can_keep_an_endpoint_in() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(
                health.failure(t0, false, &p, &mut rng, || false),
                Transition::None
            );
        }
        assert!(health.is_open(), "the cap refused: it stays in rotation");
        assert_eq!(
            health.failure(t0, false, &p, &mut rng, || true),
            Transition::Ejected { backoff: S },
            "ejected as soon as the cap allows"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_to_probing_when_the_backoff_ends_one_probe_at_a_time() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        let t0 = Instant::now();
        eject(&mut health, t0, &p, &mut rng);
        let admit = |h: &mut Health, at: Instant, rng: &mut StdRng| h.admit(at, &p, rng).0;
        assert_eq!(admit(&mut health, t0, &mut rng), Admission::Closed);
        assert_eq!(
            admit(&mut health, t0 + S - Duration::from_millis(1), &mut rng),
            Admission::Closed
        );
        assert_eq!(admit(&mut health, t0 + S, &mut rng), Admission::Probe);
        assert_eq!(
            health.state(),
            State::Probing {
                since: t0 + S,
                backoff: S
            }
        );
        assert_eq!(
            admit(&mut health, t0 + S, &mut rng),
            Admission::Closed,
            "one probe at a time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn probing_to_healthy_on_success_and_the_backoff_starts_over() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        let t0 = Instant::now();
        eject(&mut health, t0, &p, &mut rng);
        assert_eq!(health.admit(t0 + S, &p, &mut rng).0, Admission::Probe);
        assert_eq!(health.success(), Transition::Restored);
        assert_eq!(health.admit(t0 + S, &p, &mut rng).0, Admission::Open);
        let t1 = t0 + S;
        eject(&mut health, t1, &p, &mut rng);
        assert_eq!(health.ejected_until(), Some(t1 + S), "base back-off again");
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_to_healthy_on_a_late_success() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        eject(&mut health, Instant::now(), &p, &mut rng);
        assert_eq!(health.success(), Transition::Restored);
        assert!(health.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn probing_to_ejected_for_longer_on_a_failed_probe() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        let t0 = Instant::now();
        eject(&mut health, t0, &p, &mut rng);
        let t1 = t0 + S;
        assert_eq!(health.admit(t1, &p, &mut rng).0, Admission::Probe);
        // A call sent before the ejection failing now says nothing about the probe.
        assert_eq!(
            health.failure(t1, false, &p, &mut rng, || unreachable!()),
            Transition::None
        );
        let t2 = t1 + Duration::from_millis(100);
        assert_eq!(
            health.failure(t2, true, &p, &mut rng, || unreachable!()),
            Transition::Ejected { backoff: 2 * S },
            "back-off doubled"
        );
        assert_eq!(health.ejected_until(), Some(t2 + 2 * S));
    }

    #[tokio::test(start_paused = true)]
    async fn probing_to_ejected_when_the_lease_runs_out() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        let t0 = Instant::now();
        eject(&mut health, t0, &p, &mut rng);
        let t1 = t0 + S;
        assert_eq!(health.admit(t1, &p, &mut rng).0, Admission::Probe);
        let lease = p.lease(S);
        assert_eq!(lease, S / 2);
        assert_eq!(
            health.admit(t1 + lease - Duration::from_millis(1), &p, &mut rng),
            (Admission::Closed, Transition::None)
        );
        assert_eq!(
            health.admit(t1 + lease, &p, &mut rng),
            (Admission::Closed, Transition::Ejected { backoff: 2 * S }),
            "an unanswered probe counts as failed"
        );
        let t2 = t1 + lease + 2 * S;
        assert_eq!(health.admit(t2, &p, &mut rng).0, Admission::Probe);
        assert_eq!(health.success(), Transition::Restored);
    }

    #[tokio::test(start_paused = true)]
    async fn probing_to_ejected_for_the_same_backoff_when_the_probe_is_cancelled() {
        let p = policy();
        let mut rng = StdRng::seed_from_u64(1);
        let mut health = Health::default();
        let t0 = Instant::now();
        eject(&mut health, t0, &p, &mut rng);
        let t1 = t0 + S;
        assert_eq!(health.admit(t1, &p, &mut rng).0, Admission::Probe);
        let t2 = t1 + Duration::from_millis(200);
        assert_eq!(
            health.probe_cancelled(t2),
            Transition::ProbeCancelled { backoff: S }
        );
        assert_eq!(health.ejected_until(), Some(t2 + S), "one more back-off");
        assert_eq!(
            health.probe_cancelled(t2),
            Transition::None,
            "only a probe in flight can be cancelled"
        );
        assert_eq!(health.admit(t2 + S, &p, &mut rng).0, Admission::Probe);
        assert_eq!(
            health.failure(t2 + S, true, &p, &mut rng, || unreachable!()),
            Transition::Ejected { backoff: 2 * S },
            "the cancelled probe did not count as an ejection"
        );
    }
}
