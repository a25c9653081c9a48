//! The mvm runtime SDK: admission, images, backends, audit, receipts.

pub mod admission;
pub mod audit;
pub mod backend;
pub mod cli;
pub mod image;
pub mod mcp;
pub mod net;
pub mod receipt;
pub mod run;
pub mod sandbox;
pub mod sdk;
pub mod secrets;
pub mod terminal;
