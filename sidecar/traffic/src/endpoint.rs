//! One endpoint as the balancer sees it: health (ejection state), latency
//! estimate, and the attempts outstanding on it; and the choice of endpoint
//! for each attempt.
//!
//! An attempt is a guard ([`Attempt`]): however it ends (answered, failed,
//! timed out, or its future dropped because the caller went away) it comes
//! off the endpoint's books, so no in-flight count can leak and no probe can
//! be lost. The cost of an endpoint counts its waiting attempts, as Finagle's
//! and linkerd2-proxy's peak-EWMA count pending requests, and is never less
//! than the oldest one's age: an endpoint that stops answering gets more
//! expensive every millisecond.

use crate::balance::{PeakEwma, p2c};
use crate::eject::{Admission, EjectionPolicy, Health, State, Transition};
use rand::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Lowest latency an estimate is taken as, so an idle endpoint's cost never
/// reaches zero and its in-flight count still matters.
const FLOOR_NS: f64 = 1_000.0;

/// The per-endpoint policy of one upstream: latency estimate and ejection.
#[derive(Debug, Clone)]
pub struct EndpointPolicy {
    /// Latency assumed for an endpoint never heard from.
    pub default_rtt: Duration,
    /// How fast a latency peak is forgotten.
    pub decay: Duration,
    /// When an endpoint is ejected, and for how long.
    pub ejection: EjectionPolicy,
}

impl Default for EndpointPolicy {
    fn default() -> Self {
        Self {
            default_rtt: Duration::from_millis(30),
            decay: Duration::from_secs(1),
            ejection: EjectionPolicy::default(),
        }
    }
}

/// The ejection cap of one upstream (Envoy's max ejection percent): how many
/// of its endpoints are out of rotation now, and how many may be.
#[derive(Debug)]
pub struct EjectionCap {
    max_percent: usize,
    total: AtomicUsize,
    out: AtomicUsize,
}

impl EjectionCap {
    /// A cap allowing `max_percent` of the upstream's endpoints out at once.
    pub fn new(max_percent: u32) -> Arc<Self> {
        Arc::new(Self {
            max_percent: max_percent.min(100) as usize,
            total: AtomicUsize::new(0),
            out: AtomicUsize::new(0),
        })
    }

    /// The number of endpoints the upstream has now.
    pub fn set_total(&self, total: usize) {
        self.total.store(total, Ordering::SeqCst);
    }

    /// Endpoints out of rotation now (ejected or probing).
    pub fn out(&self) -> usize {
        self.out.load(Ordering::SeqCst)
    }

    /// Endpoints in rotation besides one that is still in rotation itself.
    fn others_open(&self) -> usize {
        let (total, out) = (self.total.load(Ordering::SeqCst), self.out());
        total.saturating_sub(out).saturating_sub(1)
    }

    /// Takes a place for one more ejection if the cap allows it. One endpoint
    /// may always be ejected, so a lone failing endpoint still fails fast.
    fn try_take(&self) -> bool {
        let total = self.total.load(Ordering::SeqCst);
        self.out
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |out| {
                (out == 0 || (out + 1) * 100 <= total * self.max_percent).then_some(out + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        let _ = self
            .out
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |out| out.checked_sub(1));
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The endpoint answered (whatever the gRPC status of the answer).
    Success,
    /// Connect error, refused or reset stream, or UNAVAILABLE from the peer's
    /// proxy: what Envoy calls a gateway failure.
    Failure,
    /// No answer within the per-try timeout or the call's deadline.
    Timeout,
    /// The caller went away first; recorded by dropping the [`Attempt`].
    Cancelled,
    /// The peer's proxy refused at once because its application has as many
    /// calls open as it allows. Alive, so no step towards ejection; and not
    /// a latency sample either: the refusal is quick, so counting it would
    /// make the fullest peer look the fastest and win it more calls.
    Busy,
}

type Observer = Box<dyn Fn(Transition) + Send + Sync>;

struct Inner {
    health: Health,
    ewma: PeakEwma,
    /// Start of every attempt still waiting for an answer, by attempt id
    /// (ids grow with time, so the first entry is the oldest).
    pending: BTreeMap<u64, Instant>,
    next_id: u64,
    /// When the endpoint last answered.
    last_success: Option<Instant>,
}

/// One endpoint's books: health, latency, and attempts waiting on it.
pub struct EndpointState {
    inner: Mutex<Inner>,
    policy: Arc<EndpointPolicy>,
    cap: Arc<EjectionCap>,
    observer: Option<Observer>,
}

impl std::fmt::Debug for EndpointState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("EndpointState")
            .field("state", &inner.health.state())
            .field("pending", &inner.pending.len())
            .finish()
    }
}

