//! Several endpoints serving one model, behind one [`VlmClient`].
//!
//! Each request goes to the endpoint in rotation with the fewest requests in flight. An
//! endpoint that cannot be reached, or whose requests keep failing after their retries, leaves
//! the rotation and is probed again with backoff until it is ready. A request that never
//! reached its server (connection refused) is sent again, elsewhere or to the same endpoint once
//! it is back; one that failed after its retries is sent to another endpoint when the retry
//! rules allow (never one that may have run, unless `vlm_retry_timeouts`). When no endpoint is
//! in rotation (the only server restarting), requests wait up to
//! [`ReplicaOptions::outage_wait`] for one to come back, then fail with
//! [`VlmError::Unreachable`].
//!
//! With [`ReplicaOptions::adaptive`], each endpoint also gets an adaptive concurrency limit (see
//! [`limit`](crate::limit) for the shape), fed by round-trip times and, where the server
//! publishes it, its own queue length.

use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use tokio::sync::Notify;
use url::Url;

use crate::backend::VlmBackend;
use crate::client::VlmClient;
use crate::error::VlmError;
use crate::health::HealthReport;
use crate::image::ImageMime;
use crate::limit::{Limiter, Sample};
use crate::request::VlmRequest;
use crate::response::VlmResponse;
use crate::stream::VlmStream;

/// How [`Replicas`] routes, waits and adapts.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ReplicaOptions {
    /// How long requests wait for an endpoint to come back when none is in rotation (the CLI's
    /// `--wait`, 60 s by default).
    pub outage_wait: Duration,
    /// Adaptive concurrency per endpoint (`--concurrency auto`): `Some(max)` caps each
    /// endpoint's limit; `None` leaves concurrency to the caller.
    pub adaptive: Option<usize>,
    /// Where an adaptive limit starts (2).
    pub initial_limit: usize,
    /// Whether a request that may have run (a timeout, an answer cut off) may be sent to another
    /// endpoint (`vlm_retry_timeouts`).
    pub resend_may_have_run: bool,
    /// Requests failing in a row (after their retries) that take an endpoint out of the
    /// rotation (3).
    pub eject_after: u32,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions {
            outage_wait: Duration::from_secs(60),
            adaptive: None,
            initial_limit: 2,
            resend_may_have_run: false,
            eject_after: 3,
        }
    }
}

impl ReplicaOptions {
    /// Waits up to `wait` for an endpoint to come back when none is in rotation.
    pub fn outage_wait(mut self, wait: Duration) -> Self {
        self.outage_wait = wait;
        self
    }

    /// Adapts each endpoint's concurrency, up to `max` in flight per endpoint.
    pub fn adaptive(mut self, max: usize) -> Self {
        self.adaptive = Some(max.max(1));
        self
    }

    /// Lets a request that may have run be sent to another endpoint (`vlm_retry_timeouts`).
    pub fn resend_may_have_run(mut self, yes: bool) -> Self {
        self.resend_may_have_run = yes;
        self
    }
}

/// What one endpoint did, for summaries.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointStats {
    /// The endpoint's base URL.
    pub base_url: Url,
    /// Answers it gave.
    pub answered: u64,
    /// Requests that failed there (after their retries).
    pub failed: u64,
    /// Whether it is in the rotation now.
    pub in_rotation: bool,
    /// Its adaptive limit now, when adaptive.
    pub limit: Option<usize>,
    /// The lowest and highest adaptive limit it had.
    pub limit_range: Option<(usize, usize)>,
}

