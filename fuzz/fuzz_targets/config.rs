#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| algolink_server::fuzzing::config(data));
