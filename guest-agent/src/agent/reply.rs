//! How a request's worker thread answers its client: frames back through the
//! connection's writer, and the request forgotten when it ends. The connection
//! implements [`Responder`]; `exec` and `files` see only this trait, so the
//! arrows run one way: connection → exec, files → reply.

use crate::protocol::{ErrorCode, ErrorReply, Message};

/// The connection, as one request's worker sees it.
pub(super) trait Responder: Send + Sync + 'static {
    /// Sends one frame. Returns false if the connection is gone.
    fn send(&self, request_id: u32, message: &Message) -> bool;

    /// Forgets a finished request.
    fn finish(&self, request_id: u32);

    /// Sends an error frame for a request.
    fn send_error(&self, request_id: u32, reply: ErrorReply) -> bool {
        tracing::debug!("request {request_id}: {:?}: {}", reply.code, reply.message);
        self.send(request_id, &Message::Error(reply))
    }
}

/// Builds an error reply.
pub(super) fn reply(code: ErrorCode, message: impl Into<String>) -> ErrorReply {
    ErrorReply {
        code,
        message: message.into(),
    }
}