/// Several clients of one model (replicas of a server), as one [`VlmClient`]. Cheap to clone:
/// clones share the endpoints and their state.
///
/// ```no_run
/// use std::sync::Arc;
/// use vlm_core::{ClientConfig, ImageInput, ReplicaOptions, Replicas, VlmBackend, VlmClient, VlmRequest};
///
/// # async fn run(a: Arc<dyn VlmClient>, b: Arc<dyn VlmClient>) -> Result<(), vlm_core::VlmError> {
/// // `a` and `b`: one client per server, e.g. from `vlm_factory::build_client`.
/// let replicas = Replicas::new(vec![a, b], ReplicaOptions::default().adaptive(64))?;
/// let report = replicas.health().await?; // ready when at least one endpoint is
/// let request = VlmRequest::builder("Describe the colours.")
///     .image(ImageInput::path("photo.jpg"))
///     .build()?;
/// let _slot = replicas.admit().await; // wait for room under the adaptive limits
/// let answer = replicas.infer_single(&request).await?;
/// # let _ = (report, answer); Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Replicas {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    endpoints: Vec<Endpoint>,
    options: ReplicaOptions,
    /// Woken when a request finishes, an endpoint joins or leaves, or a limit moves.
    changed: Notify,
    state: Mutex<Pool>,
}

#[derive(Debug)]
struct Endpoint {
    client: Arc<dyn VlmClient>,
    state: Mutex<EndpointState>,
}

#[derive(Debug)]
struct EndpointState {
    in_rotation: bool,
    probing: bool,
    in_flight: usize,
    failures: u32,
    answered: u64,
    failed: u64,
    limiter: Option<Limiter>,
    last_error: Option<String>,
    /// Whether the server's queue metric is read (`None`: not tried yet).
    metrics: Option<bool>,
}

#[derive(Debug, Default)]
struct Pool {
    /// Since when no endpoint has been in the rotation.
    outage_since: Option<Instant>,
    /// Requests admitted by [`Replicas::admit`] and not yet done.
    admitted: usize,
    /// Whether the queue-metric poller runs.
    polling: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One request's place on an endpoint; gives it back when dropped.
struct Lease {
    shared: Arc<Shared>,
    index: usize,
    in_flight: usize,
    sent: Instant,
}

impl Drop for Lease {
    fn drop(&mut self) {
        lock(&self.shared.endpoints[self.index].state).in_flight -= 1;
        self.shared.changed.notify_waiters();
    }
}

/// A place among the requests [`Replicas::admit`] lets through; dropping it makes room.
#[derive(Debug)]
pub struct Admission {
    shared: Arc<Shared>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        lock(&self.shared.state).admitted -= 1;
        self.shared.changed.notify_waiters();
    }
}

/// How a failed request counts against its endpoint.
enum Blame {
    /// Not the endpoint's fault (a bad request, an image the model refuses).
    None,
    /// The endpoint could not be reached: it leaves the rotation now.
    Down,
    /// The endpoint failed after retries (5xx, 429, a timeout).
    Failed,
}

fn blame(e: &VlmError) -> Blame {
    if e.is_unreachable() {
        Blame::Down
    } else if e.is_retryable() {
        Blame::Failed
    } else {
        Blame::None
    }
}

impl Replicas {
    /// Puts `clients` (at least one, all of one backend) behind one interface.
    pub fn new(
        clients: Vec<Arc<dyn VlmClient>>,
        options: ReplicaOptions,
    ) -> Result<Self, VlmError> {
        let Some(first) = clients.first() else {
            return Err(VlmError::config(
                "no endpoint given: set vlm_base_url to one URL or a list of them",
            ));
        };
        if let Some(other) = clients.iter().find(|c| c.backend() != first.backend()) {
            return Err(VlmError::config(format!(
                "the endpoints must all be one backend: {} is {}, {} is {}",
                first.base_url(),
                first.backend(),
                other.base_url(),
                other.backend()
            )));
        }
        let endpoints = clients
            .into_iter()
            .map(|client| Endpoint {
                client,
                state: Mutex::new(EndpointState {
                    in_rotation: true,
                    probing: false,
                    in_flight: 0,
                    failures: 0,
                    answered: 0,
                    failed: 0,
                    limiter: options
                        .adaptive
                        .map(|max| Limiter::new(options.initial_limit, max)),
                    last_error: None,
                    metrics: None,
                }),
            })
            .collect();
        Ok(Replicas {
            shared: Arc::new(Shared {
                endpoints,
                options,
                changed: Notify::new(),
                state: Mutex::new(Pool::default()),
            }),
        })
    }