impl EndpointState {
    /// Books for a new, healthy endpoint, counted in `cap`.
    pub fn new(policy: Arc<EndpointPolicy>, cap: Arc<EjectionCap>, now: Instant) -> Self {
        Self {
            inner: Mutex::new(Inner {
                health: Health::default(),
                ewma: PeakEwma::new(policy.default_rtt, policy.decay, now),
                pending: BTreeMap::new(),
                next_id: 0,
                last_success: None,
            }),
            policy,
            cap,
            observer: None,
        }
    }

    /// Calls `observer` with every transition (ejections, restorations), for
    /// logs and metrics; it runs outside the endpoint's lock.
    pub fn with_observer(mut self, observer: impl Fn(Transition) + Send + Sync + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn notify(&self, transition: Transition) {
        if transition == Transition::None {
            return;
        }
        if transition == Transition::Restored {
            self.cap.release();
        }
        if let Some(observer) = &self.observer {
            observer(transition);
        }
    }

    /// Where the endpoint is in the ejection cycle.
    pub fn state(&self) -> State {
        self.lock().health.state()
    }

    /// True when calls may be routed here without a probe.
    pub fn is_open(&self) -> bool {
        self.lock().health.is_open()
    }

    /// Attempts waiting for an answer.
    pub fn in_flight(&self) -> usize {
        self.lock().pending.len()
    }

    /// Latency estimate now, raised to the age of the oldest waiting attempt.
    pub fn latency(&self, now: Instant) -> Duration {
        let inner = self.lock();
        let latency = inner.ewma.estimate(now).max(Self::waited_ns(&inner, now));
        Duration::from_nanos(latency as u64)
    }

    fn waited_ns(inner: &Inner, now: Instant) -> f64 {
        inner.pending.values().next().map_or(0.0, |&start| {
            now.saturating_duration_since(start).as_nanos() as f64
        })
    }

    /// Expected cost of one more attempt: the estimate times the attempts
    /// waiting plus one, and never less than the oldest waiting attempt's
    /// age (a new one would wait at least as long). The age is not
    /// multiplied: a busy endpoint's oldest call is a bound for itself, not
    /// for every call queued behind it.
    pub fn cost(&self, now: Instant) -> f64 {
        let inner = self.lock();
        let queued = inner.ewma.estimate(now).max(FLOOR_NS) * (inner.pending.len() as f64 + 1.0);
        queued.max(Self::waited_ns(&inner, now))
    }

    /// Whether an attempt may go here now; `Probe` commits the caller to
    /// start it with `probe: true`. An overdue probe ejects again here.
    pub fn admit(&self, now: Instant) -> Admission {
        let (admission, transition) =
            self.lock()
                .health
                .admit(now, &self.policy.ejection, &mut rand::rng());
        self.notify(transition);
        admission
    }

    /// Starts an attempt; the returned guard must be finished with its
    /// outcome, and counts as cancelled if it is dropped instead.
    pub fn start(self: &Arc<Self>, probe: bool, now: Instant) -> Attempt {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.pending.insert(id, now);
        drop(inner);
        Attempt {
            endpoint: self.clone(),
            id,
            started: now,
            probe,
            deadline: None,
            done: false,
        }
    }

    fn end(&self, id: u64, started: Instant, probe: bool, outcome: Outcome) -> Transition {
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(started);
        let mut inner = self.lock();
        inner.pending.remove(&id);
        let transition = match outcome {
            Outcome::Success => {
                inner.ewma.observe(elapsed, now);
                inner.last_success = Some(now);
                inner.health.success()
            }
            Outcome::Failure | Outcome::Timeout => {
                // The answer would have taken at least this long.
                inner.ewma.at_least(elapsed, now);
                let policy = &self.policy.ejection;
                let silent = inner.last_success.is_none_or(|at| at < started);
                let hung = outcome == Outcome::Timeout
                    && elapsed >= policy.hang_after
                    && silent
                    && self.cap.others_open() >= 1;
                let cap = &self.cap;
                let may_eject = || cap.try_take();
                if hung {
                    inner
                        .health
                        .hang(now, probe, policy, &mut rand::rng(), may_eject)
                } else {
                    inner
                        .health
                        .failure(now, probe, policy, &mut rand::rng(), may_eject)
                }
            }
            Outcome::Cancelled | Outcome::Busy => {
                inner.ewma.at_least(elapsed, now);
                if probe {
                    inner.health.probe_cancelled(now)
                } else {
                    Transition::None
                }
            }
        };
        drop(inner);
        self.notify(transition);
        transition
    }
}

impl Drop for EndpointState {
    fn drop(&mut self) {
        // A vanished endpoint gives back its place under the ejection cap.
        if !self.lock().health.is_open() {
            self.cap.release();
        }
    }
}

/// One attempt on one endpoint, from send to response headers.
#[derive(Debug)]
pub struct Attempt {
    endpoint: Arc<EndpointState>,
    id: u64,
    started: Instant,
    probe: bool,
    deadline: Option<Instant>,
    done: bool,
}

/// A caller that gives up at its own deadline races the proxy's timer for the
/// same deadline; a drop this close to the deadline is taken as a timeout.
fn deadline_slack(budget: Duration) -> Duration {
    (budget / 20).max(Duration::from_millis(20))
}

impl Attempt {
    /// The call's deadline: if the attempt is dropped at (or just before)
    /// it, the caller gave up on the endpoint's answer, and that counts as
    /// a timeout rather than a cancellation.
    pub fn with_deadline(mut self, deadline: Option<Instant>) -> Self {
        self.deadline = deadline;
        self
    }

