#![no_main]
// See gateway::fuzzing::config for what it checks.
libfuzzer_sys::fuzz_target!(|data: &[u8]| gateway::fuzzing::config(data));
