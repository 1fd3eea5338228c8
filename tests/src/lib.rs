//! Harness for Drover's end-to-end tests: real binaries, a real Docker engine
//! and a real registry (Debian's `docker-registry`) on 127.0.0.1.
//!
//! Tests need a Docker engine and the offline base image
//! (`images/build-offline.sh base`); they fail with a message that says so
//! when either is missing, rather than skipping.

pub mod cluster;
pub mod kill_loop;
pub mod moto;

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The offline base image every e2e job uses.
pub const BASE_IMAGE: &str = "drover/base:bookworm";

/// Root of the source checkout.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo target folder these tests were built into.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    repo_root().join("target")
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn run_checked(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds (once per test process) the `drover` CLI and the static
/// drover-init, and returns the CLI's path. Cargo is a no-op when they are
/// up to date, which is the case after `make build`.
pub fn drover_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build_drover(false)).clone()
}

/// Like [`drover_bin`], but the optimised build (for benchmarks).
pub fn drover_bin_release() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| build_drover(true)).clone()
}

fn build_drover(release: bool) -> PathBuf {
    let _guard = build_lock();
    let mut args = vec!["build", "-q", "-p", "drover-control", "--bin", "drover"];
    if release {
        args.push("--release");
    }
    run_checked(
        cargo().current_dir(repo_root()).args(&args),
        "building drover",
    );
    run_checked(
        cargo()
            .current_dir(repo_root())
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .args([
                "build",
                "-q",
                "--release",
                "--target",
                "x86_64-unknown-linux-gnu",
                "-p",
                "drover-init",
            ]),
        "building drover-init",
    );
    target_dir().join(if release {
        "release/drover"
    } else {
        "debug/drover"
    })
}

/// Path of the static drover-init built by [`drover_bin`].
pub fn init_bin() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        drover_bin();
    });
    target_dir().join("x86_64-unknown-linux-gnu/release/drover-init")
}

/// Path of the static drover-init, after [`drover_bin_release`] built it
/// (the same file [`init_bin`] returns, without a debug build of the CLI).
pub fn init_bin_release() -> PathBuf {
    drover_bin_release();
    target_dir().join("x86_64-unknown-linux-gnu/release/drover-init")
}

fn build_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Panics with a clear message unless a Docker engine and the base image are there.
pub fn require_docker() {
    static CHECKED: OnceLock<()> = OnceLock::new();
    CHECKED.get_or_init(|| {
        let info = Command::new("docker")
            .args(["info", "--format", "{{.ServerVersion}}"])
            .output();
        match info {
            Ok(o) if o.status.success() => {}
            _ => panic!(
                "these tests need a running Docker engine (`docker info` failed); start dockerd"
            ),
        }
        let img = Command::new("docker")
            .args(["image", "inspect", BASE_IMAGE])
            .output()
            .expect("docker image inspect");
        assert!(
            img.status.success(),
            "these tests need {BASE_IMAGE}; build it with `images/build-offline.sh base`"
        );
    });
}

/// A job folder with a `job.yml`.
pub struct JobDir {
    /// The temporary folder (removed on drop).
    pub dir: tempfile::TempDir,
}

impl JobDir {
    /// Writes `yaml` as `job.yml` in a fresh folder.
    pub fn new(yaml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("job.yml"), yaml).expect("write job.yml");
        JobDir { dir }
    }

    /// The job file.
    pub fn job_file(&self) -> PathBuf {
        self.dir.path().join("job.yml")
    }

    /// A path inside the folder.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Writes a file (creating parent folders).
    pub fn write(&self, rel: &str, contents: &str) {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        std::fs::write(p, contents).expect("write");
    }
}

/// Result of a finished `drover` command.
pub struct Finished {
    /// Exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl From<(Output, Duration)> for Finished {
    fn from((o, elapsed): (Output, Duration)) -> Self {
        Finished {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            elapsed,
        }
    }
}

/// Runs `drover run <job> --name <name> [extra]` to completion.
pub fn drover_run(job: &JobDir, name: &str, extra: &[&str]) -> Finished {
    require_docker();
    let started = Instant::now();
    let out = Command::new(drover_bin())
        .arg("run")
        .arg(job.job_file())
        .args(["--name", name])
        .args(extra)
        .env("DROVER_INIT", init_bin())
        .output()
        .expect("run drover");
    (out, started.elapsed()).into()
}

