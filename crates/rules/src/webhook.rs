//! The `webhook` sink: an HTTP POST per event, JSON body, optional HMAC-SHA256 signature.

use std::time::Duration;

use herald_auth::Secret;
use herald_router::OutboxEntry;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{Delivery, Sink, SinkError};

pub struct WebhookSink {
    client: reqwest::Client,
    url: String,
    secret: Option<Secret>,
}

impl WebhookSink {
    pub fn new(
        url: &str,
        secret: Option<Secret>,
        timeout: Duration,
    ) -> Result<WebhookSink, SinkError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| SinkError::Failed(format!("cannot build the HTTP client: {e}")))?;
        Ok(WebhookSink {
            client,
            url: url.to_string(),
            secret,
        })
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`, the `X-Herald-Signature` header.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC accepts keys of every length");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

impl WebhookSink {
    /// One POST of one entry.
    async fn post(&self, entry: &OutboxEntry) -> Result<(), SinkError> {
        let mut request = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(entry.payload.clone());
        if let Some(secret) = &self.secret {
            request = request.header(
                "x-herald-signature",
                signature(secret.expose(), &entry.payload),
            );
        }
        let response = request
            .send()
            .await
            .map_err(|e| SinkError::Failed(format!("POST {}: {e}", self.url)))?;
        if !response.status().is_success() {
            return Err(SinkError::Failed(format!(
                "POST {}: HTTP {}",
                self.url,
                response.status()
            )));
        }
        Ok(())
    }
}

impl Sink for WebhookSink {
    fn deliver<'a>(&'a mut self, entries: &'a [OutboxEntry]) -> Delivery<'a> {
        Box::pin(async move {
            for (sent, entry) in entries.iter().enumerate() {
                self.post(entry).await.map_err(|e| e.after(sent))?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn signature_is_hex_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            super::signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
