//! The ONNX backend gives the same rows whatever the batch they run in: per-batch-size concrete
//! plans (exact or padded) and the symbolic plan agree, and models with a symbolic sequence length
//! run at any length.

use std::path::PathBuf;

use algolink_engine::{LoadOptions, ModelFiles, Tensor, load_model};

fn load(file: &str, max_batch_size: usize) -> std::sync::Arc<dyn algolink_engine::Model> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(file);
    let files = ModelFiles::from([(file.to_string(), bytes::Bytes::from(std::fs::read(path).unwrap()))]);
    load_model(&files, &LoadOptions { max_batch_size, ..LoadOptions::default() }).unwrap()
}

#[test]
fn rows_do_not_depend_on_their_batch() {
    // Plans for 1, 2, 3, 4, 5, 6 and 8 rows: a batch of 5 runs on its own plan, 7 on the plan of 8
    // padded with a zero row, 9 (over the largest) on the symbolic plan.
    let model = load("torch_mlp.onnx", 8);
    let x: Vec<f32> = (0..9 * 16).map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.5).collect();
    let alone: Vec<Vec<f32>> = (0..9)
        .map(|row| {
            let one = Tensor::from_f32(vec![1, 16], &x[row * 16..(row + 1) * 16]).unwrap();
            model.run(vec![one]).unwrap()[0].to_f32().unwrap()
        })
        .collect();
    for rows in [5usize, 7, 9] {
        let out = model.run(vec![Tensor::from_f32(vec![rows, 16], &x[..rows * 16]).unwrap()]).unwrap();
        assert_eq!(out[0].shape, vec![rows, 4], "a batch of {rows} comes back with its rows, padding cut off");
        let batch = out[0].to_f32().unwrap();
        for (row, alone) in alone.iter().take(rows).enumerate() {
            for (a, b) in alone.iter().zip(&batch[row * 4..(row + 1) * 4]) {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "row {row}: {a} alone, {b} in a batch of {rows}");
            }
        }
    }
}

#[test]
fn symbolic_sequence_length_runs_at_any_length() {
    let model = load("torch_bert.onnx", 8);
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

#[test]
fn one_copy_runs_batches_side_by_side() {
    // The scheduler's CPU pair runs two batches at once on one copy, each on its lane's share of
    // the cores: every answer is the batch's own, as when it runs alone on every core.
    let model = load("torch_mlp.onnx", 8);
    assert!(model.concurrent(), "tract models share their weights between lanes");
    assert!(!model.side_by_side(), "lanes are used only where measured faster, and this load did not measure");
    let x: Vec<f32> = (0..8 * 16).map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.5).collect();
    let batch = |rows: usize| Tensor::from_f32(vec![rows, 16], &x[..rows * 16]).unwrap();
    let alone: Vec<Vec<f32>> =
        [5, 8].iter().map(|&rows| model.run(vec![batch(rows)]).unwrap()[0].to_f32().unwrap()).collect();
    std::thread::scope(|s| {
        for (lane, (rows, want)) in [5usize, 8].into_iter().zip(&alone).enumerate() {
            let (model, batch) = (&model, &batch);
            s.spawn(move || {
                for _ in 0..200 {
                    let got = model.run_in_lane(vec![batch(rows)], lane, 2).unwrap()[0].to_f32().unwrap();
                    for (a, b) in got.iter().zip(want) {
                        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "lane {lane}: {a} against {b} alone");
                    }
                }
            });
        }
    });
}
