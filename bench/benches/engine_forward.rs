//! One engine forward per batch size, for the fixture models: tract (ONNX MLP) and candle
//! (safetensors MLP), plus the batch gather (`pad_concat`) against a plain per-request copy.

use std::path::PathBuf;

use algolink_engine::{LoadOptions, ModelFiles, Tensor, load_model};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

fn load(file: &str) -> std::sync::Arc<dyn algolink_engine::Model> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(file);
    let files = ModelFiles::from([(file.to_string(), bytes::Bytes::from(std::fs::read(path).expect("fixture")))]);
    load_model(&files, &LoadOptions::default()).expect("model loads")
}

fn bench_forward(c: &mut Criterion) {
    for (file, features) in [("torch_mlp.onnx", 16), ("st_mlp.safetensors", 8)] {
        let model = load(file);
        let mut g = c.benchmark_group(format!("forward/{file}"));
        for batch in [1usize, 32, 256] {
            let x: Vec<f32> = (0..batch * features).map(|i| (i % 7) as f32 * 0.1).collect();
            let input = Tensor::from_f32(vec![batch, features], &x).unwrap();
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_with_input(BenchmarkId::from_parameter(batch), &input, |b, input| {
                b.iter(|| model.run(vec![input.clone()]).unwrap())
            });
        }
        g.finish();
    }
}

fn bench_gather(c: &mut Criterion) {
    // 32 requests of token ids with lengths 8..40, padded to the longest.
    let parts: Vec<Tensor> = (0..32).map(|i| Tensor::from_i64(vec![1, 8 + i], &vec![7; 8 + i]).unwrap()).collect();
    let refs: Vec<&Tensor> = parts.iter().collect();
    c.bench_function("gather/pad_concat_32x(8..40)", |b| b.iter(|| Tensor::concat(&refs, true).unwrap()));
}

criterion_group!(benches, bench_forward, bench_gather);
criterion_main!(benches);
