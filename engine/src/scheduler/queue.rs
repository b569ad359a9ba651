//! The batching decision: a plain struct with no IO, driven by the scheduler and tested as tables.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::adaptive::{ADMISSION_HEADROOM, Adaptive, Plan, Prediction};

/// Triton-compatible knobs of the dynamic batcher.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchConfig {
    /// Largest number of rows in one executed batch; a request with more rows is refused.
    pub max_batch_size: usize,
    /// How long the oldest request may wait for others before a partial batch runs.
    pub max_queue_delay: Duration,
    /// Batch sizes that run at once, without waiting out the delay, when exactly reached.
    pub preferred_batch_sizes: Vec<usize>,
    /// Requests that may wait at once; one more is refused.
    pub max_queue_size: usize,
    /// Models that pad requests to the longest (text encoders): the most padded tokens (longest
    /// sequence × rows) one batch may hold, as TEI's `max_batch_tokens`; a request over it alone
    /// is refused. `None`: no token budget.
    pub max_batch_tokens: Option<usize>,
    /// `Some(objective)`: adaptive batching (the delay and preferred sizes are then ignored): the
    /// batcher waits for more rows only while it raises throughput and every request can still
    /// finish within the objective, and refuses a request predicted to miss it. `None`: static.
    pub latency_slo: Option<Duration>,
    /// Adaptive mode on the CPU, one instance: whether the version runs on a pair of executors.
    pub cpu_pair: CpuPair,
}

/// Whether a version in adaptive mode on the CPU, on one instance, runs on a pair of executors
/// sharing one copy (see the scheduler's module documentation), Triton-style explicit when the
/// measurement at load is not wanted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuPair {
    /// When the test at load found two lanes faster ([`crate::Model::side_by_side`]).
    #[default]
    Auto,
    /// Whenever the model can run batches side by side ([`crate::Model::concurrent`]); the
    /// split then picks one lane or two under load, as it measures.
    On,
    /// Never: one executor, each batch on every core.
    Off,
}

impl BatchConfig {
    /// Whether a version on `instances` may run on the CPU pair (adaptive mode, one instance),
    /// and [`CpuPair::Auto`] leaves it to the test at load: then the load measures it
    /// (`LoadOptions::measure_lanes`).
    pub fn measures_lanes(&self, instances: usize) -> bool {
        self.may_pair(instances) && self.cpu_pair == CpuPair::Auto
    }

    /// Adaptive mode on one instance: where [`Scheduler::start`](crate::Scheduler::start) pairs
    /// a CPU model, as [`BatchConfig::cpu_pair`] says.
    fn may_pair(&self, instances: usize) -> bool {
        self.latency_slo.is_some() && instances == 1
    }

    /// Whether a CPU model on `instances` runs on a pair of executors: what it can
    /// ([`crate::Model::concurrent`]) and measured ([`crate::Model::side_by_side`]) against
    /// [`BatchConfig::cpu_pair`].
    pub fn pairs(&self, instances: usize, concurrent: bool, side_by_side: bool) -> bool {
        self.may_pair(instances)
            && match self.cpu_pair {
                CpuPair::Auto => side_by_side,
                CpuPair::On => concurrent,
                CpuPair::Off => false,
            }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch_size: 64,
            max_queue_delay: Duration::ZERO,
            preferred_batch_sizes: Vec::new(),
            max_queue_size: 1024,
            max_batch_tokens: Some(16_384),
            latency_slo: None,
            cpu_pair: CpuPair::Auto,
        }
    }
}

/// What a queued request carries besides its payload.
#[derive(Debug)]
pub struct Entry<T> {
    pub rows: usize,
    /// 1 is the highest; the scheduler maps the protocol's 0 ("default") to the lowest.
    pub priority: u32,
    pub enqueued: Instant,
    pub deadline: Option<Instant>,
    /// Requests with different keys (trailing shapes) cannot share a batch, unless padding is on.
    pub shape_key: u64,
    /// Sequence length of each row (1 for models that do not pad): a batch costs its longest
    /// `seq_len` × its rows against `max_batch_tokens`.
    pub seq_len: usize,
    pub payload: T,
}