    /// The endpoints' clients, in the order given.
    pub fn clients(&self) -> impl Iterator<Item = &Arc<dyn VlmClient>> {
        self.shared.endpoints.iter().map(|e| &e.client)
    }

    /// What each endpoint did so far.
    pub fn stats(&self) -> Vec<EndpointStats> {
        self.shared
            .endpoints
            .iter()
            .map(|e| {
                let s = lock(&e.state);
                EndpointStats {
                    base_url: e.client.base_url().clone(),
                    answered: s.answered,
                    failed: s.failed,
                    in_rotation: s.in_rotation,
                    limit: s.limiter.as_ref().map(Limiter::limit),
                    limit_range: s.limiter.as_ref().map(Limiter::range),
                }
            })
            .collect()
    }

    /// Requests allowed in flight now: the adaptive limits of the endpoints in rotation added
    /// up (of every endpoint while none is, so that waiting requests can see the outage out);
    /// `None` when not adaptive.
    pub fn capacity(&self) -> Option<usize> {
        self.shared.options.adaptive?;
        Some(self.shared.capacity())
    }

    /// Checks every endpoint at once; each report pairs with [`clients`](Self::clients). An
    /// endpoint that is not ready leaves the rotation and is probed again with backoff.
    pub async fn health_all(&self) -> Vec<Result<HealthReport, VlmError>> {
        let checks = self.shared.endpoints.iter().map(|e| e.client.health());
        let reports = futures_util::future::join_all(checks).await;
        for (index, report) in reports.iter().enumerate() {
            let ready = matches!(report, Ok(r) if r.is_ready());
            if ready {
                self.shared.rejoin(index);
            } else {
                let why = match report {
                    Ok(r) => r.state.reason().unwrap_or("not ready").to_owned(),
                    Err(e) => e.to_string(),
                };
                // The report itself says why: no warning on top of it.
                Shared::eject(&self.shared, index, why, false);
            }
        }
        reports
    }

    /// Waits until fewer requests are admitted than the adaptive limits allow in total, and
    /// returns the admission (drop it when the request is done). Without adaptive limits it
    /// returns at once. For callers that start work only when there is room for it.
    pub async fn admit(&self) -> Admission {
        loop {
            let changed = self.shared.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            {
                let mut pool = lock(&self.shared.state);
                let room = match self.shared.options.adaptive {
                    Some(_) => self.shared.capacity(),
                    None => usize::MAX,
                };
                if pool.admitted < room {
                    pool.admitted += 1;
                    return Admission {
                        shared: self.shared.clone(),
                    };
                }
            }
            changed.await;
        }
    }

    /// A place on the best endpoint in rotation, waiting for room or for an endpoint to come
    /// back (up to the outage wait). `avoid`: an endpoint that just failed this request, used
    /// only when no other is in rotation.
    async fn lease(&self, avoid: Option<usize>) -> Result<Lease, VlmError> {
        self.shared.start_polling();
        loop {
            let changed = self.shared.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            match self.shared.pick(avoid) {
                Pick::Leased(index, in_flight) => {
                    return Ok(Lease {
                        shared: self.shared.clone(),
                        index,
                        in_flight,
                        sent: Instant::now(),
                    });
                }
                Pick::Full => changed.await,
                Pick::Outage(since) => {
                    let deadline = since + self.shared.options.outage_wait;
                    if Instant::now() >= deadline {
                        return Err(self.shared.gone());
                    }
                    let _ = tokio::time::timeout_at(deadline, changed).await;
                }
            }
        }
    }

    /// Whether `e`, from endpoint `index`, may be sent again elsewhere.
    fn may_resend(&self, e: &VlmError, index: usize) -> bool {
        if e.is_unreachable() {
            return true; // never reached the server
        }
        let allowed =
            e.is_retryable() && (!e.may_have_run() || self.shared.options.resend_may_have_run);
        allowed && self.shared.others_in_rotation(index)
    }
}

