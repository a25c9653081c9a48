//! `mvm-vmm`: KVM setup, memory layout, vCPU threads, x86_64 boot state, device
//! wiring, event loops and the jail.
