//! Prints the signature the engine derives for a model file: `cargo run --example inspect -- FILE`.
fn main() {
    let path = std::env::args().nth(1).expect("usage: inspect FILE");
    let bytes = bytes::Bytes::from(std::fs::read(&path).expect("read"));
    let name = std::path::Path::new(&path).file_name().unwrap().to_string_lossy().to_string();
    let files = algolink_engine::ModelFiles::from([(name, bytes)]);
    let options = algolink_engine::LoadOptions { warmup_batch_sizes: vec![], max_batch_size: 1, ..Default::default() };
    match algolink_engine::load_model(&files, &options) {
        Ok(m) => println!("{:#?}", m.signature()),
        Err(e) => println!("error: {e}"),
    }
}