enum Pick {
    Leased(usize, usize),
    Full,
    Outage(Instant),
}

impl Shared {
    fn capacity(&self) -> usize {
        let limits: Vec<(bool, usize)> = self
            .endpoints
            .iter()
            .map(|e| {
                let s = lock(&e.state);
                (
                    s.in_rotation,
                    s.limiter.as_ref().map_or(usize::MAX, Limiter::limit),
                )
            })
            .collect();
        let any = limits.iter().any(|(r, _)| *r);
        limits
            .iter()
            .filter(|(r, _)| *r || !any)
            .fold(0usize, |sum, (_, l)| sum.saturating_add(*l))
            .max(1)
    }

    /// The endpoint in rotation with the fewest in flight (relative to its limit), reserved.
    fn pick(&self, avoid: Option<usize>) -> Pick {
        let mut best: Option<(usize, f64)> = None;
        let mut any = false;
        for pass in [true, false] {
            for (index, e) in self.endpoints.iter().enumerate() {
                if pass && Some(index) == avoid {
                    continue;
                }
                let s = lock(&e.state);
                if !s.in_rotation {
                    continue;
                }
                any = true;
                let limit = s.limiter.as_ref().map_or(usize::MAX, Limiter::limit);
                if s.in_flight >= limit {
                    continue;
                }
                let load = s.in_flight as f64 / limit.min(1 << 20) as f64;
                if best.is_none_or(|(_, l)| load < l) {
                    best = Some((index, load));
                }
            }
            if best.is_some() || avoid.is_none() {
                break;
            }
        }
        match best {
            Some((index, _)) => {
                let mut s = lock(&self.endpoints[index].state);
                // Still in rotation with room? (Checked again under the lock.)
                let limit = s.limiter.as_ref().map_or(usize::MAX, Limiter::limit);
                if !s.in_rotation || s.in_flight >= limit {
                    return Pick::Full;
                }
                s.in_flight += 1;
                Pick::Leased(index, s.in_flight)
            }
            None if any => Pick::Full,
            None => match self.note_outage() {
                Some(since) => Pick::Outage(since),
                // One came back meanwhile.
                None => Pick::Full,
            },
        }
    }

    /// Since when no endpoint has been in the rotation, or `None` when one is. Checked and set
    /// under the pool's lock, as [`rejoin`](Self::rejoin) clears it, so a stale start cannot
    /// outlive a rejoin.
    fn note_outage(&self) -> Option<Instant> {
        let mut pool = lock(&self.state);
        if self.endpoints.iter().any(|e| lock(&e.state).in_rotation) {
            return None;
        }
        Some(*pool.outage_since.get_or_insert_with(Instant::now))
    }

    fn others_in_rotation(&self, index: usize) -> bool {
        self.endpoints
            .iter()
            .enumerate()
            .any(|(i, e)| i != index && lock(&e.state).in_rotation)
    }

