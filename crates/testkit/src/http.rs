//! A minimal local HTTP/1.1 server that records what is POSTed to it and answers with a status
//! the test controls: a webhook receiver that can be "down".

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One received request: lower-cased headers and the body.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The receiver. Requests answered with a non-2xx status are recorded in `refused`.
#[derive(Clone)]
pub struct HttpCapture {
    pub addr: SocketAddr,
    status: Arc<AtomicU16>,
    accepted: Arc<Mutex<Vec<Received>>>,
    refused: Arc<Mutex<usize>>,
}

impl HttpCapture {
    /// Listens on 127.0.0.1:0, answering `status` until told otherwise.
    pub async fn start(status: u16) -> HttpCapture {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let capture = HttpCapture {
            addr: listener.local_addr().expect("addr"),
            status: Arc::new(AtomicU16::new(status)),
            accepted: Arc::default(),
            refused: Arc::default(),
        };
        let server = capture.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(server.clone().serve(stream));
            }
        });
        capture
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Requests answered with 2xx so far.
    pub fn accepted(&self) -> Vec<Received> {
        self.accepted.lock().expect("lock").clone()
    }

    /// Requests answered with another status so far.
    pub fn refused(&self) -> usize {
        *self.refused.lock().expect("lock")
    }

    async fn serve(self, mut stream: TcpStream) {
        let mut buf = Vec::new();
        loop {
            let Some(end) = find(&buf, b"\r\n\r\n") else {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let headers: Vec<(String, String)> = head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .collect();
            let length: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < end + 4 + length {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = buf[end + 4..end + 4 + length].to_vec();
            buf.drain(..end + 4 + length);
            let status = self.status.load(Ordering::SeqCst);
            if (200..300).contains(&status) {
                self.accepted
                    .lock()
                    .expect("lock")
                    .push(Received { headers, body });
            } else {
                *self.refused.lock().expect("lock") += 1;
            }
            let response = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
