use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{DataType, Device, EngineError, Tensor};

/// Name, type and shape of one input or output; `-1` marks a variable dimension.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: DataType,
    pub shape: Vec<i64>,
}

/// What a prepared model takes and returns.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    /// `<project>_<format>` as the protocol suggests: `onnx_onnxv1`, `candle_safetensors`.
    pub platform: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// Whether requests with different trailing dimensions may share a batch after zero-padding
    /// (true for attention-masked encoders, false for models where padding changes results).
    pub pad_to_longest: bool,
}

impl Signature {
    pub fn input_index(&self, name: &str) -> Option<usize> {
        self.inputs.iter().position(|i| i.name == name)
    }

    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|o| o.name == name)
    }

    /// Checks one request's inputs (in signature order) against the signature and returns their
    /// common number of rows along dim 0.
    pub fn check_inputs(&self, inputs: &[Tensor]) -> Result<usize, EngineError> {
        if inputs.len() != self.inputs.len() {
            return Err(EngineError::InvalidInput(format!(
                "expected {} inputs, got {}",
                self.inputs.len(),
                inputs.len()
            )));
        }
        let mut rows = None;
        for (spec, t) in self.inputs.iter().zip(inputs) {
            if spec.datatype != t.dtype {
                return Err(EngineError::InvalidInput(format!(
                    "input {:?}: expected datatype {}, got {}",
                    spec.name, spec.datatype, t.dtype
                )));
            }
            let fits = spec.shape.len() == t.shape.len()
                && spec.shape.iter().zip(&t.shape).all(|(&s, &d)| s < 0 || s as usize == d);
            if !fits {
                return Err(EngineError::InvalidInput(format!(
                    "input {:?}: expected shape {:?}, got {:?}",
                    spec.name, spec.shape, t.shape
                )));
            }
            match rows {
                None => rows = Some(t.rows()),
                Some(r) if r != t.rows() => {
                    return Err(EngineError::InvalidInput(format!(
                        "inputs disagree on the batch size: {r} and {} rows",
                        t.rows()
                    )));
                }
                Some(_) => {}
            }
        }
        let rows = rows.unwrap_or(0);
        if rows == 0 {
            return Err(EngineError::InvalidInput("a request needs at least one row".into()));
        }
        Ok(rows)
    }
}

/// A model prepared on its device, ready to run batch after batch.
///
/// A request's inputs (checked against the signature) go through `preprocess` on the request's
/// side, then are merged into a batch; `run` takes the batch's preprocessed inputs and returns
/// every output in signature order, each with the batch's rows along dim 0.
pub trait Model: Send + Sync {
    fn signature(&self) -> &Signature;
    /// Where it runs: a GPU version that did not fit (device `auto`) or whose operators the GPU
    /// plan lacks runs on the CPU.
    fn device(&self) -> Device {
        Device::Cpu
    }
    /// Builds whatever the model builds per batch size (tract's concrete plans) for batches of up
    /// to `max_batch_size` rows, once, before the version takes traffic; nothing is built later.
    fn prepare(&self, _max_batch_size: usize) {}
    /// Turns one request's inputs into what `run` takes (a tokenizer turns strings into token
    /// ids); the identity for most models. Never runs on the executor.
    fn preprocess(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
        Ok(inputs)
    }
    /// A rough size of the work `preprocess` does for these inputs (bytes of text), so that the
    /// scheduler can move large requests off the async workers; 0 when there is none.
    fn preprocess_cost(&self, _inputs: &[Tensor]) -> usize {
        0
    }
    fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError>;
    /// Whether one loaded copy runs several batches at once (from several threads, sharing its
    /// weights), so that the CPU scheduler may run batches side by side on it
    /// ([`Model::run_in_lane`]).
    fn concurrent(&self) -> bool {
        false
    }
    /// Measures, once, whether two batches of `rows` side by side ([`Model::run_in_lane`]) run
    /// faster than one after another on every core ([`lanes_gain`]), for
    /// [`Model::side_by_side`]. Nothing for a model without lanes.
    fn measure_lanes(&self, _rows: usize) {}
    /// Whether [`Model::measure_lanes`] found two lanes faster, by [`LANES_MARGIN`]: the CPU
    /// scheduler then runs a pair of executors on this copy.
    fn side_by_side(&self) -> bool {
        false
    }
    /// `run` on the `lane`-th of `lanes` equal shares of the cores, for a backend that otherwise
    /// spreads a batch over a pool of every core (tract): the scheduler runs `lanes` batches side
    /// by side. Others run as `run`.
    fn run_in_lane(&self, inputs: Vec<Tensor>, _lane: usize, _lanes: usize) -> Result<Vec<Tensor>, EngineError> {
        self.run(inputs)
    }
}

/// Two lanes must beat one by this much to be used: they cost a second run state, and on the
/// margin a measurement at one batch size says little about the sizes traffic forms.
pub const LANES_MARGIN: f64 = 1.1;

