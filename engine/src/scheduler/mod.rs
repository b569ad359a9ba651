//! One queue and one group of executors per (model version, device).
//!
//! Requests enter a [`BatchQueue`] behind a mutex. A batcher task decides when to run (the pure
//! [`BatchQueue::next_batch`]), merges the chosen requests into one batch along dim 0, and hands it
//! to the executor threads through a channel of one slot: while the executors run their batches,
//! the next is formed (prefetch exactly one; in adaptive mode on the CPU, only a full one, or
//! shortly before an instance is predicted free unless it gathers closed-loop clients). Each
//! executor (an *instance*, Triton's instance group) has its own copy of the model, on a GPU its
//! own stream, so `N` instances run `N` batches at once; the first free one takes the batch
//! handed over. It splits the outputs back per request.
//!
//! In adaptive mode on the CPU, a version on one instance whose model ran two batches side by side
//! faster than one after another when it was loaded ([`Model::side_by_side`], measured by
//! [`crate::model::lanes_gain`]) gets a pair of executors on that one copy: one batch at a time on
//! every core, or two at once on half the cores each, whichever [`adaptive::Split`] measures
//! faster under the load of the moment ([`adaptive::Adaptive::lanes`]). An executor takes a lane
//! before it takes a batch.

pub mod adaptive;
mod queue;

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc, oneshot};

pub use adaptive::Running;
pub use queue::{BatchConfig, BatchQueue, CpuPair, Decision, Entry, Next, PushError, Waiting};

use crate::{Device, EngineError, Model, Stats, Tensor};

/// One inference request as the scheduler sees it: inputs in signature order.
#[derive(Debug)]
pub struct InferRequest {
    pub inputs: Vec<Tensor>,
    /// The protocol's `priority`: 1 is the highest, 0 means the default (lowest).
    pub priority: u32,
    /// The protocol's `timeout`: how long the request may wait before it reaches the device.
    pub timeout: Option<Duration>,
    /// When the request reached the server (before its body was read and parsed): its latency
    /// objective and timeout count from here. `None`: from the call to `infer`.
    pub arrived: Option<Instant>,
}

type Reply = oneshot::Sender<Result<Vec<Tensor>, EngineError>>;

#[derive(Debug)]
struct Pending {
    inputs: Vec<Tensor>,
    reply: Reply,
}

impl Waiting for Pending {
    fn client_gone(&self) -> bool {
        self.reply.is_closed()
    }
}

struct Shared {
    queue: Mutex<BatchQueue<Pending>>,
    wake: Notify,
    /// Signalled (with the queue's lock) when a lane frees up or the number of lanes changes.
    lanes: Condvar,
    /// The scheduler was dropped: the batcher ends once the queue is empty.
    closed: AtomicBool,
    /// The batcher has ended (for any reason, a panic included): nothing more will be answered.
    batcher_gone: AtomicBool,
}

/// Set when the batcher ends however it ends: answers whatever is still queued, so that no
/// request waits for a reply that cannot come.
struct BatcherExit(Arc<Shared>);

impl Drop for BatcherExit {
    fn drop(&mut self) {
        self.0.batcher_gone.store(true, Ordering::Release);
        let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
        for e in q.drain() {
            let _ = e
                .payload
                .reply
                .send(Err(EngineError::Unavailable("the version stopped before running this request".into())));
        }
    }
}

/// A formed batch on its way to the executor.
struct Batch {
    inputs: Vec<Tensor>,
    rows: Vec<usize>,
    replies: Vec<Reply>,
    /// Each request's own inputs (unpadded), kept when several share the batch so that they can
    /// run alone if the batch fails.
    singles: Vec<Vec<Tensor>>,
}

/// The handle requests go through. Dropping it stops the batcher once the queue is empty and the
/// executors once their last batches are done.
pub struct Scheduler {
    shared: Arc<Shared>,
    model: Arc<dyn Model>,
    stats: Arc<Stats>,
    /// The instances it was started with (a CPU pair counts as the one it is).
    instances: usize,
    /// Executor threads: the instances, or the CPU pair's two.
    executors: usize,
}

/// The receiving end of the hand-over slot, shared by the executors: the one holding the lock
/// waits for the next batch, the others are running theirs or queue behind it.
type Slot = Arc<Mutex<mpsc::Receiver<Batch>>>;

