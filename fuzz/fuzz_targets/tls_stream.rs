#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| upgate::fuzzing::tls_stream(data));
