#![no_main]
// See gateway_actors::fuzzing::topics for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway_actors::fuzzing::topics(data));
