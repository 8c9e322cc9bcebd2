//! A bare WebSocket echo server, the ceiling kaiwa is measured against: the same runtime and
//! WebSocket stack (tokio, axum, tungstenite) with the same buffer sizes, and nothing else: no
//! parsing, no storage, no replies. Every text or binary frame comes straight back, except the
//! clients' acknowledgements (`received`), which are read and dropped as kaiwa reads them and
//! answers nothing: the load tool sends them to both servers, so that both runs carry the same
//! client traffic and the ratio compares like with like.

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::any;
use axum::serve::ListenerExt;
use std::future::Future;
use tokio::net::TcpListener;

/// As kaiwa's gateway sets them, so the comparison is of the work done, not of buffering.
const READ_BUFFER: usize = 4 * 1024;
const WRITE_BUFFER: usize = 16 * 1024;
const MAX_WRITE_BUFFER: usize = 4 * 1024 * 1024;
const MAX_MESSAGE: usize = 64 << 20;

pub fn router() -> Router {
    Router::new().route("/ws", any(upgrade))
}

async fn upgrade(ws: WebSocketUpgrade) -> Response {
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(echo)
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        match message {
            Message::Text(ref text) if is_acknowledgement(text.as_str()) => {}
            Message::Text(_) | Message::Binary(_) => {
                if socket.send(message).await.is_err() {
                    return;
                }
            }
            Message::Close(_) => return,
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
}

/// Whether a text frame is a `received` frame of the load tool. A prefix, not a parse: the
/// echo does no JSON work, and the tool writes the `type` tag first (serde writes an internally
/// tagged enum's tag before its fields).
fn is_acknowledgement(text: &str) -> bool {
    text.starts_with(r#"{"type":"received""#)
}

/// Serves the echo endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Like kaiwa: small frames must not wait on delayed ACKs.
    let listener = listener.tap_io(|tcp| {
        tcp.set_nodelay(true).ok();
    });
    axum::serve(listener, router())
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaiwa_protocol::native::ClientFrame;

    #[test]
    fn the_tools_acknowledgements_are_recognised_and_its_messages_are_not() {
        let received = serde_json::to_string(&ClientFrame::Received { seq: 17 }).expect("JSON");
        assert!(is_acknowledgement(&received), "{received}");
        let send = serde_json::to_string(&ClientFrame::Send(kaiwa_protocol::native::Send {
            id: Some("received".into()),
            content: Some(r#"{"type":"received"}"#.into()),
            ..Default::default()
        }))
        .expect("JSON");
        assert!(!is_acknowledgement(&send), "{send}");
    }
}
