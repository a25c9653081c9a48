//! The mvm runtime SDK: admission, images, backends, sandboxes, audit, receipts.
//!
//! For programs: [`sdk::Run`] runs one command in a fresh microVM; [`sandbox`] keeps one
//! up across calls. Both carry `missing_docs`: every public item is documented.

// On a host other than Linux the code that runs VMs, containers and networks is not
// built, and helpers only it calls would each be reported as dead.
#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

pub mod admission;
pub mod audit;
pub mod backend;
pub mod cli;
pub mod egress_proxy;
pub mod image;
pub mod mcp;
pub mod net;
pub mod receipt;
pub mod run;
#[warn(missing_docs)]
pub mod sandbox;
#[warn(missing_docs)]
pub mod sdk;
pub mod secrets;
pub mod terminal;
