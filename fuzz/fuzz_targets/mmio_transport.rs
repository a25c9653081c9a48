#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mvm_fuzz::mmio_transport::run(data));