/// How many times more rows per second two batches of `rows` side by side, each on its lane
/// ([`Model::run_in_lane`]), run than the same batches one after another on every core (`run`);
/// `None` when a batch takes too long to tell (the scheduler's split measures lanes in phases
/// of a few batches: a model whose batches take over [`LANES_TEST_LONGEST`] keeps one lane) or
/// fails.
///
/// Each way runs for about 10 ms per lane, alternately, for at least five rounds and until
/// [`LANES_TEST_BUDGET`] is spent or the answer is clear; the gain is the median of the rounds'
/// own (a round's two ways run milliseconds apart, on a host whose speed drifts by tens of
/// percent within seconds: the best time of each way, taken apart, compared different moments).
///
/// Measured once at load rather than left to the online split alone: a model that loses in two
/// lanes (the MLP 512-2048-2048-10, whose weights do not fit the cache twice: 0.76-0.97x) lost
/// 8-12% of its served throughput to the time the split spent finding that out again under
/// every change of load.
pub fn lanes_gain(model: &dyn Model, rows: usize) -> Option<f64> {
    let inputs = model.preprocess(crate::zero_inputs(model.signature(), rows).ok()?).ok()?;
    let once = Instant::now();
    model.run(inputs.clone()).ok()?;
    let batch = once.elapsed();
    if batch > LANES_TEST_LONGEST {
        return None;
    }
    // Batches per lane in a round: a few milliseconds of work.
    let per_lane = (LANES_TEST_ROUND.as_secs_f64() / batch.as_secs_f64().max(1e-6)).ceil().clamp(1.0, 1e4) as usize;
    let one_lane = || -> Option<Duration> {
        let start = Instant::now();
        for _ in 0..2 * per_lane {
            model.run(inputs.clone()).ok()?;
        }
        Some(start.elapsed())
    };
    let lane = |lane: usize| -> Option<()> {
        for _ in 0..per_lane {
            model.run_in_lane(inputs.clone(), lane, 2).ok()?;
        }
        Some(())
    };
    let two_lanes = || -> Option<Duration> {
        let start = Instant::now();
        std::thread::scope(|s| {
            let other = s.spawn(|| lane(1));
            let here = lane(0);
            other.join().ok().flatten().and(here)
        })?;
        Some(start.elapsed())
    };
    // Once each unmeasured: the second lane allocates its run state and its pool.
    two_lanes()?;
    one_lane()?;
    let mut gains = Vec::new();
    let start = Instant::now();
    while gains.len() < LANES_TEST_ROUNDS {
        gains.push(one_lane()?.as_secs_f64() / two_lanes()?.as_secs_f64());
        gains.sort_by(f64::total_cmp);
        let median = gains[gains.len() / 2];
        if gains.len() >= 5 && (start.elapsed() >= LANES_TEST_BUDGET || !(0.8..1.25).contains(&median)) {
            break;
        }
    }
    Some(gains[gains.len() / 2])
}

/// Work per lane in one round of [`lanes_gain`] (rounds of a few ms read scheduling noise).
const LANES_TEST_ROUND: Duration = Duration::from_millis(10);
/// Time [`lanes_gain`] may take when the ways are close.
const LANES_TEST_BUDGET: Duration = Duration::from_millis(300);
/// Rounds at most.
const LANES_TEST_ROUNDS: usize = 15;
/// The longest batch [`lanes_gain`] measures (see there).
pub const LANES_TEST_LONGEST: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use super::*;

    /// Sleeps instead of computing: `run` as long as a batch on every core, `run_in_lane` as long
    /// as a batch on its share.
    struct Sleeper {
        signature: Signature,
        all_cores: Duration,
        in_lane: Duration,
    }

    impl Model for Sleeper {
        fn signature(&self) -> &Signature {
            &self.signature
        }

        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, EngineError> {
            std::thread::sleep(self.all_cores);
            Ok(inputs)
        }

        fn run_in_lane(&self, inputs: Vec<Tensor>, _lane: usize, _lanes: usize) -> Result<Vec<Tensor>, EngineError> {
            std::thread::sleep(self.in_lane);
            Ok(inputs)
        }
    }

    fn sleeper(all_cores_ms: u64, in_lane_ms: u64) -> Sleeper {
        let spec = TensorSpec { name: "x".into(), datatype: DataType::F32, shape: vec![-1, 4] };
        Sleeper {
            signature: Signature {
                platform: "test".into(),
                inputs: vec![spec.clone()],
                outputs: vec![spec],
                pad_to_longest: false,
            },
            all_cores: Duration::from_millis(all_cores_ms),
            in_lane: Duration::from_millis(in_lane_ms),
        }
    }

    #[test]
    fn the_lanes_test_compares_two_lanes_with_one() {
        // Lanes that take as long as a batch on every core run twice the rows; lanes that take
        // 2.5 times as long (weights that no longer fit the cache twice) lose. (Loose bounds on
        // the winning side: on a host busy with the other tests, late wake-ups moved it from 2
        // to 1.39-2.36; the losing side stayed at 0.74-0.77.)
        let gain = lanes_gain(&sleeper(8, 8), 8).unwrap();
        assert!((1.25..3.0).contains(&gain), "{gain}");
        let gain = lanes_gain(&sleeper(8, 20), 8).unwrap();
        assert!((0.6..LANES_MARGIN).contains(&gain), "{gain}");
        // Too slow to tell.
        assert_eq!(lanes_gain(&sleeper(LANES_TEST_LONGEST.as_millis() as u64 + 10, 1), 8), None);
    }
}
