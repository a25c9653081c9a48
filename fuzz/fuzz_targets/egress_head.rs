#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mvm_fuzz::egress_head::run(data));