/// Starts `drover run` without waiting.
pub fn drover_run_spawn(job: &JobDir, name: &str) -> Child {
    require_docker();
    Command::new(drover_bin())
        .arg("run")
        .arg(job.job_file())
        .args(["--name", name])
        .env("DROVER_INIT", init_bin())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn drover")
}

/// A job command (a quoted YAML scalar) whose every rank prints five lines
/// to stdout and five to stderr, rank 2 also a line of 100 000 bytes, then
/// `done`; run it with three processes per node.
pub const RANKS_COMMAND: &str = r#"'for i in 1 2 3 4 5; do echo "r$RANK line $i"; echo "r$RANK err $i" >&2; done; if [ "$RANK" = 2 ]; then head -c 100000 /dev/zero | tr "\0" y; echo; fi; echo "r$RANK done"'"#;

/// Checks the output of [`RANKS_COMMAND`]'s three ranks on node 0, with
/// each line prefixed by who wrote it: every line there, in order within
/// its rank and stream, the long line split into pieces with nothing lost.
/// `stdout` and `stderr` may be one text (`drover job logs` prints both).
pub fn check_ranks_output(stdout: &str, stderr: &str) {
    for rank in 0..3 {
        let prefix = format!("[node 0 rank {rank}] ");
        let err_of = format!("r{rank} err ");
        let out: Vec<&str> = stdout
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter(|l| !l.starts_with(&err_of))
            .collect();
        let mut want: Vec<String> = (1..=5).map(|i| format!("r{rank} line {i}")).collect();
        let long: Vec<&str> = out.iter().copied().filter(|l| l.starts_with('y')).collect();
        if rank == 2 {
            assert_eq!(long.concat(), "y".repeat(100_000), "the long line, whole");
            assert!(long.len() > 1, "split into pieces");
            assert!(long.iter().all(|p| p.len() <= 8 * 1024));
            want.extend(long.iter().map(|p| p.to_string()));
        } else {
            assert!(long.is_empty());
        }
        want.push(format!("r{rank} done"));
        assert_eq!(out, want, "rank {rank}'s stdout, in order:\n{stdout}");
        let err: Vec<&str> = stderr
            .lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter(|l| l.starts_with(&err_of))
            .collect();
        let want_err: Vec<String> = (1..=5).map(|i| format!("r{rank} err {i}")).collect();
        assert_eq!(err, want_err, "rank {rank}'s stderr:\n{stderr}");
    }
    assert!(
        !stdout.contains('\x1e') && !stderr.contains('\x1e'),
        "no marker is left in the text"
    );
}

/// A unique, valid job name for one test.
pub fn unique_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{:x}-{}", nanos & 0xffff_ffff, std::process::id())
}

/// Containers (any state) whose `drover.job` label is `job`.
pub fn containers_of_job(job: &str) -> Vec<String> {
    containers_labelled("drover.job", job)
}

/// How long one `drover` command of a test may run before it is killed:
/// `DROVER_TEST_COMMAND_TIMEOUT` seconds, 420 by default. A hung command
/// then fails its test with what it printed, instead of stalling the suite.
pub fn command_timeout() -> Duration {
    let secs = std::env::var("DROVER_TEST_COMMAND_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(420);
    Duration::from_secs(secs)
}

/// Runs `cmd` to completion like `Command::output`, but kills it after
/// `timeout` and panics with what it printed by then.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> Output {
    try_output_within(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

/// [`output_within`], with a command that ran too long as `Err` (saying
/// what it printed) so the caller can add its own context.
pub fn try_output_within(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd:?} cannot start: {e}"));
    // Read on threads so that a chatty command never blocks on a full pipe.
    fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) | Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let out = stdout.join().unwrap_or_default();
                let err = stderr.join().unwrap_or_default();
                return Err(format!(
                    "{cmd:?} still ran after {timeout:?} and was killed; it printed:\n{}{}",
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&err)
                ));
            }
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A tiny image (busybox only) built from the host's static busybox, so
/// registry tests push and pull a couple of MB instead of a Debian rootfs.
pub fn tiny_image() -> &'static str {
    const TAG: &str = "drover/tiny:test";
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        require_docker();
        let exists = Command::new("docker")
            .args(["image", "inspect", TAG])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if exists {
            return;
        }
        let busybox = Path::new("/bin/busybox");
        assert!(
            busybox.exists(),
            "registry tests need a static busybox (apt-get install busybox-static)"
        );
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("bin")).expect("mkdir bin");
        std::fs::copy(busybox, root.path().join("bin/busybox")).expect("copy busybox");
        std::os::unix::fs::symlink("busybox", root.path().join("bin/sh")).expect("symlink sh");
        let mut tar = Command::new("tar")
            .arg("-C")
            .arg(root.path())
            .args(["-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .expect("tar");
        let stdout = tar.stdout.take().expect("tar stdout");
        run_checked(
            Command::new("docker")
                .args(["import", "--change", "CMD [\"/bin/sh\"]", "-", TAG])
                .stdin(stdout),
            "docker import tiny image",
        );
        assert!(
            tar.wait().map(|s| s.success()).unwrap_or(false),
            "tar failed"
        );
    });
    TAG
}

