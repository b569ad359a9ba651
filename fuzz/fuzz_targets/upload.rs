#![no_main]

static QUIET_HOOK: std::sync::Once = std::sync::Once::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // `load_model` turns an importer's panic into an error, as the server needs; libfuzzer-sys's
    // panic hook would abort before it could. Panics nobody catches still end the run: the
    // fuzz_target wrapper aborts on them.
    QUIET_HOOK.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    algolink_server::fuzzing::upload(data)
});
