//! `mvm-test-init`: the static PID 1 of test guests (see
//! `mvm_tests::guest`).

fn main() {
    mvm_tests::guest::init::run();
    // PID 1 exiting panics the kernel: that is the `panic` mode.
    std::process::exit(1);
}
