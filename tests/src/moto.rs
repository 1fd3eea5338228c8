//! A real S3 API for tests: `moto` in server mode on 127.0.0.1 (installed by
//! `scripts/setup.sh`; installed here from PyPI when missing), with plain
//! HTTP requests for what a test asks of the bucket directly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_until};

/// A running moto server; killed when dropped.
pub struct Moto {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn has_moto() -> bool {
    Command::new("python3")
        .args(["-c", "import moto.server"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Moto {
    /// Starts moto, or says why it cannot (not installed and pip failed).
    pub fn start() -> Result<Moto, String> {
        if !has_moto() {
            let _ = Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "--break-system-packages"])
                .arg("moto[server]")
                .status();
        }
        if !has_moto() {
            return Err("python3 cannot import moto.server and pip could not install it".into());
        }
        let port = free_port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start moto: {e}"))?;
        let moto = Moto { child, port };
        if !wait_until(Duration::from_secs(30), || {
            moto.request("GET", "/")
                .is_ok_and(|r| r.starts_with("HTTP/1.1 200"))
        }) {
            return Err(format!("moto did not answer on port {port}"));
        }
        Ok(moto)
    }

    /// Its endpoint URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment a `drover server` needs to use it.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.url()),
            ("AWS_ALLOW_HTTP", "true".into()),
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// One HTTP/1.1 request without a body; the whole answer as text.
    pub fn request(&self, method: &str, path: &str) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// Creates a bucket.
    pub fn create_bucket(&self, bucket: &str) {
        let answer = self
            .request("PUT", &format!("/{bucket}"))
            .expect("create bucket");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    /// The keys in `bucket` under `prefix` (one listing page, up to 1000).
    pub fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let answer = self
            .request("GET", &format!("/{bucket}?list-type=2&prefix={prefix}"))
            .expect("list objects");
        answer
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}