    /// The error for requests that waited out an outage.
    fn gone(&self) -> VlmError {
        let first = &self.endpoints[0].client;
        let last = self
            .endpoints
            .iter()
            .find_map(|e| lock(&e.state).last_error.clone())
            .unwrap_or_else(|| "not ready".to_owned());
        let urls: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.client.base_url().to_string())
            .collect();
        VlmError::Unreachable {
            backend: first.backend(),
            url: urls.join(", "),
            reason: format!(
                "no endpoint came back within {:.0} s (--wait sets how long requests wait); last: {last}",
                self.options.outage_wait.as_secs_f64()
            ),
            start_command: first
                .backend()
                .start_command(first.base_url().port().unwrap_or(0)),
            source: None,
        }
    }

    /// Takes endpoint `index` out of the rotation and starts probing it; `announce` logs a
    /// warning when it was in the rotation.
    fn eject(this: &Arc<Shared>, index: usize, why: String, announce: bool) {
        let endpoint = &this.endpoints[index];
        let start_probe = {
            let mut s = lock(&endpoint.state);
            if s.in_rotation && announce {
                tracing::warn!(
                    "endpoint {} left the rotation: {}",
                    endpoint.client.base_url(),
                    crate::text::clip(&why, 300)
                );
            }
            s.in_rotation = false;
            s.last_error = Some(why);
            !std::mem::replace(&mut s.probing, true)
        };
        this.note_outage();
        this.changed.notify_waiters();
        if start_probe && tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(probe(Arc::downgrade(this), index));
        } else if start_probe {
            lock(&endpoint.state).probing = false;
        }
    }

    /// Puts endpoint `index` back in the rotation.
    fn rejoin(&self, index: usize) {
        let endpoint = &self.endpoints[index];
        {
            let mut s = lock(&endpoint.state);
            if !s.in_rotation {
                tracing::info!(
                    "endpoint {} is back in the rotation",
                    endpoint.client.base_url()
                );
            }
            s.in_rotation = true;
            s.failures = 0;
        }
        lock(&self.state).outage_since = None;
        self.changed.notify_waiters();
    }

    /// Records how a request on endpoint `index` ended.
    fn finish(this: &Arc<Shared>, lease: &Lease, result: &Result<VlmResponse, VlmError>) {
        let index = lease.index;
        let mut eject = None;
        {
            let mut s = lock(&this.endpoints[index].state);
            let sample = match result {
                Ok(_) => {
                    s.answered += 1;
                    s.failures = 0;
                    Some(Sample::Answered {
                        rtt: lease.sent.elapsed(),
                        in_flight: lease.in_flight,
                    })
                }
                Err(e) => {
                    let overloaded = e.is_timeout() || matches!(e.status(), Some(429 | 503));
                    match blame(e) {
                        Blame::None => {}
                        Blame::Down => eject = Some(e.to_string()),
                        Blame::Failed => {
                            s.failed += 1;
                            s.failures += 1;
                            if s.failures >= this.options.eject_after {
                                eject = Some(e.to_string());
                            }
                        }
                    }
                    overloaded.then_some(Sample::Overloaded)
                }
            };
            if let (Some(limiter), Some(sample)) = (s.limiter.as_mut(), sample) {
                limiter.on_sample(sample);
            }
        }
        if let Some(why) = eject {
            Shared::eject(this, index, why, true);
        }
    }

    /// Starts the poller of the servers' queue metrics, once, when adaptive.
    fn start_polling(self: &Arc<Self>) {
        if self.options.adaptive.is_none() {
            return;
        }
        let mut pool = lock(&self.state);
        if pool.polling || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        pool.polling = true;
        tokio::spawn(poll_queues(Arc::downgrade(self)));
    }
}

