//! MQTT over WebSocket (MQTT 3.1.1 section 6): the HTTP upgrade on one path with the `mqtt`
//! subprotocol, and an adapter that makes binary frames look like a byte stream, so the same
//! connection task serves TCP, TLS, WS and WSS. A packet may span frames and a frame may hold
//! several packets: the codec sees only bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};

/// Performs the upgrade: the path must be `path`, and a client that offers subprotocols must
/// offer `mqtt` (or `mqttv3.1`), which is then selected.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    path: &str,
) -> Result<WsIo<S>, String> {
    let path = path.to_string();
    // The closure's type is tungstenite's `Callback`, large error variant included.
    #[allow(clippy::result_large_err)]
    let check =
        move |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
            if request.uri().path() != path {
                return Err(refusal(
                    StatusCode::NOT_FOUND,
                    format!("no MQTT endpoint at {}", request.uri().path()),
                ));
            }
            let offered: Vec<String> = request
                .headers()
                .get_all("sec-websocket-protocol")
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
                .collect();
            if let Some(chosen) = offered.iter().find(|p| *p == "mqtt" || *p == "mqttv3.1") {
                if let Ok(value) = HeaderValue::from_str(chosen) {
                    response
                        .headers_mut()
                        .insert("sec-websocket-protocol", value);
                }
            } else if !offered.is_empty() {
                return Err(refusal(
                    StatusCode::BAD_REQUEST,
                    "the mqtt subprotocol is required".into(),
                ));
            }
            Ok(response)
        };
    let inner = tokio_tungstenite::accept_hdr_async(stream, check)
        .await
        .map_err(|e| e.to_string())?;
    Ok(WsIo {
        inner,
        pending: Bytes::new(),
    })
}

fn refusal(status: StatusCode, why: String) -> ErrorResponse {
    let mut response = ErrorResponse::new(Some(why));
    *response.status_mut() = status;
    response
}

/// A WebSocket connection seen as a byte stream: reads yield the bytes of binary frames,
/// each write is sent as one binary frame.
pub struct WsIo<S> {
    inner: WebSocketStream<S>,
    /// What is left of the last binary frame.
    pending: Bytes,
}

fn io_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                buf.put_slice(&self.pending[..n]);
                self.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            match ready!(self.inner.poll_next_unpin(cx)) {
                Some(Ok(Message::Binary(data))) => self.pending = data,
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket needs binary frames",
                    )));
                }
                // Pings are answered by tungstenite itself; pongs and raw frames carry nothing.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

/// The largest binary frame a write sends.
const FRAME_MAX: usize = 16 * 1024;

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.inner.poll_ready_unpin(cx)).map_err(io_error)?;
        // One frame of at most FRAME_MAX: a large write goes out as several frames (MQTT over
        // WebSocket lets packets span frames), so a client that stops reading blocks the next
        // one here, where `limits.write_timeout_secs` sees it, not all of it in the flush.
        let frame = &buf[..buf.len().min(FRAME_MAX)];
        self.inner
            .start_send_unpin(Message::Binary(Bytes::copy_from_slice(frame)))
            .map_err(io_error)?;
        Poll::Ready(Ok(frame.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_flush_unpin(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner.poll_close_unpin(cx).map_err(io_error)
    }
}