impl Scheduler {
    /// Starts the batcher (on the current tokio runtime) and one executor thread per instance:
    /// `instances` are copies of one version's model (loaded apart, so that none waits on
    /// another's state or stream, or one shared copy of a [`Model::concurrent`] one); the first
    /// answers for the signature and preprocessing. In adaptive mode on the CPU, a model on one
    /// instance that runs faster in two lanes ([`Model::side_by_side`]) gets a pair of executors
    /// (see the module's documentation), unless [`BatchConfig::cpu_pair`] says otherwise.
    ///
    /// # Panics
    /// If `instances` is empty.
    pub fn start(instances: Vec<Arc<dyn Model>>, config: BatchConfig, stats: Arc<Stats>) -> Scheduler {
        let model = instances.first().expect("a version runs on at least one instance").clone();
        let pad = model.signature().pad_to_longest;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let paired = model.device() == Device::Cpu
            && cores >= 2
            && config.pairs(instances.len(), model.concurrent(), model.side_by_side());
        let configured = instances.len();
        let instances = if paired { vec![model.clone(), model.clone()] } else { instances };
        let executors = instances.len();
        let mut queue = BatchQueue::new(config, pad);
        queue.adaptive = adaptive::Adaptive::with_instances(instances.len());
        queue.adaptive.shares_cores = model.device() == Device::Cpu;
        queue.adaptive.paired = paired;
        let shared = Arc::new(Shared {
            queue: Mutex::new(queue),
            wake: Notify::new(),
            lanes: Condvar::new(),
            closed: AtomicBool::new(false),
            batcher_gone: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel::<Batch>(1);
        tokio::spawn(batcher(shared.clone(), tx, pad, stats.clone()));
        let slot: Slot = Arc::new(Mutex::new(rx));
        for (index, instance) in instances.into_iter().enumerate() {
            let (slot, stats, shared) = (slot.clone(), stats.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("algolink-executor-{index}"))
                .spawn(move || executor(index, instance, slot, stats, shared))
                .expect("spawn executor thread");
        }
        Scheduler { shared, model, stats, instances: configured, executors }
    }

    pub fn model(&self) -> &Arc<dyn Model> {
        &self.model
    }

    /// How many instances run this version's batches (as configured: a CPU pair is one).
    pub fn instances(&self) -> usize {
        self.instances
    }

    /// How many executor threads run its batches: the instances, or a CPU pair's two.
    pub fn executors(&self) -> usize {
        self.executors
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn config(&self) -> BatchConfig {
        self.shared.queue.lock().expect("queue lock").config().clone()
    }

    /// Queues a request and waits for its outputs. Dropping the future abandons the request: it
    /// is skipped before it reaches the device.
    pub async fn infer(&self, request: InferRequest) -> Result<Vec<Tensor>, EngineError> {
        let rows = self.model.signature().check_inputs(&request.inputs)?;
        let inputs = self.preprocess(request.inputs).await?;
        let seq_len = match self.model.signature().pad_to_longest {
            true => inputs.first().and_then(|t| t.shape.get(1)).copied().unwrap_or(1),
            false => 1,
        };
        let now = Instant::now();
        let arrived = request.arrived.filter(|&a| a <= now).unwrap_or(now);
        let (reply, rx) = oneshot::channel();
        let entry = Entry {
            rows,
            priority: if request.priority == 0 { u32::MAX } else { request.priority },
            enqueued: arrived,
            deadline: request.timeout.map(|t| arrived + t),
            shape_key: shape_key(&inputs),
            seq_len,
            payload: Pending { inputs, reply },
        };
        let prediction = {
            let mut q = self.shared.queue.lock().expect("queue lock");
            if self.shared.batcher_gone.load(Ordering::Acquire) {
                return Err(EngineError::Unavailable("this version's batcher has stopped".into()));
            }
            let prediction = q.push(entry).map_err(|(err, _)| push_error(err, &self.stats, q.len()));
            self.stats.queue_depth.store(q.len() as u64, Ordering::Relaxed);
            prediction
        };
        let prediction = match prediction {
            Ok(prediction) => prediction,
            Err(e) => return Err(self.refused(e).await),
        };
        self.shared.wake.notify_one();
        let outputs =
            rx.await.map_err(|_| EngineError::Unavailable("the scheduler stopped before answering".into()))?;
        // A request the queue refused as late is not measured: its finish is only the corrected
        // prediction, and counting that would feed the correction back into itself.
        if let Err(e @ EngineError::WouldMissDeadline { .. }) = outputs {
            return Err(self.refused(e).await);
        }
        // Measured here, once the caller runs again, so that the wait for a thread to resume it
        // counts: under overload that wait is part of what the client sees.
        if let Some(prediction) = prediction {
            let mut q = self.shared.queue.lock().expect("queue lock");
            let now = Instant::now();
            let shed_at = q.adaptive.shed_at;
            q.adaptive.calibration.observe(prediction, now.saturating_duration_since(arrived), now, shed_at);
            let ppm = (q.adaptive.calibration.factor() * 1e6) as u64;
            self.stats.prediction_factor_ppm.store(ppm, Ordering::Relaxed);
        }
        outputs
    }
}

/// The longest a refusal as late is held back (see [`Scheduler::infer`]): a refusal is still
/// early, well before the objective it would have missed.
const REFUSAL_HOLD_MAX: Duration = Duration::from_millis(50);

/// Requests whose preprocessing (bytes of text to tokenise) is larger than this run it on tokio's
/// blocking pool; smaller ones (a few sentences: tens of microseconds) run in place, where a
/// thread hop would cost more than the work.
const PREPROCESS_INLINE_MAX: usize = 4096;

impl Scheduler {
    async fn preprocess(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        if self.model.preprocess_cost(&inputs) <= PREPROCESS_INLINE_MAX {
            return self.model.preprocess(inputs);
        }
        let model = self.model.clone();
        tokio::task::spawn_blocking(move || model.preprocess(inputs))
            .await
            .map_err(|_| EngineError::Execution("preprocessing panicked".into()))?
    }

    /// A request refused as late is answered once the work ahead of it is predicted done (the
    /// batch running, the one handed over and what is queued; at most [`REFUSAL_HOLD_MAX`]),
    /// not at once: a closed-loop client asking again at once found the same queue and was
    /// refused again, as fast as the HTTP thread could refuse, and that work made every answer
    /// later and the refusals self-sustaining (see `bench/shed_storm.sh`). Other errors pass
    /// at once.
    async fn refused(&self, e: EngineError) -> EngineError {
        if matches!(e, EngineError::WouldMissDeadline { .. }) {
            let now = Instant::now();
            let done = {
                let q = self.shared.queue.lock().expect("queue lock");
                let ahead = q.adaptive.predicted_finish(now, q.rows(), 0, q.config().max_batch_size);
                ahead.max(q.adaptive.device_free_at(now))
            };
            if let Some(done) = done {
                tokio::time::sleep_until(done.min(now + REFUSAL_HOLD_MAX).into()).await;
            }
        }
        e
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_one();
    }
}

/// The error a request refused by the queue gets (`queued`: how many wait, for `QueueFull`),
/// counted in the stats.
fn push_error(err: PushError, stats: &Stats, queued: usize) -> EngineError {
    match err {
        PushError::QueueFull => {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            // A batch's worth of time is a fair guess of when room frees up.
            let retry_after =
                Duration::from_secs_f64(stats.compute_seconds.mean().max(0.001)).max(Duration::from_secs(1));
            EngineError::QueueFull { queued, retry_after }
        }
        PushError::TooManyRows { rows, max } => {
            EngineError::InvalidInput(format!("request has {rows} rows, more than the model's max_batch_size {max}"))
        }
        PushError::TooManyTokens { tokens, max } => EngineError::InvalidInput(format!(
            "request has {tokens} tokens (rows × longest sequence), more than the model's max_batch_tokens {max}"
        )),
        PushError::WouldMissDeadline { predicted, deadline } => {
            stats.shed.fetch_add(1, Ordering::Relaxed);
            let retry_after = predicted.saturating_sub(deadline).max(Duration::from_secs(1));
            EngineError::WouldMissDeadline { predicted, deadline, retry_after }
        }
    }
}

fn shape_key(inputs: &[Tensor]) -> u64 {
    let mut h = DefaultHasher::new();
    for t in inputs {
        t.shape.get(1..).hash(&mut h);
    }
    h.finish()
}

async fn batcher(shared: Arc<Shared>, tx: mpsc::Sender<Batch>, pad: bool, stats: Arc<Stats>) {
    let _exit = BatcherExit(shared.clone());
    loop {
        // Wait for the hand-over slot to be free first, so the batch is formed as late as possible.
        let Ok(permit) = tx.reserve().await else { return };
        let (entries, rows) = loop {
            let (next, rows) = {
                let mut q = shared.queue.lock().expect("queue lock");
                let next = q.next_batch(Instant::now());
                let rows: usize = next.batch.iter().map(|e| e.rows).sum();
                if matches!(next.decision, Decision::Run) {
                    // Out of the queue, not yet on the device: still ahead of every new arrival.
                    // Added, and taken off by the executor that starts it: with several
                    // instances, one may start the batch before this one while it is formed.
                    q.adaptive.handed_over_rows += rows;
                }
                stats.queue_depth.store(q.len() as u64, Ordering::Relaxed);
                (next, rows)
            };
            for e in next.expired {
                stats.expired.fetch_add(1, Ordering::Relaxed);
                let waited = e.enqueued.elapsed();
                let _ = e.payload.reply.send(Err(EngineError::DeadlineExceeded { waited }));
            }
            for (e, why) in next.late {
                stats.shed_late.fetch_add(1, Ordering::Relaxed);
                let _ = e.payload.reply.send(Err(push_error(why, &stats, 0)));
            }
            stats.cancelled.fetch_add(next.cancelled.len() as u64, Ordering::Relaxed);
            match next.decision {
                Decision::Run => break (next.batch, rows),
                Decision::WaitUntil(t) | Decision::Busy(t) => {
                    if matches!(next.decision, Decision::WaitUntil(_)) {
                        let wait = t.saturating_duration_since(Instant::now());
                        stats.planned_wait_seconds.observe(wait.as_secs_f64());
                    }
                    tokio::select! {
                        _ = shared.wake.notified() => {}
                        _ = tokio::time::sleep_until(t.into()) => {}
                    }
                }
                Decision::Idle => {
                    if shared.closed.load(Ordering::Acquire) {
                        return;
                    }
                    shared.wake.notified().await;
                }
            }
        };
        let now = Instant::now();
        for e in &entries {
            stats.record_queued(now - e.enqueued);
        }
        match form_batch(entries, pad) {
            Ok(batch) => permit.send(batch),
            Err((err, replies)) => {
                let mut q = shared.queue.lock().expect("queue lock");
                q.adaptive.handed_over_rows = q.adaptive.handed_over_rows.saturating_sub(rows);
                drop(q);
                for r in replies {
                    let _ = r.send(Err(EngineError::InvalidInput(err.to_string())));
                }
            }
        }
    }
}

/// Merges the entries' inputs along dim 0 (padding trailing dims when allowed).
fn form_batch(entries: Vec<Entry<Pending>>, pad: bool) -> Result<Batch, (EngineError, Vec<Reply>)> {
    let rows: Vec<usize> = entries.iter().map(|e| e.rows).collect();
    let (inputs_per_req, replies): (Vec<Vec<Tensor>>, Vec<Reply>) =
        entries.into_iter().map(|e| (e.payload.inputs, e.payload.reply)).unzip();
    let n_inputs = inputs_per_req[0].len();
    if inputs_per_req.len() == 1 {
        let inputs = inputs_per_req.into_iter().next().expect("one request");
        return Ok(Batch { inputs, rows, replies, singles: Vec::new() });
    }
    let mut inputs = Vec::with_capacity(n_inputs);
    for i in 0..n_inputs {
        let parts: Vec<&Tensor> = inputs_per_req.iter().map(|r| &r[i]).collect();
        match Tensor::concat(&parts, pad) {
            Ok(t) => inputs.push(t),
            Err(e) => return Err((e, replies)),
        }
    }
    Ok(Batch { inputs, rows, replies, singles: inputs_per_req })
}

/// Instance `index`: takes a lane, then the batch handed over, until the batcher ends.
fn executor(index: usize, model: Arc<dyn Model>, slot: Slot, stats: Arc<Stats>, shared: Arc<Shared>) {
    let lock = || shared.queue.lock().unwrap_or_else(|p| p.into_inner());
    let release = |q: &mut BatchQueue<Pending>| {
        q.adaptive.lanes_taken -= 1;
        shared.lanes.notify_all();
    };
    loop {
        {
            let mut q = lock();
            while q.adaptive.lanes_taken >= q.adaptive.lanes() {
                q = shared.lanes.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            q.adaptive.lanes_taken += 1;
        }
        let Some(batch) = slot.lock().unwrap_or_else(|p| p.into_inner()).blocking_recv() else {
            release(&mut lock());
            return;
        };
        let total: usize = batch.rows.iter().sum();
        let start = Instant::now();
        // Paired executors in two lanes run on half the cores each ([`Model::run_in_lane`]).
        let lanes = {
            let mut q = lock();
            let took = q.adaptive.latency.predict(total).map(Duration::from_secs_f64);
            q.adaptive.started(index, total, start + took.unwrap_or_default());
            if q.adaptive.paired { q.adaptive.lanes() } else { 1 }
        };
        let run = |inputs| run_guarded(model.as_ref(), inputs, index, lanes);
        let result = run(batch.inputs);
        let took = start.elapsed();
        stats.record_batch(total, took);
        let answers: Vec<Result<Vec<Tensor>, EngineError>> =
            match result.and_then(|outputs| split_outputs(outputs, &batch.rows)) {
                Ok(per_request) => per_request.into_iter().map(Ok).collect(),
                Err(e) if batch.replies.len() == 1 => vec![Err(as_execution(e))],
                // One bad request must not fail its neighbours: each runs on its own, still in
                // this lane (released, another executor would take the next batch beside them).
                Err(_) => batch.singles.into_iter().map(|inputs| run(inputs).map_err(as_execution)).collect(),
            };
        {
            let mut q = lock();
            q.adaptive.finished(index, start + took);
            q.adaptive.latency.observe(total, took.as_secs_f64());
            if let Some((a, c)) = q.adaptive.latency.coefficients() {
                stats.fit_base_ns.store((a * 1e9) as u64, Ordering::Relaxed);
                stats.fit_per_row_ns.store((c * 1e9) as u64, Ordering::Relaxed);
            }
            stats.groups.store(q.adaptive.split.groups() as u64, Ordering::Relaxed);
            for (stat, rate) in stats.groups_rows_per_second.iter().zip(q.adaptive.split.rates()) {
                stat.store(rate.unwrap_or(0.0) as u64, Ordering::Relaxed);
            }
            release(&mut q);
        }
        // An instance is free: the batcher decides again now rather than at its planned time.
        shared.wake.notify_one();
        for (reply, answer) in batch.replies.into_iter().zip(answers) {
            let _ = reply.send(answer);
        }
    }
}

/// Runs the model, as `lane` of `lanes` batches side by side (see [`Model::run_in_lane`]); a
/// panicking backend fails this call, not the executor thread (and so not every later request).
fn run_guarded(model: &dyn Model, inputs: Vec<Tensor>, lane: usize, lanes: usize) -> Result<Vec<Tensor>, EngineError> {
    let run = || if lanes > 1 { model.run_in_lane(inputs, lane, lanes) } else { model.run(inputs) };
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
        .unwrap_or_else(|_| Err(EngineError::Execution("the model panicked while running this batch".into())))
}

/// Errors from the model are execution failures, except a request's own invalid input.
fn as_execution(e: EngineError) -> EngineError {
    match e {
        EngineError::InvalidInput(_) | EngineError::Execution(_) => e,
        other => EngineError::Execution(other.to_string()),
    }
}

/// Splits every tensor along dim 0 by the requests' rows; returns one list per request.
fn split_outputs(outputs: Vec<Tensor>, rows: &[usize]) -> Result<Vec<Vec<Tensor>>, EngineError> {
    let mut per_request: Vec<Vec<Tensor>> = rows.iter().map(|_| Vec::with_capacity(outputs.len())).collect();
    for out in outputs {
        for (i, piece) in out.split_rows(rows)?.into_iter().enumerate() {
            per_request[i].push(piece);
        }
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::{DataType, Signature, TensorSpec};

    /// Echoes its input after `delay`, counting how many of its instances run at once.
    struct Slow {
        signature: Signature,
        delay: Duration,
        running: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        /// What it says of lanes: [`Model::concurrent`], [`Model::side_by_side`].
        lanes: (bool, bool),
    }

    impl Model for Slow {
        fn signature(&self) -> &Signature {
            &self.signature
        }

        fn concurrent(&self) -> bool {
            self.lanes.0
        }

        fn side_by_side(&self) -> bool {
            self.lanes.1
        }

        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
            let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            self.running.fetch_sub(1, Ordering::SeqCst);
            Ok(inputs)
        }
    }

    fn slow(delay: Duration, running: Arc<AtomicUsize>, most: Arc<AtomicUsize>, lanes: (bool, bool)) -> Arc<dyn Model> {
        let spec = TensorSpec { name: "x".into(), datatype: DataType::F32, shape: vec![-1, 1] };
        let signature = Signature {
            platform: "test".into(),
            inputs: vec![spec.clone()],
            outputs: vec![spec],
            pad_to_longest: false,
        };
        Arc::new(Slow { signature, delay, running, most, lanes })
    }

    /// Runs 8 one-row requests (one per batch) on `instances` copies of a model that takes 40 ms;
    /// returns how many ran at once at most, after checking every answer is the request's own.
    async fn most_at_once(instances: usize) -> usize {
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let models: Vec<Arc<dyn Model>> = (0..instances)
            .map(|_| slow(Duration::from_millis(40), running.clone(), most.clone(), (false, false)))
            .collect();
        let config = BatchConfig { max_batch_size: 1, ..BatchConfig::default() };
        let scheduler = Arc::new(Scheduler::start(models, config, Arc::new(Stats::default())));
        assert_eq!(scheduler.instances(), instances);
        let calls = (0..8).map(|i| {
            let scheduler = scheduler.clone();
            tokio::spawn(async move {
                let x = Tensor::from_f32(vec![1, 1], &[i as f32]).unwrap();
                let request = InferRequest { inputs: vec![x], priority: 0, timeout: None, arrived: None };
                let out = scheduler.infer(request).await.unwrap();
                assert_eq!(out[0].to_f32().unwrap(), vec![i as f32]);
            })
        });
        for call in calls.collect::<Vec<_>>() {
            call.await.unwrap();
        }
        most.load(Ordering::SeqCst)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instances_run_batches_side_by_side() {
        assert_eq!(most_at_once(1).await, 1, "one instance runs one batch at a time");
        assert_eq!(most_at_once(2).await, 2, "two instances run two batches at once");
        assert_eq!(most_at_once(3).await, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_as_late_is_held_while_the_work_ahead_runs() {
        // Batches of one row, 200 ms each, against a 300 ms objective. The first request runs
        // (nothing learnt), so does the second (a lone request makes it); one arriving 20 ms
        // into the second's batch would finish 380 ms after it came: refused, but answered only
        // when the work ahead is done (here after REFUSAL_HOLD_MAX), so that a client asking again
        // at once finds another queue.
        let model = slow(Duration::from_millis(200), Default::default(), Default::default(), (false, false));
        let config =
            BatchConfig { max_batch_size: 1, latency_slo: Some(Duration::from_millis(300)), ..BatchConfig::default() };
        let scheduler = Arc::new(Scheduler::start(vec![model], config, Arc::new(Stats::default())));
        let request = || InferRequest {
            inputs: vec![Tensor::from_f32(vec![1, 1], &[1.0]).unwrap()],
            priority: 0,
            timeout: None,
            arrived: None,
        };
        scheduler.infer(request()).await.unwrap();
        let second = {
            let scheduler = scheduler.clone();
            tokio::spawn(async move { scheduler.infer(request()).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let asked = Instant::now();
        let refused = scheduler.infer(request()).await;
        assert!(matches!(refused, Err(EngineError::WouldMissDeadline { .. })), "{refused:?}");
        assert!(asked.elapsed() >= REFUSAL_HOLD_MAX, "answered after {:?}", asked.elapsed());
        second.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cpu_pair_runs_where_measured_or_configured() {
        let two_cores = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
        let executors = |cpu_pair, lanes, adaptive: bool| {
            let model = slow(Duration::ZERO, Default::default(), Default::default(), lanes);
            let latency_slo = adaptive.then(|| Duration::from_millis(100));
            let config = BatchConfig { latency_slo, cpu_pair, ..BatchConfig::default() };
            let scheduler = Scheduler::start(vec![model], config, Arc::new(Stats::default()));
            assert_eq!(scheduler.instances(), 1, "a pair is one instance");
            scheduler.executors()
        };
        let pair = if two_cores { 2 } else { 1 };
        // (concurrent, measured faster in two lanes)
        assert_eq!(executors(CpuPair::Auto, (true, true), true), pair, "measured faster: paired");
        assert_eq!(executors(CpuPair::Auto, (true, false), true), 1, "measured slower: one executor");
        assert_eq!(executors(CpuPair::On, (true, false), true), pair, "configured on");
        assert_eq!(executors(CpuPair::On, (false, false), true), 1, "a model without lanes is never paired");
        assert_eq!(executors(CpuPair::Off, (true, true), true), 1, "configured off");
        assert_eq!(executors(CpuPair::Auto, (true, true), false), 1, "static mode has no pair");
    }
}
