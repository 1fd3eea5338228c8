//! The CLI's HTTP client for `drover server`: where it is, who we are, and
//! errors that say what to do.

use std::path::PathBuf;

use anyhow::{Context, bail};
use drover_api::wire::{self, ErrorBody, ErrorCode};
use reqwest::Method;
use serde::Serialize;
use serde::de::DeserializeOwned;

use drover_control::output;
use drover_control::server::ADMIN_TOKEN_FILE;

use super::default_data_dir;

/// How to reach the server; shared by every client command. No `Debug`:
/// it holds the token.
#[derive(clap::Args, Clone)]
pub struct ClientArgs {
    /// The control plane's URL.
    #[arg(
        long,
        env = "DROVER_SERVER",
        default_value = "http://127.0.0.1:7340",
        global = true
    )]
    pub server: String,
    /// API token (default: the admin token in the default data directory).
    #[arg(long, env = "DROVER_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A client bound to one server and token.
pub struct Client {
    base: String,
    token: Option<String>,
    token_file: PathBuf,
    http: reqwest::Client,
}

impl Client {
    /// A client from the command line; reads the default admin token file
    /// when no token is given.
    pub fn new(args: &ClientArgs) -> anyhow::Result<Client> {
        let token_file = default_data_dir().join(ADMIN_TOKEN_FILE);
        let token = match &args.token {
            Some(t) => Some(t.trim().to_string()),
            None => match std::fs::read_to_string(&token_file) {
                Ok(t) => Some(t.trim().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot read {}", token_file.display()));
                }
            },
        };
        let mut builder = reqwest::Client::builder();
        if args.server.starts_with("http://") {
            // No TLS to set up: a machine without CA certificates still
            // reaches a plain-HTTP control plane.
            builder = builder.tls_certs_only(Vec::<reqwest::Certificate>::new());
        }
        let http = builder.build().context(
            "cannot set up the http client (for https://, the machine needs CA certificates)",
        )?;
        Ok(Client {
            base: args.server.trim_end_matches('/').to_string(),
            token,
            token_file,
            http,
        })
    }

    /// A client of the server's blob routes, with this client's token.
    pub fn blobs(&self) -> drover_files::BlobClient {
        drover_files::BlobClient::new(
            self.http.clone(),
            &self.base,
            drover_files::BlobRoutes::User,
            self.token.clone().unwrap_or_default(),
        )
    }

    /// Sends a request and decodes the answer; API errors become messages.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<T> {
        let text = self.call_text(method, path, body).await?;
        serde_json::from_str(&text)
            .with_context(|| format!("unexpected answer from the drover server at {}", self.base))
    }

    /// Like [`Client::call`], for answers without a body.
    pub async fn call_text<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            let json = serde_json::to_vec(b).context("cannot encode the request as json")?;
            // The server answers 413 and closes the connection while a large
            // body is still being written, which the client would see only
            // as a broken pipe: say what the server would say instead.
            if json.len() > wire::MAX_REQUEST_BYTES {
                bail!("{}", wire::too_large_message(Some(json.len())));
            }
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => bail!("{}", self.unreachable(&e)),
        };
        let status = resp.status();
        let text = resp.text().await.with_context(|| {
            format!(
                "cannot read the answer of the drover server at {}",
                self.base
            )
        })?;
        if status.is_success() {
            return Ok(text);
        }
        let (code, message) = match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => (Some(body.error.code), body.error.message),
            Err(_) => (
                None,
                format!(
                    "the drover server at {} answered {status}: {}",
                    self.base,
                    text.trim()
                ),
            ),
        };
        match code {
            Some(ErrorCode::Unauthorized) => {
                let hint = match &self.token {
                    None => format!(
                        "no api token: pass --token or set DROVER_TOKEN (the first start of `drover server` writes one to {})",
                        self.token_file.display()
                    ),
                    Some(_) => "check --token / DROVER_TOKEN".to_string(),
                };
                bail!("{message} ({hint})")
            }
            Some(ErrorCode::Busy) => bail!("{message} (the server is busy; try again)"),
            _ => bail!("{message}"),
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> String {
        let mut reason = None;
        let mut source: Option<&dyn std::error::Error> = Some(e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>() {
                reason = Some(match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                    _ => io.to_string(),
                });
            }
            source = s.source();
        }
        let reason = reason.unwrap_or_else(|| e.to_string());
        if e.is_connect() {
            format!(
                "cannot reach the drover server at {}: {reason} — is `drover server` running?",
                self.base
            )
        } else {
            format!(
                "request to the drover server at {} failed: {reason}",
                self.base
            )
        }
    }
}

/// Percent-encodes a path segment or query value (names are plain, but a
/// typo with `/` or `?` must not address another route).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Prints a value as one pretty JSON document.
pub fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(value).context("cannot encode the answer as json")?;
    output::println(json)?;
    Ok(())
}