    /// True when this attempt is the endpoint's probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// When the attempt started, for its latency.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Records how the attempt ended; returns what that did to the endpoint.
    pub fn finish(mut self, outcome: Outcome) -> Transition {
        self.done = true;
        self.endpoint
            .end(self.id, self.started, self.probe, outcome)
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.done {
            let now = Instant::now();
            let timed_out = self.deadline.is_some_and(|deadline| {
                let budget = deadline.saturating_duration_since(self.started);
                now + deadline_slack(budget) >= deadline
            });
            let outcome = if timed_out {
                Outcome::Timeout
            } else {
                Outcome::Cancelled
            };
            self.endpoint
                .end(self.id, self.started, self.probe, outcome);
        }
    }
}

/// The endpoint an attempt goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Its position in the list the choice was made from.
    pub index: usize,
    /// The attempt is the endpoint's probe: start it with `probe: true`.
    pub probe: bool,
}

/// Chooses among `items` (whose health `state` gives) for the next attempt:
///
/// 1. an ejected endpoint whose back-off is over takes it as its probe, on
///    its own clock, whether or not the others are healthy;
/// 2. otherwise P2C over the endpoints in rotation, skipping those `avoid`
///    names, unless `strict` is false and no other one is left.
///
/// None when nothing may be tried.
pub fn choose<T>(
    items: &[T],
    state: impl Fn(&T) -> &EndpointState,
    avoid: impl Fn(&T) -> bool,
    strict: bool,
    now: Instant,
    rng: &mut impl Rng,
) -> Option<Choice> {
    for (index, item) in items.iter().enumerate() {
        if !avoid(item) && state(item).admit(now) == Admission::Probe {
            return Some(Choice { index, probe: true });
        }
    }
    let open: Vec<usize> = (0..items.len())
        .filter(|&i| state(&items[i]).is_open())
        .collect();
    let fresh: Vec<usize> = open
        .iter()
        .copied()
        .filter(|&i| !avoid(&items[i]))
        .collect();
    let candidates = if fresh.is_empty() && !strict {
        &open
    } else {
        &fresh
    };
    p2c(candidates, |i| state(&items[i]).cost(now), rng).map(|index| Choice {
        index,
        probe: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::sync::Mutex as StdMutex;

    const MS: Duration = Duration::from_millis(1);
    const S: Duration = Duration::from_secs(1);

    fn policy() -> Arc<EndpointPolicy> {
        Arc::new(EndpointPolicy {
            default_rtt: 30 * MS,
            decay: S,
            ejection: EjectionPolicy {
                consecutive_failures: 3,
                base: S,
                max: 8 * S,
                jitter: 0.0,
                probe_lease: 0.5,
                max_ejection_percent: 50,
                hang_after: S,
            },
        })
    }

    type Log = Arc<StdMutex<Vec<(usize, Transition)>>>;

    /// `n` endpoints sharing one cap; every transition is logged.
    fn endpoints(n: usize) -> (Vec<Arc<EndpointState>>, Log) {
        let cap = EjectionCap::new(policy().ejection.max_ejection_percent);
        cap.set_total(n);
        let log = Arc::new(StdMutex::new(Vec::new()));
        let eps = (0..n)
            .map(|i| {
                let log = log.clone();
                Arc::new(
                    EndpointState::new(policy(), cap.clone(), Instant::now())
                        .with_observer(move |t| log.lock().unwrap().push((i, t))),
                )
            })
            .collect();
        (eps, log)
    }

    fn fail(endpoint: &Arc<EndpointState>, outcome: Outcome, times: usize) {
        for _ in 0..times {
            endpoint.start(false, Instant::now()).finish(outcome);
        }
    }

    fn pick(eps: &[Arc<EndpointState>], rng: &mut StdRng) -> Option<Choice> {
        choose(eps, |e| e, |_| false, false, Instant::now(), rng)
    }

    #[tokio::test(start_paused = true)]
    async fn every_way_an_attempt_ends_takes_it_off_the_books() {
        let (eps, _) = endpoints(1);
        let e = &eps[0];
        for outcome in [
            Outcome::Success,
            Outcome::Failure,
            Outcome::Timeout,
            Outcome::Cancelled,
            Outcome::Busy,
        ] {
            let attempt = e.start(false, Instant::now());
            assert_eq!(e.in_flight(), 1);
            attempt.finish(outcome);
            assert_eq!(e.in_flight(), 0, "{outcome:?}");
        }
        // Dropped without a verdict: the guard itself ends it.
        drop(e.start(false, Instant::now()));
        assert_eq!(e.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_call_future_releases_its_attempt() {
        let (eps, _) = endpoints(1);
        let e = eps[0].clone();
        // A call that never gets an answer, cancelled by its caller's timeout.
        let call = {
            let e = e.clone();
            async move {
                let attempt = e.start(false, Instant::now());
                std::future::pending::<()>().await;
                attempt.finish(Outcome::Success);
            }
        };
        let cancelled = tokio::time::timeout(2 * S, call).await;
        assert!(cancelled.is_err());
        assert_eq!(e.in_flight(), 0, "no leak when the future is dropped");
        // ...and an aborted task likewise.
        let task = tokio::spawn({
            let e = e.clone();
            async move {
                let _attempt = e.start(false, Instant::now());
                std::future::pending::<()>().await;
            }
        });
        while e.in_flight() == 0 {
            tokio::task::yield_now().await;
        }
        task.abort();
        let _ = task.await;
        assert_eq!(e.in_flight(), 0);
        assert!(e.is_open(), "cancellations are not failures");
        assert!(
            e.latency(Instant::now()) >= 2 * S - MS,
            "a call cancelled after 2 s says the latency is at least that"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_drop_at_the_callers_deadline_is_a_timeout_and_one_before_is_not() {
        let (eps, _) = endpoints(1);
        let e = &eps[0];
        let call = |wait: Duration| async move {
            let now = Instant::now();
            let attempt = e.start(false, now).with_deadline(Some(now + 2 * S));
            tokio::time::advance(wait).await;
            drop(attempt);
        };
        for _ in 0..10 {
            call(S).await;
        }
        assert!(e.is_open(), "dropped half-way: cancellations");
        // The caller gave up 5 ms before the proxy's own timer would have.
        for _ in 0..3 {
            call(2 * S - 5 * MS).await;
        }
        assert!(!e.is_open(), "three timeouts eject");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_endpoint_gets_dearer_every_millisecond() {
        let (eps, _) = endpoints(2);
        let (hung, fine) = (&eps[0], &eps[1]);
        // Long enough for the default estimate to fade; then both answer in 2 ms.
        tokio::time::advance(10 * S).await;
        for e in [hung, fine] {
            let attempt = e.start(false, Instant::now());
            tokio::time::advance(2 * MS).await;
            attempt.finish(Outcome::Success);
        }
        let stuck = hung.start(false, Instant::now());
        let mut last = hung.cost(Instant::now());
        for _ in 0..20 {
            tokio::time::advance(5 * MS).await;
            let now = Instant::now();
            let cost = hung.cost(now);
            assert!(
                cost > last,
                "cost grows while a call waits: {last} -> {cost}"
            );
            last = cost;
        }
        // Even with three calls in flight on the other one, the hung one loses.
        let busy: Vec<_> = (0..3).map(|_| fine.start(false, Instant::now())).collect();
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..100 {
            assert_eq!(pick(&eps, &mut rng).map(|c| c.index), Some(1));
        }
        drop(busy);
        // The timeout raises the estimate: still dear after the call is gone.
        tokio::time::advance(S).await;
        stuck.finish(Outcome::Timeout);
        assert!(hung.latency(Instant::now()) >= S);
        assert!(hung.cost(Instant::now()) > 100.0 * fine.cost(Instant::now()));
        // ...and it decays, so the endpoint is tried again later.
        tokio::time::advance(10 * S).await;
        assert!(hung.latency(Instant::now()) < 2 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_refuses_because_it_is_full_does_not_look_fast() {
        // `control` is what recording the refusals as answers would do.
        let (eps, _) = endpoints(3);
        let (full, fine, control) = (&eps[0], &eps[1], &eps[2]);
        tokio::time::advance(10 * S).await;
        // All three answer one call in 20 ms.
        let attempts = [full, fine, control].map(|e| e.start(false, Instant::now()));
        tokio::time::advance(20 * MS).await;
        for attempt in attempts {
            attempt.finish(Outcome::Success);
        }
        // For 2 s the full one refuses a call every 10 ms, within 100 µs.
        for _ in 0..200 {
            tokio::time::advance(10 * MS).await;
            for (e, outcome) in [(full, Outcome::Busy), (control, Outcome::Success)] {
                let attempt = e.start(false, Instant::now());
                tokio::time::advance(Duration::from_micros(100)).await;
                attempt.finish(outcome);
            }
        }
        let now = Instant::now();
        assert!(full.is_open(), "full is not failing");
        assert!(
            full.latency(now) + Duration::from_micros(1) >= fine.latency(now),
            "refusals are no latency samples: {:?} against {:?}",
            full.latency(now),
            fine.latency(now)
        );
        assert!(
            control.latency(now) * 5 < fine.latency(now),
            "as answers they would have made it look fastest: {:?} against {:?}",
            control.latency(now),
            fine.latency(now)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_and_failures_eject_and_cancellations_do_not() {
        let (eps, log) = endpoints(4);
        fail(&eps[0], Outcome::Cancelled, 10);
        assert!(eps[0].is_open());
        fail(&eps[0], Outcome::Timeout, 2);
        assert!(eps[0].is_open());
        fail(&eps[0], Outcome::Timeout, 1);
        assert_eq!(
            eps[0].state(),
            State::Ejected {
                until: Instant::now() + S,
                backoff: S
            }
        );
        fail(&eps[1], Outcome::Failure, 3);
        assert!(!eps[1].is_open(), "resets and refusals count too");
        assert_eq!(
            *log.lock().unwrap(),
            [
                (0, Transition::Ejected { backoff: S }),
                (1, Transition::Ejected { backoff: S })
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn one_long_timeout_with_nothing_answered_meanwhile_ejects_when_others_can_serve() {
        let (eps, _) = endpoints(2);
        let wait = |e: &Arc<EndpointState>, how_long: Duration, outcome: Outcome| {
            let attempt = e.start(false, Instant::now());
            async move {
                tokio::time::advance(how_long).await;
                attempt.finish(outcome)
            }
        };
        // Shorter than hang_after, or answered meanwhile: an ordinary failure.
        wait(&eps[0], 900 * MS, Outcome::Timeout).await;
        assert!(eps[0].is_open());
        let long = eps[0].start(false, Instant::now());
        wait(&eps[0], 500 * MS, Outcome::Success).await;
        tokio::time::advance(S).await;
        long.finish(Outcome::Timeout);
        assert!(eps[0].is_open(), "it answered while the call waited");
        // Silent for the whole 2 s wait: hung.
        assert_eq!(
            wait(&eps[0], 2 * S, Outcome::Timeout).await,
            Transition::Ejected { backoff: S }
        );
        // The other is now the last one in rotation: it needs a streak.
        wait(&eps[1], 2 * S, Outcome::Timeout).await;
        assert!(eps[1].is_open());

        let (lone, _) = endpoints(1);
        wait(&lone[0], 2 * S, Outcome::Timeout).await;
        assert!(
            lone[0].is_open(),
            "a lone endpoint is not ejected for one call"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_more_than_the_cap_is_ejected_and_one_always_may_be() {
        let (eps, _) = endpoints(3);
        for e in &eps {
            fail(e, Outcome::Failure, 5);
        }
        let out = eps.iter().filter(|e| !e.is_open()).count();
        assert_eq!(out, 1, "50% of 3 endpoints: one may be out");
        // When the ejected one comes back, another may go.
        let mut rng = StdRng::seed_from_u64(1);
        tokio::time::advance(S).await;
        let probe = pick(&eps, &mut rng).unwrap();
        assert!(probe.probe);
        eps[probe.index]
            .start(true, Instant::now())
            .finish(Outcome::Success);
        let other = (probe.index + 1) % 3;
        fail(&eps[other], Outcome::Failure, 1);
        assert!(!eps[other].is_open());

        let (lone, _) = endpoints(1);
        fail(&lone[0], Outcome::Failure, 3);
        assert!(!lone[0].is_open(), "a lone endpoint can be ejected");
        assert_eq!(
            pick(&lone, &mut rng),
            None,
            "and then nothing is tried until its back-off ends"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_is_probed_on_its_own_clock_while_others_are_healthy() {
        let (eps, log) = endpoints(3);
        let mut rng = StdRng::seed_from_u64(9);
        fail(&eps[2], Outcome::Failure, 3);
        for _ in 0..50 {
            let choice = pick(&eps, &mut rng).unwrap();
            assert!(choice.index != 2 && !choice.probe);
        }
        tokio::time::advance(S).await;
        let probe = pick(&eps, &mut rng).unwrap();
        assert_eq!(
            probe,
            Choice {
                index: 2,
                probe: true
            }
        );
        let attempt = eps[2].start(true, Instant::now());
        for _ in 0..50 {
            assert_ne!(
                pick(&eps, &mut rng).unwrap().index,
                2,
                "one probe at a time"
            );
        }
        tokio::time::advance(MS).await;
        assert_eq!(attempt.finish(Outcome::Success), Transition::Restored);
        assert!(eps[2].is_open());
        assert_eq!(log.lock().unwrap().last(), Some(&(2, Transition::Restored)));
        tokio::time::advance(3 * S).await;
        let mut seen = [0; 3];
        for _ in 0..300 {
            seen[pick(&eps, &mut rng).unwrap().index] += 1;
        }
        assert!(seen[2] > 50, "back in rotation: {seen:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn every_way_a_probe_ends_and_none_keeps_the_endpoint_out_longer() {
        let (eps, log) = endpoints(1);
        let e = &eps[0];
        let mut rng = StdRng::seed_from_u64(3);
        fail(e, Outcome::Failure, 3); // ejected for 1 s
        let mut probe = || {
            let choice = pick(&eps, &mut rng).expect("a probe is due");
            assert!(choice.probe);
            eps[0].start(true, Instant::now())
        };

        // Timed out: out again for the doubled back-off.
        tokio::time::advance(S).await;
        let attempt = probe();
        tokio::time::advance(300 * MS).await;
        assert_eq!(
            attempt.finish(Outcome::Timeout),
            Transition::Ejected { backoff: 2 * S }
        );

        // Dropped by its caller: out for one more back-off of the same length.
        tokio::time::advance(2 * S).await;
        let attempt = probe();
        tokio::time::advance(100 * MS).await;
        drop(attempt);
        assert_eq!(
            e.state(),
            State::Ejected {
                until: Instant::now() + 2 * S,
                backoff: 2 * S
            }
        );

        // Never answered: its lease (half the back-off) runs out.
        tokio::time::advance(2 * S).await;
        let overdue = probe();
        tokio::time::advance(S).await;
        assert_eq!(e.admit(Instant::now()), Admission::Closed);
        assert_eq!(
            log.lock().unwrap().last(),
            Some(&(0, Transition::Ejected { backoff: 4 * S }))
        );
        // Its late answer still counts: a success is a success.
        assert_eq!(overdue.finish(Outcome::Success), Transition::Restored);
        assert!(e.is_open());

        // Failed (refused, reset): out again, doubled, as after a timeout.
        fail(e, Outcome::Failure, 3);
        tokio::time::advance(S).await;
        let attempt = probe();
        assert_eq!(
            attempt.finish(Outcome::Failure),
            Transition::Ejected { backoff: 2 * S }
        );
        assert_eq!(
            *log.lock().unwrap(),
            [
                (0, Transition::Ejected { backoff: S }),
                (0, Transition::Ejected { backoff: 2 * S }),
                (0, Transition::ProbeCancelled { backoff: 2 * S }),
                (0, Transition::Ejected { backoff: 4 * S }),
                (0, Transition::Restored),
                (0, Transition::Ejected { backoff: S }),
                (0, Transition::Ejected { backoff: 2 * S }),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_avoid_tried_endpoints_strictly_when_asked() {
        let (eps, _) = endpoints(2);
        let mut rng = StdRng::seed_from_u64(2);
        let now = Instant::now();
        for _ in 0..50 {
            let c = choose(
                &eps,
                |e| e,
                |e| Arc::ptr_eq(e, &eps[0]),
                true,
                now,
                &mut rng,
            );
            assert_eq!(c.map(|c| c.index), Some(1));
        }
        let all = |_: &Arc<EndpointState>| true;
        assert_eq!(choose(&eps, |e| e, all, true, now, &mut rng), None);
        assert!(
            choose(&eps, |e| e, all, false, now, &mut rng).is_some(),
            "not strict: a tried endpoint beats none"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_vanished_ejected_endpoint_gives_back_its_place_under_the_cap() {
        let (mut eps, _) = endpoints(2);
        fail(&eps[0], Outcome::Failure, 3);
        fail(&eps[1], Outcome::Failure, 3);
        assert!(eps[1].is_open(), "cap: one of two");
        eps.remove(0);
        fail(&eps[0], Outcome::Failure, 1);
        assert!(!eps[0].is_open());
    }
}
