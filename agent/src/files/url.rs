//! The agent's door to URL inputs: a file at an `http://` or `https://` URL
//! (TLS through rustls, verified against the machine's trusted roots, which
//! `SSL_CERT_FILE` can replace; other schemes are refused), downloaded
//! into the node cache once and revalidated by every later part with a
//! conditional GET (`If-None-Match` / `If-Modified-Since`): a 304 reuses
//! the cached file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::{StatusCode, header};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

/// The largest file a URL input may be (64 GiB).
pub const MAX_URL_BYTES: u64 = 64 << 30;

/// A URL input that could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// No answer, or the connection broke.
    #[error("cannot download {url}")]
    Get {
        /// The URL.
        url: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error.
    #[error("cannot download {url}: HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// Its status.
        status: u16,
    },
    /// Not an `http://` or `https://` URL.
    #[error("cannot download {url}: the agent fetches http:// and https:// URLs only")]
    Unsupported {
        /// The URL.
        url: String,
    },
    /// An `https://` URL on a node that trusts no certificate authority.
    #[error(
        "cannot download {url}: this node has no trusted CA certificates (install ca-certificates, or point SSL_CERT_FILE at a bundle)"
    )]
    NoRoots {
        /// The URL.
        url: String,
    },
    /// Larger than [`MAX_URL_BYTES`].
    #[error("cannot download {url}: it is larger than {limit} bytes")]
    TooLarge {
        /// The URL.
        url: String,
        /// The limit.
        limit: u64,
    },
    /// The cache could not be written.
    #[error("cannot download {url}: cannot write {path}")]
    Local {
        /// The URL.
        url: String,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What the cache keeps beside a URL's bytes to revalidate them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UrlMeta {
    /// The URL.
    pub url: String,
    /// Its `ETag`, as the server wrote it (quotes included).
    pub etag: Option<String>,
    /// Its `Last-Modified`.
    pub last_modified: Option<String>,
    /// Its size.
    pub size: u64,
}

/// The headers that revalidate a cached copy with `meta`.
pub fn conditional_headers(meta: &UrlMeta) -> Vec<(header::HeaderName, String)> {
    let mut out = Vec::new();
    if let Some(e) = &meta.etag {
        out.push((header::IF_NONE_MATCH, e.clone()));
    }
    if let Some(m) = &meta.last_modified {
        out.push((header::IF_MODIFIED_SINCE, m.clone()));
    }
    out
}

/// How the file came: downloaded, or the cached copy still valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    /// Downloaded in full (bytes).
    Downloaded(u64),
    /// The server said the cached copy is current (304).
    Revalidated,
}

/// A client for URL inputs.
#[derive(Debug, Clone)]
pub struct UrlClient {
    http: reqwest::Client,
    /// Whether the machine's trusted roots were found (`https://` needs them).
    has_roots: bool,
}

