//! Cost of the batching decision itself: push a burst of requests, then take batches until the
//! queue is empty. This runs on every batch, so it must stay far below a model's forward time.

use std::time::{Duration, Instant};

use algolink_engine::scheduler::{BatchConfig, BatchQueue, Decision, Entry, Waiting};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};

struct Payload;

impl Waiting for Payload {
    fn client_gone(&self) -> bool {
        false
    }
}

fn drain(queued: usize, max_batch: usize) -> usize {
    let config = BatchConfig {
        max_batch_size: max_batch,
        max_queue_delay: Duration::ZERO,
        max_queue_size: queued,
        ..Default::default()
    };
    let mut q = BatchQueue::new(config, false);
    let now = Instant::now();
    for i in 0..queued {
        let entry = Entry {
            rows: 1,
            priority: (i % 3) as u32 + 1,
            enqueued: now,
            deadline: None,
            shape_key: 0,
            seq_len: 1,
            payload: Payload,
        };
        if q.push(entry).is_err() {
            unreachable!("queue sized for the burst");
        }
    }
    let mut batches = 0;
    loop {
        let next = q.next_batch(now);
        if next.decision != Decision::Run {
            return batches;
        }
        batches += 1;
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_queue_drain");
    for (queued, max_batch) in [(32, 32), (256, 32), (1024, 64)] {
        g.bench_with_input(
            BenchmarkId::from_parameter(format!("{queued}req_max{max_batch}")),
            &(queued, max_batch),
            |b, &(q, m)| b.iter(|| drain(q, m)),
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
