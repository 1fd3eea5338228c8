//! An `https://` URL input through the agent's real URL client, against a
//! real TLS server on 127.0.0.1 (Python's `http.server` wrapped in `ssl`)
//! whose certificate, signed by a private CA, is trusted through `SSL_CERT_FILE`, as an
//! administrator would add a private CA: downloaded once, then revalidated
//! (304) by a conditional GET; an untrusted certificate is a clear error.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use drover_agent::files::url::{Fetched, UrlClient};

/// A private CA (ca.pem) and a certificate it signed for 127.0.0.1
/// (cert.pem, key.pem) in `dir`.
fn make_certificate(dir: &Path) {
    let openssl = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl");
        assert!(status.success(), "openssl {args:?} failed");
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=drover test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "leaf.csr",
    ]);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "cert.pem",
    ]);
}

struct TlsServer {
    child: Child,
    port: u16,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `root` over TLS with the certificate in `certs`.
fn serve(root: &Path, certs: &Path) -> TlsServer {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let script = format!(
        "import http.server, ssl, functools\n\
         h = functools.partial(http.server.SimpleHTTPRequestHandler, directory={root:?})\n\
         s = http.server.ThreadingHTTPServer(('127.0.0.1', {port}), h)\n\
         c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
         c.load_cert_chain({cert:?}, {key:?})\n\
         s.socket = c.wrap_socket(s.socket, server_side=True)\n\
         s.serve_forever()\n",
        root = root.display().to_string(),
        cert = certs.join("cert.pem").display().to_string(),
        key = certs.join("key.pem").display().to_string(),
    );
    let child = Command::new("python3")
        .args(["-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the TLS server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsServer { child, port }
}

#[tokio::test]
async fn an_https_input_is_downloaded_once_then_revalidated_and_an_untrusted_one_refused() {
    let certs = tempfile::tempdir().unwrap();
    make_certificate(certs.path());
    let root = tempfile::tempdir().unwrap();
    std::fs::write(
        root.path().join("iris.csv"),
        "sepal_length,species\n5.1,setosa\n",
    )
    .unwrap();
    let server = serve(root.path(), certs.path());
    let url = format!("https://127.0.0.1:{}/iris.csv", server.port);
    let cache = tempfile::tempdir().unwrap();

    // Not trusted yet: the error names the URL and says why.
    let err = UrlClient::new()
        .unwrap()
        .fetch(&url, &cache.path().join("untrusted"))
        .await
        .unwrap_err();
    let text = drover_api::error::chain(&err);
    assert!(
        text.starts_with(&format!("cannot download {url}")),
        "{text}"
    );
    assert!(text.to_lowercase().contains("certificate"), "{text}");

    // SAFETY (edition 2024 marks set_var unsafe): this test binary runs this
    // one test, and no other thread reads the environment while it is set.
    unsafe { std::env::set_var("SSL_CERT_FILE", certs.path().join("ca.pem")) };
    let client = UrlClient::new().unwrap();
    let dir = cache.path().join("trusted");
    let (file, first) = client.fetch(&url, &dir).await.unwrap();
    assert!(matches!(first, Fetched::Downloaded(32)), "{first:?}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "sepal_length,species\n5.1,setosa\n"
    );
    let (again, second) = client.fetch(&url, &dir).await.unwrap();
    assert!(matches!(second, Fetched::Revalidated), "{second:?}");
    assert_eq!(again, file);
}