/// A `docker-registry` on 127.0.0.1 with one htpasswd user, logging requests
/// to a file the test can read. Stopped on drop.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
    docker_config: PathBuf,
}

impl Registry {
    /// Starts a registry with user `drover`/`s3cret-pw`.
    pub fn start() -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let user = "drover".to_string();
        let password = "s3cret-pw".to_string();
        let htpasswd = Command::new("htpasswd")
            .args(["-Bbn", &user, &password])
            .output()
            .expect("htpasswd (apt-get install apache2-utils)");
        assert!(htpasswd.status.success(), "htpasswd failed");
        std::fs::write(dir.path().join("htpasswd"), &htpasswd.stdout).expect("write htpasswd");
        let auth = format!(
            "  htpasswd:\n    realm: drover-test\n    path: {}\n",
            dir.path().join("htpasswd").display()
        );
        Self::serve(dir, &auth, free_port(), user, password)
    }

    /// Starts a registry that sends clients to the token service at
    /// `realm` (as Azure Container Registry does), trusting access tokens
    /// from `issuer` signed by the key of the PEM certificate `cert`.
    /// `port` 0 picks one; the service name is the registry's address.
    pub fn start_with_token_service(realm: &str, issuer: &str, cert: &Path, port: u16) -> Registry {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = if port == 0 { free_port() } else { port };
        let auth = format!(
            "  token:\n    realm: {realm}\n    service: 127.0.0.1:{port}\n    issuer: {issuer}\n    rootcertbundle: {}\n",
            cert.display()
        );
        Self::serve(dir, &auth, port, String::new(), String::new())
    }

    fn serve(
        dir: tempfile::TempDir,
        auth: &str,
        port: u16,
        user: String,
        password: String,
    ) -> Registry {
        let addr = format!("127.0.0.1:{port}");
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\nauth:\n{auth}",
            root = dir.path().join("data").display(),
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("write registry config");
        let log = dir.path().join("registry.log");
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log_file.try_clone().expect("clone log"))
            .stderr(log_file)
            .spawn()
            .expect("start docker-registry (apt-get install docker-registry)");
        let up = wait_until(Duration::from_secs(15), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        assert!(up, "registry did not start on {addr}");
        let docker_config = dir.path().join("docker-config");
        std::fs::create_dir_all(&docker_config).expect("mkdir docker config");
        Registry {
            addr,
            user,
            password,
            child,
            log,
            _dir: dir,
            docker_config,
        }
    }

    /// A private Docker client config folder logged in to this registry
    /// (for `DOCKER_CONFIG`), leaving ~/.docker alone.
    pub fn docker_config(&self) -> PathBuf {
        self.login();
        self.docker_config.clone()
    }

    /// Pushes local `image` as `<registry>/<repo>` with the docker CLI
    /// (logged in through a private client config, leaving ~/.docker alone).
    pub fn push(&self, image: &str, repo: &str) -> String {
        let target = format!("{}/{repo}", self.addr);
        let docker = |args: &[&str]| {
            let mut c = Command::new("docker");
            c.arg("--config").arg(&self.docker_config).args(args);
            c
        };
        self.login();
        run_checked(&mut docker(&["tag", image, &target]), "docker tag");
        run_checked(&mut docker(&["push", &target]), "docker push");
        // Drop the local copy so a later pull really goes to the registry.
        run_checked(&mut docker(&["rmi", &target]), "docker rmi");
        target
    }

    fn login(&self) {
        let mut login = Command::new("docker");
        login.arg("--config").arg(&self.docker_config).args([
            "login",
            "-u",
            &self.user,
            "--password-stdin",
            &self.addr,
        ]);
        login
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = login.spawn().expect("docker login");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin.write_all(self.password.as_bytes()).expect("password");
        }
        let out = child.wait_with_output().expect("docker login");
        assert!(
            out.status.success(),
            "docker login failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Successful manifest look-ups of `repo` by tag in the access log: the
    /// engine resolves a tag once per pull (`HEAD`, or `GET` on older
    /// engines) and then fetches by digest, so this counts pulls.
    pub fn manifest_gets(&self, repo: &str) -> usize {
        let by_tag = format!("/v2/{repo}/manifests/");
        BufReader::new(self.log().as_bytes())
            .lines()
            .map_while(Result::ok)
            .filter(|l| {
                (l.contains(&format!("\"HEAD {by_tag}")) || l.contains(&format!("\"GET {by_tag}")))
                    && !l.contains(&format!("{by_tag}sha256:"))
                    && l.contains("\" 200 ")
            })
            .count()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Pulled copies are tagged with this registry's address; leave none behind.
        if let Ok(out) = Command::new("docker")
            .args(["images", "--format", "{{.Repository}}:{{.Tag}}"])
            .output()
        {
            let prefix = format!("{}/", self.addr);
            let ours: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with(&prefix))
                .map(str::to_string)
                .collect();
            if !ours.is_empty() {
                let _ = Command::new("docker")
                    .arg("rmi")
                    .args(&ours)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// A benchmark's `NAME VALUE` argument, or `default` when absent or unreadable.
pub fn bench_arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Debian's Python (`/usr/bin/python3`) when there, else `python3` on the PATH.
pub fn python3() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

/// `GET path` from `addr` over plain HTTP/1.0: the whole answer, status
/// line and headers included.
pub fn http_get(addr: &str, path: &str) -> String {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    text
}

/// Builds (once per test process) the `drover-agent` binary, plus what
/// [`drover_bin`] builds, and returns the agent's path.
pub fn agent_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            drover_bin();
            build_agent(false)
        })
        .clone()
}