/// Whether the client that sent a request is still waiting for it.
pub trait Waiting {
    fn client_gone(&self) -> bool;
}

#[derive(Debug, PartialEq)]
pub enum Decision {
    /// Run a batch of these many entries now (taken by [`BatchQueue::next_batch`]).
    Run,
    /// Nothing to run before this instant, unless a request arrives.
    WaitUntil(Instant),
    /// Adaptive mode on the CPU: every instance runs, and the next batch is formed when one is
    /// free (which wakes the batcher); this instant only guards against a missed wake.
    Busy(Instant),
    /// The queue is empty.
    Idle,
}

/// The result of one decision: the batch to run (empty unless `decision == Run`), and the entries
/// dropped on the way because their deadline passed, their client left, or (adaptive mode) they
/// can no longer finish within the objective.
#[derive(Debug)]
pub struct Next<T> {
    pub decision: Decision,
    pub batch: Vec<Entry<T>>,
    pub expired: Vec<Entry<T>>,
    pub cancelled: Vec<Entry<T>>,
    /// Entries that would finish past their objective even in the next batch (on the mean
    /// prediction): admission's prediction missed (the host slowed down after they were let in).
    /// Refused now rather than answered late, as admission would have refused them; each with
    /// the (`WouldMissDeadline`) reason.
    pub late: Vec<(Entry<T>, PushError)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    QueueFull,
    TooManyRows {
        rows: usize,
        max: usize,
    },
    /// Padded tokens (rows × sequence length) over `max_batch_tokens`.
    TooManyTokens {
        tokens: usize,
        max: usize,
    },
    /// Adaptive mode: predicted to finish `predicted` after arrival, past `deadline`: what
    /// admission allows (`ADMISSION_HEADROOM` of the request's deadline) or, for a queued request,
    /// the deadline itself.
    WouldMissDeadline {
        predicted: Duration,
        deadline: Duration,
    },
}

/// Waiting requests ordered by (priority, arrival).
#[derive(Debug)]
pub struct BatchQueue<T> {
    config: BatchConfig,
    pad: bool,
    entries: BTreeMap<(u32, u64), Entry<T>>,
    seq: u64,
    /// Rows waiting.
    rows: usize,
    /// What adaptive mode has learnt (kept up to date in static mode too, for the metrics).
    pub adaptive: Adaptive,
}

