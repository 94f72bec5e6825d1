//! The real `herald` binary as a child process, for SIGKILL and signal tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A `herald serve` child process.
pub struct BrokerProcess {
    child: Child,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
}

impl BrokerProcess {
    /// Writes `config_text` to `dir/herald.toml` and starts `bin serve` on it; waits until it
    /// prints the address it listens on.
    pub fn spawn(bin: &Path, dir: &Path, config_text: &str) -> BrokerProcess {
        let config_path = dir.join("herald.toml");
        std::fs::write(&config_path, config_text).expect("write config");
        let mut child = Command::new(bin)
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn herald");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("herald: listening tcp ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("herald printed its address")
            .parse()
            .expect("an address");
        BrokerProcess {
            child,
            addr,
            config_path,
        }
    }

    /// SIGKILL: the process dies at once, with no chance to flush anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends a signal by number (15 = SIGTERM, 2 = SIGINT) and waits for the exit.
    pub fn signal_and_wait(mut self, signal: i32) -> ExitStatus {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill failed");
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("herald did not exit within 10 s of signal {signal}");
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
