//! The ONNX backend gives the same rows whatever the batch they run in: per-batch-size concrete
//! plans and the symbolic plan agree, and models with a symbolic sequence length run at any length.

use std::path::PathBuf;

use algolink_engine::{LoadOptions, ModelFiles, Tensor, load_model};

fn load(file: &str) -> std::sync::Arc<dyn algolink_engine::Model> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(file);
    let files = ModelFiles::from([(file.to_string(), bytes::Bytes::from(std::fs::read(path).unwrap()))]);
    load_model(&files, &LoadOptions::default()).unwrap()
}

#[test]
fn rows_do_not_depend_on_their_batch() {
    let model = load("torch_mlp.onnx");
    // Both sizes on their concrete plans (built now), then the symbolic plan for a size it has none of.
    model.prepare(&[1, 5]);
    let x: Vec<f32> = (0..5 * 16).map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.5).collect();
    let batch = model.run(vec![Tensor::from_f32(vec![5, 16], &x).unwrap()]).unwrap()[0].to_f32().unwrap();
    for row in 0..5 {
        let one = Tensor::from_f32(vec![1, 16], &x[row * 16..(row + 1) * 16]).unwrap();
        let alone = model.run(vec![one]).unwrap()[0].to_f32().unwrap();
        for (a, b) in alone.iter().zip(&batch[row * 4..(row + 1) * 4]) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "row {row}: {a} alone, {b} in a batch of 5");
        }
    }
    let mut seven = x.clone();
    seven.extend_from_slice(&x[..2 * 16]);
    let symbolic = model.run(vec![Tensor::from_f32(vec![7, 16], &seven).unwrap()]).unwrap()[0].to_f32().unwrap();
    for (a, b) in symbolic[..5 * 4].iter().zip(&batch) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "symbolic {a} vs concrete {b}");
    }
}

#[test]
fn symbolic_sequence_length_runs_at_any_length() {
    let model = load("torch_bert.onnx");
    for seq in [3usize, 17] {
        let ids: Vec<i64> = (0..2 * seq as i64).map(|i| 1 + i % 100).collect();
        let ones = vec![1i64; 2 * seq];
        let zeros = vec![0i64; 2 * seq];
        let out = model
            .run(vec![
                Tensor::from_i64(vec![2, seq], &ids).unwrap(),
                Tensor::from_i64(vec![2, seq], &ones).unwrap(),
                Tensor::from_i64(vec![2, seq], &zeros).unwrap(),
            ])
            .unwrap();
        assert_eq!(out[0].shape, vec![2, seq, 32]);
    }
}
