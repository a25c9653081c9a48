//! End-to-end test support: the case runner and the guest-side test programs.
