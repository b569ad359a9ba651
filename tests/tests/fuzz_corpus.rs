//! Replays the fuzzers' corpora (`fuzz/corpus/<target>/`, kept in the repository and grown by
//! `fuzz/run`) through the same entry points on the stable build: an input that once crashed
//! a fuzzer stays a test. Each entry point must return, whatever the bytes.

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    assert!(!entries.is_empty(), "{}: no corpus", dir.display());
    for path in &entries {
        let data = std::fs::read(path).unwrap();
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{target}: {} panicked", path.display());
        }
    }
    println!("{target}: {} inputs replayed", entries.len());
}

/// A fuzz target's name and its entry point.
type Target = (&'static str, fn(&[u8]));

#[test]
fn every_corpus_replays_without_a_panic() {
    let targets: [Target; 4] = [
        ("oip_json", algolink_server::fuzzing::oip_json),
        ("oip_binary", algolink_server::fuzzing::oip_binary),
        ("upload", algolink_server::fuzzing::upload),
        ("config", algolink_server::fuzzing::config),
    ];
    for (target, run) in targets {
        replay(target, run);
    }
}
