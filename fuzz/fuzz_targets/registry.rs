#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmc::fuzzing::registry(data));