impl<T: Waiting> BatchQueue<T> {
    /// `pad`: whether entries with different trailing shapes may share a batch.
    pub fn new(config: BatchConfig, pad: bool) -> BatchQueue<T> {
        BatchQueue { config, pad, entries: BTreeMap::new(), seq: 0, rows: 0, adaptive: Adaptive::default() }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Rows queued.
    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn config(&self) -> &BatchConfig {
        &self.config
    }

    /// Queues the entry, or says why not. In adaptive mode with something learnt, returns what was
    /// predicted for it, for [`Calibration::observe`](super::adaptive::Calibration::observe) once it is answered.
    pub fn push(&mut self, entry: Entry<T>) -> Result<Option<Prediction>, (PushError, Entry<T>)> {
        if entry.rows > self.config.max_batch_size {
            let max = self.config.max_batch_size;
            return Err((PushError::TooManyRows { rows: entry.rows, max }, entry));
        }
        if let Some(max) = self.config.max_batch_tokens
            && entry.rows.saturating_mul(entry.seq_len) > max
        {
            return Err((PushError::TooManyTokens { tokens: entry.rows * entry.seq_len, max }, entry));
        }
        if self.entries.len() >= self.config.max_queue_size {
            return Err((PushError::QueueFull, entry));
        }
        self.adaptive.arrivals.observe(entry.enqueued, entry.rows);
        let mut prediction = None;
        if let Some(slo) = self.config.latency_slo {
            let deadline = entry.deadline.map_or(slo, |d| d.saturating_duration_since(entry.enqueued).min(slo));
            let finish =
                self.adaptive.predicted_finish(entry.enqueued, self.rows, entry.rows, self.config.max_batch_size);
            if let Some(latency) = finish.map(|f| f.saturating_duration_since(entry.enqueued)) {
                let predicted = latency.mul_f64(self.adaptive.calibration.factor_at(entry.enqueued));
                let allowed = deadline.mul_f64(ADMISSION_HEADROOM);
                // Nothing queued or handed over, and an instance idle: the request runs at once
                // whatever the prediction says. Refusing it would also starve the correction of
                // the answers that bring it down: once a high correction refused a lone request,
                // it refused every request after it (seen: a closed loop at c=64 got 20028
                // refusals in a row).
                let idle = self.rows == 0 && self.adaptive.handed_over_rows == 0 && !self.adaptive.all_busy();
                if predicted > allowed && !idle {
                    self.adaptive.shed_at = Some(entry.enqueued);
                    return Err((PushError::WouldMissDeadline { predicted, deadline: allowed }, entry));
                }
                prediction = Some(Prediction { latency, calibrated: predicted, deadline });
            }
        }
        self.seq += 1;
        self.rows += entry.rows;
        self.adaptive.pace.observe(entry.enqueued);
        self.adaptive.queued(entry.rows, self.rows);
        self.entries.insert((entry.priority, self.seq), entry);
        Ok(prediction)
    }

    /// Decides what to do at `now`: drops expired and abandoned entries, then either takes a batch
    /// (when it is full, reaches a preferred size, or its oldest entry has waited the maximum
    /// delay) or says until when to wait.
    pub fn next_batch(&mut self, now: Instant) -> Next<T> {
        let mut expired = Vec::new();
        let mut cancelled = Vec::new();
        let mut late = Vec::new();
        // Adaptive mode: the soonest a queued entry can finish is when the device is free plus
        // the run of the next batch, which takes what is queued up to the batch limit; scaled
        // down when admission's correction says predictions run long, never up: only a request
        // late even on the mean prediction is refused (refusing on the p99 correction as
        // admission does was measured to refuse ~1% of requests after 100+ ms in the queue,
        // which makes refusals slow at p99; see tests/faults/load).
        let earliest = match self.config.latency_slo {
            // (Nothing learnt yet: no prediction to refuse on.)
            Some(slo) => self.adaptive.device_free_at(now).and_then(|free| {
                let next = self.adaptive.batch_limit(now, self.rows, self.config.max_batch_size).min(self.rows);
                let run = Duration::from_secs_f64(self.adaptive.latency.predict(next)?);
                Some((slo, now + (free - now + run).mul_f64(self.adaptive.calibration.factor().min(1.0))))
            }),
            None => None,
        };
        let mut dead: Vec<((u32, u64), Option<PushError>)> = Vec::new();
        for (k, e) in &self.entries {
            if e.payload.client_gone() || e.deadline.is_some_and(|d| d <= now) {
                dead.push((*k, None));
            } else if let Some((slo, finish)) = earliest {
                let objective = e.deadline.map_or(e.enqueued + slo, |d| d.min(e.enqueued + slo));
                if finish > objective {
                    let predicted = finish - e.enqueued;
                    dead.push((*k, Some(PushError::WouldMissDeadline { predicted, deadline: objective - e.enqueued })));
                }
            }
        }
        if dead.iter().any(|(_, why)| why.is_some()) {
            self.adaptive.shed_at = Some(now);
        }
        for (k, why) in dead {
            let e = self.entries.remove(&k).expect("key just listed");
            self.rows -= e.rows;
            match why {
                Some(why) => late.push((e, why)),
                None if e.payload.client_gone() => cancelled.push(e),
                None => expired.push(e),
            }
        }

        // The candidate batch: entries in priority order that fit, sharing the first one's shape
        // unless padding is allowed; an entry that would overflow ends the batch.
        let mut keys = Vec::new();
        let mut rows = 0;
        let mut longest = 0;
        let token_budget = self.config.max_batch_tokens.unwrap_or(usize::MAX);
        let mut oldest: Option<Instant> = None;
        let mut first_shape = None;
        let limit = match self.config.latency_slo {
            Some(_) => self.adaptive.batch_limit(now, self.rows, self.config.max_batch_size),
            None => self.config.max_batch_size,
        };
        for (k, e) in &self.entries {
            if !self.pad && *first_shape.get_or_insert(e.shape_key) != e.shape_key {
                continue;
            }
            // (The first entry always fits: a request is never larger than max_batch_size.)
            let padded = (rows + e.rows).saturating_mul(longest.max(e.seq_len));
            if (rows + e.rows > limit || padded > token_budget) && !keys.is_empty() {
                break;
            }
            rows += e.rows;
            longest = longest.max(e.seq_len);
            keys.push(*k);
            oldest = Some(oldest.map_or(e.enqueued, |o| o.min(e.enqueued)));
        }
        let Some(oldest) = oldest else {
            return Next { decision: Decision::Idle, batch: Vec::new(), expired, cancelled, late };
        };
        let (due, busy) = match self.config.latency_slo {
            Some(slo) => match self.adaptive.plan(now, rows, oldest, limit, slo) {
                Plan::Run => (now, false),
                Plan::Wait(t) => (t, false),
                Plan::Busy(t) => (t, true),
            },
            // A delay too large to add to an instant means "wait for a full batch".
            None => {
                let delay = oldest.checked_add(self.config.max_queue_delay);
                (delay.unwrap_or(now + Duration::from_secs(86_400 * 365)), false)
            }
        };
        let preferred = self.config.latency_slo.is_none() && self.config.preferred_batch_sizes.contains(&rows);
        let run = rows >= self.config.max_batch_size || preferred || due <= now;
        if !run {
            // Wake up for the batch delay, or earlier when a queued deadline falls before it.
            let wake = self.entries.values().filter_map(|e| e.deadline).fold(due, Instant::min);
            let decision = if busy { Decision::Busy(wake) } else { Decision::WaitUntil(wake) };
            return Next { decision, batch: Vec::new(), expired, cancelled, late };
        }
        if self.config.latency_slo.is_some() {
            self.adaptive.formed(now, self.rows, rows >= limit || self.rows > rows);
        }
        let batch: Vec<Entry<T>> = keys.iter().map(|k| self.entries.remove(k).expect("key just listed")).collect();
        self.rows -= rows;
        Next { decision: Decision::Run, batch, expired, cancelled, late }
    }

    /// Removes every entry (at shutdown).
    pub fn drain(&mut self) -> Vec<Entry<T>> {
        self.rows = 0;
        std::mem::take(&mut self.entries).into_values().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::adaptive::Running;

    #[derive(Debug)]
    struct P {
        name: &'static str,
        gone: bool,
    }
    impl Waiting for P {
        fn client_gone(&self) -> bool {
            self.gone
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A queued request: (name, rows, priority, arrival ms, deadline ms, shape key, client gone).
    type Req = (&'static str, usize, u32, u64, Option<u64>, u64, bool);

    /// One row of a table: the requests,
    /// the config, the time of the decision, and what must come out.
    struct Case {
        what: &'static str,
        max_batch: usize,
        delay_ms: u64,
        preferred: Vec<usize>,
        pad: bool,
        requests: Vec<Req>,
        at_ms: u64,
        batch: Vec<&'static str>,
        wait_until_ms: Option<u64>,
        expired: Vec<&'static str>,
        cancelled: Vec<&'static str>,
    }

    fn run(case: Case) {
        let t0 = Instant::now();
        let cfg = BatchConfig {
            max_batch_size: case.max_batch,
            max_queue_delay: ms(case.delay_ms),
            preferred_batch_sizes: case.preferred,
            max_queue_size: 100,
            max_batch_tokens: None,
            latency_slo: None,
            cpu_pair: CpuPair::Auto,
        };
        let mut q = BatchQueue::new(cfg, case.pad);
        for (name, rows, priority, at, deadline, shape, gone) in case.requests {
            q.push(Entry {
                rows,
                priority,
                enqueued: t0 + ms(at),
                deadline: deadline.map(|d| t0 + ms(d)),
                shape_key: shape,
                seq_len: 1,
                payload: P { name, gone },
            })
            .unwrap();
        }
        let next = q.next_batch(t0 + ms(case.at_ms));
        let names = |v: &[Entry<P>]| v.iter().map(|e| e.payload.name).collect::<Vec<_>>();
        assert_eq!(names(&next.batch), case.batch, "{}: batch", case.what);
        assert_eq!(names(&next.expired), case.expired, "{}: expired", case.what);
        assert_eq!(names(&next.cancelled), case.cancelled, "{}: cancelled", case.what);
        assert!(next.late.is_empty(), "{}: static mode refuses nothing as late", case.what);
        match (case.wait_until_ms, &next.decision) {
            (Some(w), Decision::WaitUntil(t)) => assert_eq!(*t, t0 + ms(w), "{}: wait", case.what),
            (None, Decision::WaitUntil(_)) => panic!("{}: waits, should not", case.what),
            (Some(_), d) => panic!("{}: {d:?} instead of waiting", case.what),
            (None, _) => {}
        }
    }

    #[test]
    fn decisions() {
        let cases = vec![
            Case {
                what: "empty queue is idle",
                max_batch: 8,
                delay_ms: 5,
                preferred: vec![],
                pad: false,
                requests: vec![],
                at_ms: 0,
                batch: vec![],
                wait_until_ms: None,
                expired: vec![],
                cancelled: vec![],
            },
            Case {
                what: "zero delay runs what is there",
                max_batch: 8,
                delay_ms: 0,
                preferred: vec![],
                pad: false,
                requests: vec![("a", 1, 10, 0, None, 0, false), ("b", 2, 10, 0, None, 0, false)],
                at_ms: 0,
                batch: vec!["a", "b"],
                wait_until_ms: None,
                expired: vec![],
                cancelled: vec![],
            },
            Case {
                what: "partial batch waits for the oldest's delay",
                max_batch: 8,
                delay_ms: 5,
                preferred: vec![],
                pad: false,
                requests: vec![("a", 1, 10, 1, None, 0, false), ("b", 1, 10, 2, None, 0, false)],
                at_ms: 3,
                batch: vec![],
                wait_until_ms: Some(6),
                expired: vec![],
                cancelled: vec![],
            },
            Case {
                what: "partial batch runs once the delay is over",
                max_batch: 8,
                delay_ms: 5,
                preferred: vec![],
                pad: false,
                requests: vec![("a", 1, 10, 1, None, 0, false), ("b", 1, 10, 2, None, 0, false)],
                at_ms: 6,
                batch: vec!["a", "b"],
                wait_until_ms: None,
                expired: vec![],
                cancelled: vec![],
            },
            Case {
                what: "full batch runs at once and leaves the overflow",
                max_batch: 4,
                delay_ms: 50,
                preferred: vec![],
                pad: false,
                requests: vec![
                    ("a", 2, 10, 0, None, 0, false),
                    ("b", 2, 10, 0, None, 0, false),
                    ("c", 1, 10, 0, None, 0, false),
                ],
                at_ms: 0,
                batch: vec!["a", "b"],
                wait_until_ms: None,
                expired: vec![],
                cancelled: vec![],
            },
            Case {
                what: "an entry that would overflow ends the batch (no reordering past it)",
                max_batch: 4,
                delay_ms: 0,
                preferred: vec![],
                pad: false,
                requests: vec![
                    ("a", 3, 10, 0, None, 0, false),
                    ("b", 2, 10, 0, None, 0, false),
                    ("c", 1, 10, 0, None, 0, false),
                ],
                at_ms: 0,
                batch: vec!["a"],
                wait_until_ms: None,
                expired: vec![],
                cancelled: vec![],
            },
            Case {
                what: "preferred size runs without waiting",
                max_batch: 8,
                delay_ms: 50,
                preferred: vec![2, 4],
                pad: false,
                requests: vec![("a", 1, 10, 0, None, 0, false), ("b", 1, 10, 0, None, 0, false)],
                at_ms: 0,
                batch: vec!["a", "b"],
                wait_until_ms: None,
                expired: vec![],
                cancelled: vec![],
            },
            Case {
                what: "higher priority goes first",
                max_batch: 2,
                delay_ms: 0,
                preferred: vec![],
                pad: false,
                requests: vec![
                    ("low", 1, 10, 0, None, 0, false),
                    ("mid", 1, 5, 1, None, 0, false),
                    ("high", 1, 1, 2, None, 0, false),
                ],
                at_ms: 3,
                batch: vec!["high", "mid"],
                wait_until_ms: None,
                expired: vec![],
                cancelled: vec![],
            },
            Case {
                what: "expired and abandoned requests never reach the device",
                max_batch: 8,
                delay_ms: 0,
                preferred: vec![],
                pad: false,
                requests: vec![
                    ("late", 1, 10, 0, Some(2), 0, false),
                    ("gone", 1, 10, 0, None, 0, true),
                    ("ok", 1, 10, 0, Some(10), 0, false),
                ],
                at_ms: 3,
                batch: vec!["ok"],
                wait_until_ms: None,
                expired: vec!["late"],
                cancelled: vec!["gone"],
            },
            Case {
                what: "a deadline before the delay wakes the batcher early",
                max_batch: 8,
                delay_ms: 50,
                preferred: vec![],
                pad: false,
                requests: vec![("a", 1, 10, 0, None, 0, false), ("b", 1, 10, 0, Some(7), 0, false)],
                at_ms: 1,
                batch: vec![],
                wait_until_ms: Some(7),
                expired: vec![],
                cancelled: vec![],
            },
            Case {
                what: "different shapes are not batched without padding",
                max_batch: 8,
                delay_ms: 0,
                preferred: vec![],
                pad: false,
                requests: vec![
                    ("a", 1, 10, 0, None, 1, false),
                    ("b", 1, 10, 0, None, 2, false),
                    ("c", 1, 10, 0, None, 1, false),
                ],
                at_ms: 0,
                batch: vec!["a", "c"],
                wait_until_ms: None,
                expired: vec![],
                cancelled: vec![],
            },
            Case {
                what: "different shapes are batched with padding",
                max_batch: 8,
                delay_ms: 0,
                preferred: vec![],
                pad: true,
                requests: vec![("a", 1, 10, 0, None, 1, false), ("b", 1, 10, 0, None, 2, false)],
                at_ms: 0,
                batch: vec!["a", "b"],
                wait_until_ms: None,
                expired: vec![],
                cancelled: vec![],
            },
        ];
        for case in cases {
            run(case);
        }
    }

    #[test]
    fn adaptive_mode_runs_a_lone_request_at_once_and_sheds_what_would_be_late() {
        let t0 = Instant::now();
        let cfg = BatchConfig {
            max_batch_size: 8,
            max_queue_delay: ms(1000), // ignored in adaptive mode
            latency_slo: Some(ms(50)),
            ..BatchConfig::default()
        };
        let mut q = BatchQueue::new(cfg, false);
        let entry = |name, at: u64, deadline: Option<u64>| Entry {
            rows: 4,
            priority: 1,
            enqueued: t0 + ms(at),
            deadline: deadline.map(|d| t0 + ms(d)),
            shape_key: 0,
            seq_len: 1,
            payload: P { name, gone: false },
        };
        // Nothing learnt: nothing is shed, even past the objective, and a lone request runs at once.
        assert_eq!(q.push(entry("lone", 0, None)).unwrap(), None, "nothing to predict with");
        let next = q.next_batch(t0 + ms(60));
        assert_eq!((next.decision, next.batch.len(), next.late.len()), (Decision::Run, 1, 0));
        // t(b) = 10 ms + 1 ms/row; the device is busy for 20 ms more.
        q.adaptive.latency.observe(1, 0.011);
        q.adaptive.latency.observe(8, 0.018);
        q.adaptive.running[0] = Some(Running { until: t0 + ms(20), rows: 0 });
        // 20 + t(4) = 34 ms, returned for the caller to hold against the actual latency.
        let a = q.push(entry("a", 0, None)).unwrap().unwrap();
        assert!(a.latency.abs_diff(ms(34)) < Duration::from_micros(1) && a.deadline == ms(50), "{a:?}");
        // Behind a's 4 rows: 20 + t(8) = 38 ms; then 20 + t(8) + t(4) = 52 ms, past the 42.5 ms
        // admission allows (85% of 50).
        q.push(entry("b", 0, None)).unwrap();
        assert_eq!(q.adaptive.shed_at, None);
        let late = q.push(entry("c", 0, None)).unwrap_err().0;
        let allowed = ms(50).mul_f64(ADMISSION_HEADROOM);
        assert!(matches!(late, PushError::WouldMissDeadline { deadline, .. } if deadline == allowed), "{late:?}");
        assert_eq!(q.adaptive.shed_at, Some(t0), "a refusal as late is remembered (the CPU then gathers nothing)");
        // A tighter deadline of its own counts too: 38 ms > 0.85 x 30 ms.
        let mut q2 = BatchQueue::new(BatchConfig { latency_slo: Some(ms(50)), ..BatchConfig::default() }, false);
        q2.adaptive = q.adaptive.clone();
        q2.push(entry("x", 0, None)).unwrap();
        assert!(q2.push(entry("tight", 0, Some(30))).is_err());
        // Answers that landed 1.5x later than predicted: a's 34 ms counts as 51 ms > 42.5, refused.
        let mut q3 = BatchQueue::new(BatchConfig { latency_slo: Some(ms(50)), ..BatchConfig::default() }, false);
        q3.adaptive = q.adaptive.clone();
        q3.adaptive.calibration.observe(a, a.latency.mul_f64(1.5), t0, None);
        let late = q3.push(entry("a", 0, None)).unwrap_err().0;
        assert!(matches!(late, PushError::WouldMissDeadline { predicted, .. } if predicted > ms(50)), "{late:?}");
        // On an idle device with nothing queued, a lone request runs whatever the correction says
        // (its answer is what brings the correction down): t(4) x 4 = 56 ms > 42.5, admitted.
        q3.adaptive.running[0] = None;
        q3.adaptive.calibration.observe(a, a.latency.mul_f64(4.0), t0, None);
        let lone = q3.push(entry("lone", 0, None)).unwrap().unwrap();
        assert!(lone.calibrated > ms(50), "{lone:?}");
        // Behind it, the same prediction is refused.
        assert!(q3.push(entry("behind", 0, None)).is_err());
        // While the device runs 8 rows, the next batch takes at most half the system's 16 rows.
        q.adaptive.running[0] = Some(Running { until: t0 + ms(20), rows: 8 });
        let next = q.next_batch(t0 + ms(1));
        assert_eq!((next.decision, next.batch.len()), (Decision::Run, 2), "8 of 16 rows: formed now, handed over next");
        // Idle, light load: a partial batch runs at once.
        q.next_batch(t0 + ms(2));
        q.adaptive.running[0] = None;
        q.push(entry("d", 195, None)).unwrap();
        let next = q.next_batch(t0 + ms(200));
        assert_eq!((next.decision, next.batch.len()), (Decision::Run, 1), "idle, light load: run");
        assert!(next.late.is_empty());

        // Let in at 230 ms on an idle device (finish 244 ms, objective 280 ms); then a batch of 8
        // rows starts, predicted to run until 270 ms: at 250 ms the next batch takes both (8 of
        // the 16 rows in the system) and finishes at 270 + t(8) = 288 ms. Refused now, not
        // answered late.
        q.push(entry("e", 230, None)).unwrap();
        q.push(entry("f", 230, Some(400))).unwrap();
        let mut q4 = BatchQueue::new(BatchConfig { latency_slo: Some(ms(50)), ..BatchConfig::default() }, false);
        q4.adaptive = q.adaptive.clone();
        q4.push(entry("e", 230, None)).unwrap();
        for q in [&mut q.adaptive, &mut q4.adaptive] {
            q.running[0] = Some(Running { until: t0 + ms(270), rows: 8 });
        }
        let next = q.next_batch(t0 + ms(250));
        assert!(next.batch.is_empty() && next.late.len() == 2, "{:?}", next.late);
        assert_eq!(q.adaptive.shed_at, Some(t0 + ms(250)));
        for (e, why) in &next.late {
            // From arrival at 230 ms: predicted 58 ms against 50.
            let PushError::WouldMissDeadline { predicted, deadline } = why else { panic!("{why:?}") };
            assert!(predicted.abs_diff(ms(58)) < Duration::from_micros(1), "{}: {why:?}", e.payload.name);
            assert_eq!(*deadline, ms(50));
        }
        // Alone (4 rows, the next batch takes them all), and with answers landing earlier than
        // predicted (here 0.8x), the same estimate scales down: 250 + 0.8 × (20 + t(4) = 14) =
        // 277.2 ms, within the objective: e runs.
        let p = Prediction { latency: ms(40), calibrated: ms(40), deadline: ms(50) };
        for _ in 0..100 {
            q4.adaptive.calibration.observe(p, ms(32), t0, None);
        }
        let next = q4.next_batch(t0 + ms(250));
        assert!(next.late.is_empty() && next.batch.len() == 1, "{:?}", next.late);
        // But not up when they land later (2x): g, let in at 250 ms (objective 300 ms), would
        // finish at 260 + 2 × 24 = 308 ms at p99, but at 270 + 14 = 284 ms on the mean: it runs.
        q4.push(entry("g", 250, None)).unwrap();
        for _ in 0..200 {
            q4.adaptive.calibration.observe(p, ms(80), t0, None);
        }
        assert_eq!(q4.adaptive.calibration.factor(), 2.0);
        let next = q4.next_batch(t0 + ms(260));
        assert!(next.late.is_empty() && next.batch.len() == 1, "{:?}", next.late);
    }

    #[test]
    fn push_limits() {
        let cfg = BatchConfig { max_batch_size: 4, max_queue_size: 1, ..BatchConfig::default() };
        let mut q = BatchQueue::new(cfg, false);
        let entry = |rows| Entry {
            rows,
            priority: 1,
            enqueued: Instant::now(),
            deadline: None,
            shape_key: 0,
            seq_len: 1,
            payload: P { name: "x", gone: false },
        };
        assert_eq!(q.push(entry(5)).unwrap_err().0, PushError::TooManyRows { rows: 5, max: 4 });
        q.push(entry(4)).unwrap();
        assert_eq!(q.push(entry(1)).unwrap_err().0, PushError::QueueFull);
    }

    #[test]
    fn token_budget() {
        // Padded cost = longest sequence × rows, as TEI counts it.
        let cfg = BatchConfig { max_batch_size: 64, max_batch_tokens: Some(100), ..BatchConfig::default() };
        let mut q = BatchQueue::new(cfg, true);
        let t0 = Instant::now();
        let entry = |name, rows, seq_len| Entry {
            rows,
            priority: 1,
            enqueued: t0,
            deadline: None,
            shape_key: seq_len as u64,
            seq_len,
            payload: P { name, gone: false },
        };
        assert_eq!(q.push(entry("huge", 2, 51)).unwrap_err().0, PushError::TooManyTokens { tokens: 102, max: 100 });
        q.push(entry("a", 4, 10)).unwrap(); // 40
        q.push(entry("b", 2, 20)).unwrap(); // 6 × 20 = 120 > 100: ends the batch
        q.push(entry("c", 1, 5)).unwrap();
        let names = |n: Next<P>| n.batch.iter().map(|e| e.payload.name).collect::<Vec<_>>();
        assert_eq!(names(q.next_batch(t0)), vec!["a"]);
        // b and c: 3 rows × 20 = 60.
        assert_eq!(names(q.next_batch(t0)), vec!["b", "c"]);
        // Without a budget, all three share one batch.
        let mut q = BatchQueue::new(BatchConfig { max_batch_tokens: None, ..BatchConfig::default() }, true);
        for (n, r, l) in [("a", 4, 10), ("b", 2, 20), ("c", 1, 5)] {
            q.push(entry(n, r, l)).unwrap();
        }
        assert_eq!(names(q.next_batch(t0)), vec!["a", "b", "c"]);
    }
}
