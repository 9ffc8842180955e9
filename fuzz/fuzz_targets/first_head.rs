#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upgate::fuzzing::first_head(data));