/// Probes an endpoint out of the rotation with backoff (0.25 s doubling to 2 s) until it is
/// ready, then puts it back. Ends when the replicas are dropped.
async fn probe(shared: Weak<Shared>, index: usize) {
    let mut delay = Duration::from_millis(250);
    loop {
        tokio::time::sleep(delay).await;
        let Some(this) = shared.upgrade() else { return };
        let client = this.endpoints[index].client.clone();
        let report = client.health().await;
        match report {
            Ok(r) if r.is_ready() => {
                lock(&this.endpoints[index].state).probing = false;
                this.rejoin(index);
                return;
            }
            Ok(r) => {
                let why = r.state.reason().unwrap_or("not ready").to_owned();
                lock(&this.endpoints[index].state).last_error = Some(why);
            }
            Err(e) => lock(&this.endpoints[index].state).last_error = Some(e.to_string()),
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// How often the servers' queue metrics are read.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// Reads each endpoint's queue metric (where its server publishes one) into its limiter.
async fn poll_queues(shared: Weak<Shared>) {
    loop {
        let Some(this) = shared.upgrade() else { return };
        for endpoint in &this.endpoints {
            let wanted = {
                let s = lock(&endpoint.state);
                s.in_rotation && s.metrics != Some(false)
            };
            if !wanted {
                continue;
            }
            let waiting = endpoint.client.queue_depth().await;
            let mut s = lock(&endpoint.state);
            if s.metrics.is_none() {
                s.metrics = Some(waiting.is_some());
                if let Some(w) = waiting {
                    tracing::debug!(
                        "{} publishes its queue ({w} waiting): --concurrency auto keeps it short",
                        endpoint.client.base_url()
                    );
                }
            }
            if let Some(limiter) = s.limiter.as_mut() {
                limiter.set_server_waiting(waiting);
            }
        }
        drop(this);
        tokio::time::sleep(POLL_EVERY).await;
    }
}

#[async_trait]
impl VlmClient for Replicas {
    fn backend(&self) -> VlmBackend {
        self.shared.endpoints[0].client.backend()
    }

    /// The model of the first endpoint that knows it.
    fn model(&self) -> Option<&str> {
        self.shared.endpoints.iter().find_map(|e| e.client.model())
    }

    /// The first endpoint's base URL (all of them: [`clients`](Self::clients)).
    fn base_url(&self) -> &Url {
        self.shared.endpoints[0].client.base_url()
    }

    fn check_image_type(&self, mime: ImageMime) -> Result<(), String> {
        self.shared.endpoints[0].client.check_image_type(mime)
    }

    async fn image_support(&self) -> Result<(), VlmError> {
        let ready = self
            .shared
            .endpoints
            .iter()
            .find(|e| lock(&e.state).in_rotation)
            .unwrap_or(&self.shared.endpoints[0]);
        ready.client.image_support().await
    }

    /// Checks every endpoint ([`health_all`](Self::health_all)) and returns the first ready
    /// one's report, or the first endpoint's when none is ready.
    async fn health(&self) -> Result<HealthReport, VlmError> {
        let mut reports = self.health_all().await;
        let ready = reports
            .iter()
            .position(|r| matches!(r, Ok(r) if r.is_ready()));
        reports.swap_remove(ready.unwrap_or(0))
    }

    async fn infer_single(&self, request: &VlmRequest) -> Result<VlmResponse, VlmError> {
        let mut avoid = None;
        let mut resends = 0usize;
        let most = 4 * self.shared.endpoints.len() + 8;
        loop {
            let lease = self.lease(avoid).await?;
            let client = self.shared.endpoints[lease.index].client.clone();
            let result = client.infer_single(request).await;
            Shared::finish(&self.shared, &lease, &result);
            let index = lease.index;
            drop(lease);
            match result {
                Err(e) if resends < most && self.may_resend(&e, index) => {
                    tracing::debug!(
                        "re-sending a request that failed at {}: {e}",
                        client.base_url()
                    );
                    avoid = Some(index);
                    resends += 1;
                }
                other => return other,
            }
        }
    }

    /// Opens the stream on the best endpoint; its place is held until the stream is dropped.
    async fn infer_stream(&self, request: &VlmRequest) -> Result<VlmStream, VlmError> {
        use futures_util::StreamExt as _;
        let lease = self.lease(None).await?;
        let client = self.shared.endpoints[lease.index].client.clone();
        let stream = client.infer_stream(request).await?;
        Ok(Box::pin(stream.map(move |event| {
            let _held = &lease;
            event
        })))
    }

    async fn queue_depth(&self) -> Option<f64> {
        let mut total = None;
        for e in &self.shared.endpoints {
            if let Some(w) = e.client.queue_depth().await {
                *total.get_or_insert(0.0) += w;
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use futures_util::StreamExt as _;

    use super::*;
    use crate::health::HealthState;

    /// A simulated server: `slots` requests run at once for `service` each, the rest queue; past
    /// `queue_limit` waiting, 503. `down`: connections refused.
    #[derive(Debug)]
    struct Sim {
        url: Url,
        slots: tokio::sync::Semaphore,
        waiting: AtomicUsize,
        queue_limit: usize,
        service: Duration,
        down: AtomicBool,
        fail_5xx: AtomicBool,
        answered: Mutex<Vec<String>>,
        rejected: AtomicUsize,
    }

    impl Sim {
        fn new(port: u16, slots: usize, service_ms: u64) -> Arc<Sim> {
            Arc::new(Sim {
                url: Url::parse(&format!("http://127.0.0.1:{port}/v1/")).unwrap(),
                slots: tokio::sync::Semaphore::new(slots),
                waiting: AtomicUsize::new(0),
                queue_limit: 4 * slots,
                service: Duration::from_millis(service_ms),
                down: AtomicBool::new(false),
                fail_5xx: AtomicBool::new(false),
                answered: Mutex::new(Vec::new()),
                rejected: AtomicUsize::new(0),
            })
        }

        fn unreachable(&self) -> VlmError {
            VlmError::Unreachable {
                backend: VlmBackend::Vllm,
                url: self.url.to_string(),
                reason: "connection refused".into(),
                start_command: "vllm serve".into(),
                source: None,
            }
        }

        fn http(&self, status: u16) -> VlmError {
            VlmError::Http {
                backend: VlmBackend::Vllm,
                url: self.url.to_string(),
                status,
                message: "overloaded".into(),
                kind: None,
            }
        }
    }

    #[async_trait]
    impl VlmClient for Sim {
        fn backend(&self) -> VlmBackend {
            VlmBackend::Vllm
        }
        fn model(&self) -> Option<&str> {
            Some("m")
        }
        fn base_url(&self) -> &Url {
            &self.url
        }
        async fn health(&self) -> Result<HealthReport, VlmError> {
            let state = if self.down.load(Ordering::SeqCst) {
                HealthState::Unreachable {
                    reason: "connection refused".into(),
                }
            } else {
                HealthState::Ready
            };
            Ok(HealthReport::new(VlmBackend::Vllm, self.url.clone(), state))
        }
        async fn infer_single(&self, request: &VlmRequest) -> Result<VlmResponse, VlmError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(self.unreachable());
            }
            if self.fail_5xx.load(Ordering::SeqCst) {
                return Err(self.http(500));
            }
            if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.queue_limit {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                self.rejected.fetch_add(1, Ordering::SeqCst);
                return Err(self.http(503));
            }
            let permit = self.slots.acquire().await;
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            tokio::time::sleep(self.service).await;
            drop(permit);
            if self.down.load(Ordering::SeqCst) {
                // Killed while working: the connection resets before the answer.
                return Err(self.unreachable());
            }
            lock(&self.answered).push(request.prompt.clone());
            Ok(VlmResponse::new(VlmBackend::Vllm, "m", "ok"))
        }
        async fn queue_depth(&self) -> Option<f64> {
            Some(self.waiting.load(Ordering::SeqCst) as f64)
        }
    }

    fn requests(n: usize) -> Vec<VlmRequest> {
        (0..n)
            .map(|i| VlmRequest::builder(i.to_string()).build().unwrap())
            .collect()
    }

    /// Sends every request with `concurrency` in flight (or, when `None`, as the adaptive
    /// limits admit), returning the simulated seconds taken and the errors.
    async fn drive(replicas: &Replicas, n: usize, concurrency: Option<usize>) -> (f64, usize) {
        let started = tokio::time::Instant::now();
        let all = requests(n);
        let errors: usize = futures_util::stream::iter(all.iter())
            .map(|request| async move {
                let _admitted = match concurrency {
                    None => Some(replicas.admit().await),
                    Some(_) => None,
                };
                replicas.infer_single(request).await.is_err()
            })
            .buffer_unordered(concurrency.unwrap_or(1024))
            .filter(|failed| std::future::ready(*failed))
            .count()
            .await;
        // Throughput counts answers only: fast 503s are not work done.
        (started.elapsed().as_secs_f64(), errors)
    }

    fn replicas(sims: &[Arc<Sim>], options: ReplicaOptions) -> Replicas {
        let clients = sims
            .iter()
            .map(|s| s.clone() as Arc<dyn VlmClient>)
            .collect();
        Replicas::new(clients, options).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn adaptive_concurrency_reaches_ninety_percent_of_the_best_fixed_level() {
        let options = || ReplicaOptions::default().outage_wait(Duration::from_secs(1));
        let mut best: f64 = 0.0;
        for c in [1, 2, 4, 8, 16, 32, 64] {
            let sim = Sim::new(1, 8, 100);
            let (secs, errors) = drive(&replicas(&[sim], options()), 2000, Some(c)).await;
            best = best.max((2000 - errors) as f64 / secs);
        }
        let sim = Sim::new(1, 8, 100);
        let r = replicas(std::slice::from_ref(&sim), options().adaptive(256));
        let (secs, errors) = drive(&r, 2000, None).await;
        let auto = 2000.0 / secs;
        assert_eq!((errors, sim.rejected.load(Ordering::SeqCst)), (0, 0));
        assert!(
            auto >= 0.9 * best,
            "auto {auto:.1}/s vs best fixed {best:.1}/s"
        );
        let stats = r.stats();
        let (low, high) = stats[0].limit_range.unwrap();
        assert!(low >= 1 && high <= 8 + 16, "{low}..{high}");
    }

    #[tokio::test(start_paused = true)]
    async fn two_endpoints_one_killed_mid_run_every_request_answered_once() {
        let (a, b) = (Sim::new(1, 4, 50), Sim::new(2, 4, 50));
        let r = replicas(&[a.clone(), b.clone()], ReplicaOptions::default());
        let killer = {
            let b = b.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                b.down.store(true, Ordering::SeqCst);
            })
        };
        let (_, errors) = drive(&r, 400, Some(8)).await;
        killer.await.unwrap();
        assert_eq!(errors, 0);
        let mut seen: HashMap<String, usize> = HashMap::new();
        for p in lock(&a.answered).iter().chain(lock(&b.answered).iter()) {
            *seen.entry(p.clone()).or_default() += 1;
        }
        assert_eq!(seen.len(), 400);
        assert!(seen.values().all(|n| *n == 1));
        let stats = r.stats();
        assert!(!stats[1].in_rotation && stats[0].answered > stats[1].answered);
        assert_eq!(stats[0].answered + stats[1].answered, 400);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_is_waited_out_and_one_longer_than_the_wait_fails() {
        let sim = Sim::new(1, 4, 50);
        let r = replicas(std::slice::from_ref(&sim), ReplicaOptions::default());
        let restart = {
            let sim = sim.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                sim.down.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(10)).await;
                sim.down.store(false, Ordering::SeqCst);
            })
        };
        let (secs, errors) = drive(&r, 200, Some(4)).await;
        restart.await.unwrap();
        assert_eq!(errors, 0);
        assert!(secs > 10.0, "{secs}");
        assert_eq!(lock(&sim.answered).len(), 200);

        let r = replicas(
            std::slice::from_ref(&sim),
            ReplicaOptions::default().outage_wait(Duration::from_secs(5)),
        );
        sim.down.store(true, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        let err = r.infer_single(&requests(1)[0]).await.unwrap_err();
        assert!(err.is_unreachable(), "{err}");
        assert!(
            err.to_string().contains("no endpoint came back within 5 s"),
            "{err}"
        );
        assert!(started.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn an_endpoint_failing_with_5xx_leaves_and_its_requests_go_elsewhere() {
        let (a, b) = (Sim::new(1, 4, 10), Sim::new(2, 4, 10));
        b.fail_5xx.store(true, Ordering::SeqCst);
        let r = replicas(&[a.clone(), b.clone()], ReplicaOptions::default());
        let (_, errors) = drive(&r, 50, Some(4)).await;
        assert_eq!(errors, 0);
        assert_eq!(lock(&a.answered).len(), 50);
        let stats = r.stats();
        assert!(!stats[1].in_rotation);
        assert_eq!(stats[1].failed, 3);
        // Alone, a failing endpoint's error comes back as it is.
        let r = replicas(std::slice::from_ref(&b), ReplicaOptions::default());
        let err = r.infer_single(&requests(1)[0]).await.unwrap_err();
        assert_eq!(err.status(), Some(500));
    }
}