impl UrlClient {
    /// A client with connect and read timeouts. On a machine without trusted
    /// CA certificates it still fetches `http://` and refuses `https://`
    /// saying why.
    pub fn new() -> Result<Self, reqwest::Error> {
        let builder = || {
            reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(60))
        };
        match builder().build() {
            Ok(http) => Ok(UrlClient {
                http,
                has_roots: true,
            }),
            Err(e) => {
                tracing::warn!(
                    error = %drover_api::error::chain(&e),
                    "no trusted CA certificates on this node; https:// inputs will be refused"
                );
                Ok(UrlClient {
                    http: builder()
                        .tls_certs_only(Vec::<reqwest::Certificate>::new())
                        .build()?,
                    has_roots: false,
                })
            }
        }
    }

    /// Brings `url` into the cache folder `dir` (`dir/body`, `dir/meta.json`)
    /// and returns the file.
    pub async fn fetch(&self, url: &str, dir: &Path) -> Result<(PathBuf, Fetched), UrlError> {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(UrlError::Unsupported {
                url: url.to_string(),
            });
        }
        if url.starts_with("https://") && !self.has_roots {
            return Err(UrlError::NoRoots {
                url: url.to_string(),
            });
        }
        let body = dir.join("body");
        let meta_path = dir.join("meta.json");
        let local = |path: &Path| {
            let path = path.to_path_buf();
            let url = url.to_string();
            move |source| UrlError::Local { url, path, source }
        };
        let cached: Option<UrlMeta> = std::fs::read(&meta_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|m: &UrlMeta| m.url == url)
            .filter(|m| std::fs::metadata(&body).is_ok_and(|b| b.len() == m.size));
        let mut req = self.http.get(url);
        if let Some(m) = &cached {
            for (name, value) in conditional_headers(m) {
                req = req.header(name, value);
            }
        }
        let get = |source| UrlError::Get {
            url: url.to_string(),
            source,
        };
        let mut resp = req.send().await.map_err(get)?;
        let status = resp.status();
        if status == StatusCode::NOT_MODIFIED && cached.is_some() {
            super::cache::Cache::touch(dir);
            return Ok((body, Fetched::Revalidated));
        }
        if status != StatusCode::OK {
            return Err(UrlError::Status {
                url: url.to_string(),
                status: status.as_u16(),
            });
        }
        let too_large = || UrlError::TooLarge {
            url: url.to_string(),
            limit: MAX_URL_BYTES,
        };
        if resp.content_length().is_some_and(|n| n > MAX_URL_BYTES) {
            return Err(too_large());
        }
        let text = |name: header::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let etag = text(header::ETAG);
        let last_modified = text(header::LAST_MODIFIED);
        std::fs::create_dir_all(dir).map_err(local(dir))?;
        let partial = dir.join("body.partial");
        let mut file = tokio::fs::File::create(&partial)
            .await
            .map_err(local(&partial))?;
        let mut size = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(get)? {
            size += chunk.len() as u64;
            if size > MAX_URL_BYTES {
                drop(file);
                let _ = std::fs::remove_file(&partial);
                return Err(too_large());
            }
            file.write_all(&chunk).await.map_err(local(&partial))?;
        }
        file.sync_all().await.map_err(local(&partial))?;
        drop(file);
        // Meta goes first out of the way, so a body never pairs with
        // another version's validators.
        let _ = std::fs::remove_file(&meta_path);
        std::fs::rename(&partial, &body).map_err(local(&body))?;
        let meta = UrlMeta {
            url: url.to_string(),
            etag,
            last_modified,
            size,
        };
        let bytes =
            serde_json::to_vec(&meta).map_err(|e| local(&meta_path)(std::io::Error::other(e)))?;
        std::fs::write(&meta_path, bytes).map_err(local(&meta_path))?;
        Ok((body, Fetched::Downloaded(size)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    /// Serves `body` with ETag "v1"; counts full answers and 304s.
    async fn serve(body: &'static [u8]) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let full = Arc::new(AtomicUsize::new(0));
        let not_modified = Arc::new(AtomicUsize::new(0));
        let (f, n) = (full.clone(), not_modified.clone());
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let (f, n) = (f.clone(), n.clone());
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut r = BufReader::new(r);
                    loop {
                        let mut req = String::new();
                        loop {
                            let mut line = String::new();
                            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            req.push_str(&line.to_ascii_lowercase());
                        }
                        let answer = if req.contains("if-none-match: \"v1\"") {
                            n.fetch_add(1, Ordering::SeqCst);
                            b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 0\r\n\r\n".to_vec()
                        } else {
                            f.fetch_add(1, Ordering::SeqCst);
                            let mut a = format!(
                                "HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            a.extend_from_slice(body);
                            a
                        };
                        if w.write_all(&answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, full, not_modified)
    }

    #[tokio::test]
    async fn a_url_is_downloaded_once_then_revalidated() {
        let (port, full, not_modified) = serve(b"a,b\n1,2\n").await;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("u");
        let url = format!("http://127.0.0.1:{port}/d/iris.csv");
        let c = UrlClient::new().unwrap();
        let (file, how) = c.fetch(&url, &dir).await.unwrap();
        assert_eq!(how, Fetched::Downloaded(8));
        assert_eq!(std::fs::read(&file).unwrap(), b"a,b\n1,2\n");
        let (again, how) = c.fetch(&url, &dir).await.unwrap();
        assert_eq!((again, how), (file.clone(), Fetched::Revalidated));
        assert_eq!(full.load(Ordering::SeqCst), 1);
        assert_eq!(not_modified.load(Ordering::SeqCst), 1);
        // A cached body that lost its bytes is fetched again in full.
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(c.fetch(&url, &dir).await.unwrap().1, Fetched::Downloaded(8));
    }

    #[tokio::test]
    async fn a_url_nobody_answers_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let url = "http://127.0.0.1:9/x.csv";
        let err = UrlClient::new()
            .unwrap()
            .fetch(url, &tmp.path().join("u"))
            .await
            .unwrap_err();
        let text = drover_api::error::chain(&err);
        assert!(
            text.starts_with("cannot download http://127.0.0.1:9/x.csv"),
            "{text}"
        );
        assert!(text.to_lowercase().contains("refused"), "{text}");
        let https = UrlClient::new()
            .unwrap()
            .fetch("ftp://example.com/x.csv", &tmp.path().join("h"))
            .await
            .unwrap_err();
        assert!(
            https.to_string().contains("http:// and https:// URLs only"),
            "{https}"
        );
    }

    #[test]
    fn a_cached_copy_is_revalidated_by_its_etag_and_date() {
        let meta = UrlMeta {
            url: "http://x/a.csv".into(),
            etag: Some("\"v1\"".into()),
            last_modified: Some("Wed, 02 Dec 2026 10:00:00 GMT".into()),
            size: 3,
        };
        let h = conditional_headers(&meta);
        assert_eq!(h[0], (header::IF_NONE_MATCH, "\"v1\"".to_string()));
        assert_eq!(h[1].0, header::IF_MODIFIED_SINCE);
        assert!(conditional_headers(&UrlMeta::default()).is_empty());
    }
}