/// Like [`agent_bin`], but the optimised build (for benchmarks), plus what
/// [`drover_bin_release`] builds.
pub fn agent_bin_release() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            drover_bin_release();
            build_agent(true)
        })
        .clone()
}

/// Builds (once per test process) the `drover-imds-emulator` binary and
/// returns its path.
pub fn imds_emulator_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let _guard = build_lock();
            run_checked(
                cargo().current_dir(repo_root()).args([
                    "build",
                    "-q",
                    "-p",
                    "drover-imds-emulator",
                    "--bin",
                    "drover-imds-emulator",
                ]),
                "building drover-imds-emulator",
            );
            target_dir().join("debug/drover-imds-emulator")
        })
        .clone()
}

fn build_agent(release: bool) -> PathBuf {
    let _guard = build_lock();
    let mut args = vec!["build", "-q", "-p", "drover-agent", "--bin", "drover-agent"];
    if release {
        args.push("--release");
    }
    run_checked(
        cargo().current_dir(repo_root()).args(&args),
        "building drover-agent",
    );
    target_dir().join(if release {
        "release/drover-agent"
    } else {
        "debug/drover-agent"
    })
}

/// A `drover server` process on a free 127.0.0.1 port with its own data dir,
/// a short grace period and 1 s heartbeats; killed when dropped.
pub struct ServerProc {
    child: Option<Child>,
    /// Its data dir (kept across [`ServerProc::restart`]).
    pub data: tempfile::TempDir,
    /// Its port.
    pub port: u16,
    /// The admin API token.
    pub token: String,
    /// Seconds without a heartbeat before a node is unusable.
    pub grace_seconds: u64,
    log: PathBuf,
    release: bool,
    /// Extra `drover server` flags and environment (an S3 artifact store).
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
    /// The address it listens on (`127.0.0.1` unless started with
    /// [`ServerProc::start_on`]).
    listen_ip: String,
}

