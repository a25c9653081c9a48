#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mvm_fuzz::virtio_queue_blk::run(data));
