//! The vsock RPC protocol spoken between the runtime and the guest agent.