impl ServerProc {
    /// Starts a server with the given grace period.
    pub fn start(grace_seconds: u64) -> ServerProc {
        Self::start_build(grace_seconds, false)
    }

    /// Like [`ServerProc::start`], with the release build of `drover` (for
    /// the server and for [`ServerProc::cli`]).
    pub fn start_release(grace_seconds: u64) -> ServerProc {
        Self::start_build(grace_seconds, true)
    }

    fn drover(&self) -> PathBuf {
        if self.release {
            drover_bin_release()
        } else {
            drover_bin()
        }
    }

    /// Like [`ServerProc::start`], with extra `drover server` flags and
    /// environment variables (kept for every restart).
    pub fn start_with(grace_seconds: u64, args: &[&str], env: &[(&str, &str)]) -> ServerProc {
        Self::start_full(
            grace_seconds,
            false,
            args.iter().map(|a| a.to_string()).collect(),
            env.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn start_build(grace_seconds: u64, release: bool) -> ServerProc {
        Self::start_full(grace_seconds, release, Vec::new(), Vec::new())
    }

    /// Like [`ServerProc::start`], listening on `ip` (an address of this
    /// host that containers reach, such as Docker's bridge gateway) rather
    /// than 127.0.0.1; [`ServerProc::url`] and the CLI use it too.
    pub fn start_on(grace_seconds: u64, ip: &str) -> ServerProc {
        Self::start_listening(grace_seconds, false, Vec::new(), Vec::new(), ip)
    }

    fn start_full(
        grace_seconds: u64,
        release: bool,
        extra_args: Vec<String>,
        extra_env: Vec<(String, String)>,
    ) -> ServerProc {
        Self::start_listening(grace_seconds, release, extra_args, extra_env, "127.0.0.1")
    }

    fn start_listening(
        grace_seconds: u64,
        release: bool,
        extra_args: Vec<String>,
        extra_env: Vec<(String, String)>,
        listen_ip: &str,
    ) -> ServerProc {
        let data = tempfile::tempdir().expect("tempdir");
        let mut s = ServerProc {
            listen_ip: listen_ip.to_string(),
            child: None,
            port: free_port(),
            token: format!("e2e-token-{}", unique_name("t")),
            grace_seconds,
            log: data.path().join("server.log"),
            data,
            release,
            extra_args,
            extra_env,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("server log");
        let child = Command::new(self.drover())
            .args([
                "server",
                "--data-dir",
                &self.data.path().join("srv").display().to_string(),
                "--listen",
                &format!("{}:{}", self.listen_ip, self.port),
                "--grace-seconds",
                &self.grace_seconds.to_string(),
                "--heartbeat-seconds",
                "1",
            ])
            .args(&self.extra_args)
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .env("DROVER_TOKEN", &self.token)
            .env_remove("DROVER_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("drover server starts");
        self.child = Some(child);
        let port = self.port;
        let ip = self.listen_ip.clone();
        assert!(
            wait_until(Duration::from_secs(20), || std::net::TcpStream::connect((
                ip.as_str(),
                port
            ))
            .is_ok()),
            "drover server did not listen on {port}: {}",
            self.log_text()
        );
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.listen_ip, self.port)
    }

    /// What the server wrote to stderr.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Kills the server (SIGKILL); [`ServerProc::resume`] starts it again.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the server with SIGTERM (a clean shutdown) and waits for it;
    /// [`ServerProc::resume`] starts it again.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed server again on the same port and data.
    pub fn resume(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// `drover ARGS` against this server, to be run (with its own data and
    /// cache folders).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(self.drover());
        cmd.args(args)
            .env("DROVER_SERVER", self.url())
            .env("DROVER_TOKEN", &self.token)
            .env("DROVER_DATA_DIR", self.data.path().join("cli"))
            .env("XDG_CACHE_HOME", self.data.path().join("cli-cache"))
            .env_remove("DROVER_LOG");
        cmd
    }

    /// Runs `drover ARGS` against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        output_within(&mut self.command(args), command_timeout())
    }

    /// Runs `drover ARGS`, asserts success and returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "drover {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Submits a job file to `cluster`; returns the job's name.
    pub fn submit(&self, file: &Path, cluster: &str) -> String {
        submit_with(|args| self.cli_ok(args), file, cluster)
    }

    /// Creates a cluster of up to `max_nodes` and returns its join token.
    pub fn create_cluster(&self, name: &str, max_nodes: u32) -> String {
        self.create_cluster_with(name, max_nodes, &[])
    }

    /// Like [`ServerProc::create_cluster`], with more `compute create` flags.
    pub fn create_cluster_with(&self, name: &str, max_nodes: u32, extra: &[&str]) -> String {
        let max = max_nodes.to_string();
        let mut args = vec![
            "compute",
            "create",
            "--name",
            name,
            "--vm-size",
            "STANDARD_D3_V2",
            "--max-nodes",
            &max,
        ];
        args.extend_from_slice(extra);
        let out = self.cli_ok(&args);
        out.lines()
            .last()
            .map(|l| l.trim().to_string())
            .expect("join token line")
    }

    /// `drover job show NAME --json`, parsed.
    pub fn job(&self, name: &str) -> serde_json::Value {
        let out = self.cli_ok(&["job", "show", name, "--json"]);
        serde_json::from_str(&out).expect("job json")
    }

    /// The job's state (`queued`, `running`, `completed`, …).
    pub fn job_state(&self, name: &str) -> String {
        self.job(name)["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits until the job is in `state`, panicking with its details if not.
    pub fn wait_job_state(&self, name: &str, state: &str, timeout: Duration) {
        let ok = wait_until(timeout, || self.job_state(name) == state);
        assert!(
            ok,
            "job {name} never became {state}: {}\n{}",
            self.job(name),
            self.log_text()
        );
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A `drover-agent run` process as one node, with its own data dir (so a
/// restart reuses its credential); killed when dropped.
pub struct AgentProc {
    child: Option<Child>,
    /// Node id.
    pub node_id: String,
    server: String,
    cluster: String,
    join_token: String,
    data: tempfile::TempDir,
    log: PathBuf,
    extra: Vec<String>,
    release: bool,
}

impl AgentProc {
    /// Starts an agent joining `cluster` of `server` as `node_id`.
    pub fn start(server: &ServerProc, cluster: &str, join_token: &str, node_id: &str) -> AgentProc {
        Self::start_with_args(server, cluster, join_token, node_id, &[])
    }

    /// Like [`AgentProc::start`], with more `drover-agent run` arguments.
    pub fn start_with_args(
        server: &ServerProc,
        cluster: &str,
        join_token: &str,
        node_id: &str,
        extra: &[String],
    ) -> AgentProc {
        Self::start_build(server, cluster, join_token, node_id, extra, false)
    }

    /// Like [`AgentProc::start_with_args`], with the release builds of
    /// `drover-agent` and drover-init (for benchmarks).
    pub fn start_release(
        server: &ServerProc,
        cluster: &str,
        join_token: &str,
        node_id: &str,
        extra: &[String],
    ) -> AgentProc {
        Self::start_build(server, cluster, join_token, node_id, extra, true)
    }

    fn start_build(
        server: &ServerProc,
        cluster: &str,
        join_token: &str,
        node_id: &str,
        extra: &[String],
        release: bool,
    ) -> AgentProc {
        let data = tempfile::tempdir().expect("tempdir");
        let mut a = AgentProc {
            release,
            extra: extra.to_vec(),
            child: None,
            node_id: node_id.to_string(),
            server: server.url(),
            cluster: cluster.to_string(),
            join_token: join_token.to_string(),
            log: data.path().join("agent.log"),
            data,
        };
        a.spawn();
        a
    }

    /// The agent's data dir.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// (Re)starts the process.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log");
        let (agent, init) = if self.release {
            (agent_bin_release(), init_bin_release())
        } else {
            (agent_bin(), init_bin())
        };
        let child = Command::new(agent)
            .args([
                "run",
                "--server",
                &self.server,
                "--cluster",
                &self.cluster,
                "--node-id",
                &self.node_id,
                "--data-dir",
                &self.data.path().display().to_string(),
                "--heartbeat-seconds",
                "1",
                "--stop-grace-seconds",
                "2",
                "--drain-seconds",
                "20",
                "--init-binary",
                &init.display().to_string(),
                // Agents of one test share the host's loopback: each its
                // own token endpoint port.
                "--identity-listen",
                "127.0.0.1:0",
            ])
            .args(&self.extra)
            .env("DROVER_JOIN_TOKEN", &self.join_token)
            .env("DROVER_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("drover-agent starts");
        self.child = Some(child);
    }

    /// What the agent wrote to stderr.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the process.
    pub fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status();
        }
    }

    /// `kill -9`: no drain, no goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for the exit code (None if it had to be killed).
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        None
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Force-removes every container of `job` (test cleanup).
pub fn remove_job_containers(job: &str) {
    let ids = containers_of_job(job);
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .output();
    }
}

/// A short unique cluster name (compute names are at most 16 characters).
pub fn short_name(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{:06x}", (nanos ^ std::process::id()) & 0xff_ffff)
}

/// A whole local cluster made by `drover up`, with its own data dir and
/// ports; `drover down --purge` when dropped.
pub struct LocalUp {
    /// Its data dir.
    pub data: tempfile::TempDir,
    /// The server's port.
    pub port: u16,
    /// The default cluster `drover up` made.
    pub cluster: String,
    /// The port of its IMDS emulator (on the host; nodes reach it at their
    /// network's gateway).
    pub imds_port: u16,
    release: bool,
    down: bool,
}

impl LocalUp {
    /// `drover up` with debug builds; `extra` are more `drover up` flags.
    pub fn up(extra: &[&str]) -> LocalUp {
        Self::up_build(extra, false)
    }

    /// `drover up` with release builds (benchmarks).
    pub fn up_release(extra: &[&str]) -> LocalUp {
        Self::up_build(extra, true)
    }

    /// `drover up` with debug builds, its node image built from `agent`
    /// (another agent build: a node image of its own).
    pub fn up_with_agent(agent: &Path, extra: &[&str]) -> LocalUp {
        Self::up_from(agent, extra, false)
    }

    fn up_build(extra: &[&str], release: bool) -> LocalUp {
        let agent = if release {
            agent_bin_release()
        } else {
            agent_bin()
        };
        Self::up_from(&agent, extra, release)
    }

    fn up_from(agent: &Path, extra: &[&str], release: bool) -> LocalUp {
        require_docker();
        let init = if release {
            init_bin_release()
        } else {
            init_bin()
        };
        let up = LocalUp {
            data: tempfile::tempdir().expect("tempdir"),
            port: free_port(),
            cluster: short_name("up"),
            imds_port: free_port(),
            release,
            down: false,
        };
        let out = up.drover(
            &[
                "up",
                "--data-dir",
                &up.data.path().display().to_string(),
                "--port",
                &up.port.to_string(),
                "--imds-listen",
                &format!("0.0.0.0:{}", up.imds_port),
                "--cluster",
                &up.cluster,
                "--agent-binary",
                &agent.display().to_string(),
                "--init",
                &init.display().to_string(),
                "--node-heartbeat-seconds",
                "1",
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        );
        assert!(
            out.status.success(),
            "drover up failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        up
    }

    fn drover(&self, args: &[&str]) -> Output {
        try_output_within(&mut self.command(args), command_timeout())
            .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", self.log_text()))
    }

    /// `drover ARGS` against this cluster's server, not started (for
    /// commands that run on, like `job create --stream`).
    pub fn command(&self, args: &[&str]) -> Command {
        let bin = if self.release {
            drover_bin_release()
        } else {
            drover_bin()
        };
        let token = std::fs::read_to_string(self.data.path().join("admin.token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default();
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env("DROVER_SERVER", format!("http://127.0.0.1:{}", self.port))
            .env_remove("DROVER_TOKEN")
            .env_remove("DROVER_LOG");
        if !token.is_empty() {
            cmd.env("DROVER_TOKEN", token);
        }
        cmd
    }

    /// Runs `drover ARGS` against this cluster's server.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.drover(args)
    }

    /// Runs `drover ARGS`, asserts success and returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "drover {args:?} failed: {}{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server's log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.data.path().join("server.log")).unwrap_or_default()
    }

    /// `drover compute show NAME --json`, parsed.
    pub fn compute(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["compute", "show", name, "--json"]))
            .expect("compute json")
    }

    /// `drover node list -c NAME --json`'s nodes.
    pub fn nodes(&self, cluster: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(&self.cli_ok(&["node", "list", "-c", cluster, "--json"]))
                .expect("node json");
        v["nodes"].as_array().cloned().unwrap_or_default()
    }

    /// Submits a job file to `cluster`; returns the job's name.
    pub fn submit(&self, file: &Path, cluster: &str) -> String {
        submit_with(|args| self.cli_ok(args), file, cluster)
    }

    /// `drover job show NAME --json`, parsed.
    pub fn job(&self, name: &str) -> serde_json::Value {
        serde_json::from_str(&self.cli_ok(&["job", "show", name, "--json"])).expect("job json")
    }

    /// Waits until the job is in `state`, panicking with its details if not.
    pub fn wait_job_state(&self, name: &str, state: &str, timeout: Duration) {
        let ok = wait_until(timeout, || self.job(name)["state"] == state);
        assert!(
            ok,
            "job {name} never became {state}: {}\n{}",
            self.job(name),
            self.log_text()
        );
    }

    /// The server's `/metrics` text (plain HTTP/1.0 over a socket).
    pub fn metrics(&self) -> String {
        http_get(&format!("127.0.0.1:{}", self.port), "/metrics")
    }

    /// `drover down` (once); returns its stderr.
    pub fn down(&mut self) -> String {
        self.down = true;
        let out = self.drover(&[
            "down",
            "--data-dir",
            &self.data.path().display().to_string(),
        ]);
        assert!(
            out.status.success(),
            "drover down failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

impl Drop for LocalUp {
    fn drop(&mut self) {
        if !self.down {
            let _ = self.drover(&[
                "down",
                "--data-dir",
                &self.data.path().display().to_string(),
            ]);
        }
    }
}

/// The node image `drover up` builds from `agent`: `drover/node:` and the
/// first 16 hex digits of the binary's SHA-256.
pub fn node_image_for(agent: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(agent)
        .output()
        .expect("sha256sum runs");
    assert!(out.status.success(), "sha256sum {}", agent.display());
    let digest = String::from_utf8_lossy(&out.stdout);
    format!("drover/node:{}", &digest[..16])
}

/// Containers (any state) carrying `label=value`.
pub fn containers_labelled(label: &str, value: &str) -> Vec<String> {
    docker_ids(&["ps", "-a"], label, value)
}

/// Networks carrying `label=value`.
pub fn networks_labelled(label: &str, value: &str) -> Vec<String> {
    docker_ids(&["network", "ls"], label, value)
}

/// The ids `docker LIST -q --filter label=…` prints.
fn docker_ids(list: &[&str], label: &str, value: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(list)
        .args(["-q", "--filter", &format!("label={label}={value}")])
        .output()
        .expect("docker runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Seconds since the epoch, as f64 (benchmarks compare it with `date +%s.%N`
/// printed inside containers, from the same host clock).
pub fn epoch_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The median of `v` (sorted in place); NaN when empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Whether the local engine has `image`.
pub fn image_exists(image: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", image])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Fails, saying how to build it, unless the local engine has `image` (one
/// of `images/build-offline.sh`'s).
pub fn require_image(image: &str) {
    assert!(
        image_exists(image),
        "{image} is missing; build it with `images/build-offline.sh` (scripts/setup.sh does)"
    );
}

/// The `key=value` words of each line of `text` that contains `marker`,
/// one map per line, in order.
pub fn key_values(text: &str, marker: &str) -> Vec<std::collections::BTreeMap<String, String>> {
    text.lines()
        .filter(|l| l.contains(marker))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// `drover job create -f FILE -c CLUSTER --json` through `cli_ok`; the job's name.
fn submit_with(cli_ok: impl Fn(&[&str]) -> String, file: &Path, cluster: &str) -> String {
    let out = cli_ok(&[
        "job",
        "create",
        "-f",
        &file.display().to_string(),
        "-c",
        cluster,
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("job json");
    v["id"].as_str().expect("job id").to_string()
}
