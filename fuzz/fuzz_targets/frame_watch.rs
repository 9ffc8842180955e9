#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upgate::fuzzing::frame_watch(data));
