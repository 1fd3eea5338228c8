//! The launch modes of the real binary: `drover-init launch-listen` on
//! 127.0.0.1 as node rank 1, `drover-init rsh` as Open MPI would run it, and
//! `drover-init --mpi`.

use std::borrow::BorrowMut;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use drover_init::launch;

const BIN: &str = env!("CARGO_BIN_EXE_drover-init");
const SECRET: &str = "00112233445566778899aabbccddeeff";
/// Node rank 1 is 127.0.0.1; rank 0 is an address nothing listens on.
const HOSTS: &str = "10.255.255.1,127.0.0.1";
/// How long any one step may take before the test fails instead of hanging.
const STEP: Duration = Duration::from_secs(8);

/// Environment the tests set themselves; whatever the harness has of it
/// must not leak in.
const CLEARED: &[&str] = &[
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "OMPI_ALLOW_RUN_AS_ROOT",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
    "DROVER_JOB_NAME",
    "DROVER_ATTEMPT",
    "DROVER_LAUNCH_PORT",
    "DROVER_LAUNCH_BIND",
    "DROVER_LAUNCH_SECRET_FILE",
    "DROVER_LAUNCH_CONNECT_TIMEOUT",
    "AZ_BATCH_HOST_LIST",
    "NODE_RANK",
];

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local addr").port()
}

fn clean(cmd: &mut Command) -> &mut Command {
    for name in CLEARED {
        cmd.env_remove(name);
    }
    cmd
}

/// A directory with the job's secret file, and a launch listener once
/// started.
struct Node {
    dir: tempfile::TempDir,
    port: u16,
    listener: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Node {
    fn new() -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).expect("write secret");
        Node {
            dir,
            port: free_port(),
            listener: None,
            log: Arc::new(Mutex::new(String::new())),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts `drover-init launch-listen --grace GRACE` without waiting.
    fn spawn_listener(&mut self, grace: u32) {
        let mut child = clean(&mut Command::new(BIN))
            .args(["launch-listen", "--grace", &grace.to_string()])
            .env("DROVER_JOB_NAME", "job")
            .env("DROVER_ATTEMPT", "1")
            .env("NODE_RANK", "1")
            .env("DROVER_LAUNCH_BIND", "127.0.0.1")
            .env("DROVER_LAUNCH_PORT", self.port.to_string())
            .env("DROVER_LAUNCH_SECRET_FILE", self.path("secret"))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the listener");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::clone(&self.log);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let mut log = log.lock().expect("log lock");
                log.push_str(&line);
                log.push('\n');
            }
        });
        self.listener = Some(child);
    }

    /// Starts the listener and waits until it listens.
    fn listen(grace: u32) -> Node {
        let mut node = Node::new();
        node.spawn_listener(grace);
        node.wait_log("drover-init: waiting for launches on 127.0.0.1:");
        node
    }

    fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Waits until the listener's stderr contains `needle`.
    fn wait_log(&self, needle: &str) -> String {
        self.wait_for(needle, |log| log.contains(needle))
    }

    /// Waits until the listener's stderr meets `done`: its lines reach
    /// the test a moment after the client saw their effect.
    fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + STEP;
        loop {
            let log = self.log();
            if done(&log) {
                return log;
            }
            assert!(
                Instant::now() < until,
                "listener never logged {what:?}; its log:\n{log}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `drover-init rsh ARGS...` as this job's node 0 would run it.
    fn rsh(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        clean(&mut cmd)
            .arg("rsh")
            .args(args)
            .env("AZ_BATCH_HOST_LIST", HOSTS)
            .env("DROVER_JOB_NAME", "job")
            .env("DROVER_ATTEMPT", "1")
            .env("DROVER_LAUNCH_PORT", self.port.to_string())
            .env("DROVER_LAUNCH_SECRET_FILE", self.path("secret"))
            .env("DROVER_LAUNCH_CONNECT_TIMEOUT", "5");
        cmd
    }

    fn listener_pid(&self) -> libc::pid_t {
        self.listener.as_ref().expect("a listener").id() as libc::pid_t
    }

    /// Waits for the listener to exit and returns its exit code.
    fn listener_exit(&mut self) -> Option<i32> {
        let child = self.listener.as_mut().expect("a listener");
        let until = Instant::now() + STEP;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.listener = None;
                return status.code();
            }
            assert!(Instant::now() < until, "listener did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // SIGTERM first, so that the listener stops what it started.
        if let Some(mut child) = self.listener.take() {
            signal(child.id() as libc::pid_t, libc::SIGTERM);
            let until = Instant::now() + Duration::from_secs(3);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: signals a child of this test.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Runs `cmd` with `input` on its stdin and returns its output, failing
/// the test if it takes longer than [`STEP`].
fn output(mut cmd: impl BorrowMut<Command>, input: &[u8]) -> Output {
    let mut child = cmd
        .borrow_mut()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start drover-init");
    let pid = child.id() as libc::pid_t;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let input = input.to_vec();
    thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(STEP) {
        Ok(out) => out.expect("wait for drover-init"),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("drover-init did not finish within {STEP:?}");
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits until the file at `path` holds a pid.
fn wait_pid_file(path: &Path) -> libc::pid_t {
    let until = Instant::now() + STEP;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(pid) = s.trim().parse()
        {
            return pid;
        }
        assert!(Instant::now() < until, "{} never got a pid", path.display());
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until process `pid` is gone (and reaped: a zombie is still in
/// /proc).
fn wait_gone(pid: libc::pid_t, within: Duration) {
    let until = Instant::now() + within;
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < until, "process {pid} still exists");
        thread::sleep(Duration::from_millis(20));
    }
}

fn seq(from: u32, to: u32) -> String {
    (from..=to).map(|i| format!("{i}\n")).collect()
}

#[test]
fn stdout_and_stderr_come_back_separately_and_intact() {
    let node = Node::listen(2);
    // ~5 MB of stdout from a background process while stderr is written,
    // so that the two streams' frames interleave on the connection.
    let out = output(
        node.rsh(&[
            "-x",
            "127.0.0.1",
            "(seq 1 700000 &);",
            "seq 1 100000 >&2;",
            "wait",
        ]),
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let want = seq(1, 700000);
    assert!(want.len() > 4_500_000);
    assert!(
        out.stdout == want.as_bytes(),
        "stdout differs ({} bytes)",
        out.stdout.len()
    );
    assert!(
        out.stderr == seq(1, 100000).as_bytes(),
        "stderr differs: {:?}",
        text(&out.stderr[..out.stderr.len().min(300)])
    );

    let log = node.wait_log("ended: exit code 0");
    assert!(log.contains("accepted launch from 127.0.0.1:"), "{log}");
    assert!(
        log.contains("(seq 1 700000 &); seq 1 100000 >&2; wait"),
        "{log}"
    );
}

#[test]
fn stdin_passes_through() {
    let node = Node::listen(2);
    let input: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let out = output(node.rsh(&["127.0.0.1", "cat"]), &input);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout == input,
        "cat returned {} bytes",
        out.stdout.len()
    );

    let out = output(node.rsh(&["127.0.0.1", "wc", "-c"]), &input[..300_000]);
    assert_eq!(text(&out.stdout).trim(), "300000");
    // -n: no stdin, as ssh -n.
    let out = output(node.rsh(&["-n", "127.0.0.1", "wc", "-c"]), b"ignored");
    assert_eq!(text(&out.stdout).trim(), "0");
}

#[test]
fn the_remote_exit_code_is_the_clients() {
    let node = Node::listen(2);
    for (command, code) in [
        ("exit 7", 7),
        ("kill -INT $$", 130),
        ("kill -TERM $$", 143),
        ("true", 0),
    ] {
        let out = output(node.rsh(&["root@127.0.0.1", command]), b"");
        assert_eq!(
            out.status.code(),
            Some(code),
            "{command}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn sessions_run_as_the_listener_with_mpi_allowed_as_root() {
    let node = Node::listen(2);
    let out = output(
        node.rsh(&[
            "127.0.0.1",
            "echo \"$(pwd -P) ${OMPI_ALLOW_RUN_AS_ROOT-unset} ${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM-unset} $NODE_RANK\"",
        ]),
        b"",
    );
    let allowed = if is_root() { "1 1" } else { "unset unset" };
    let cwd = node.dir.path().canonicalize().expect("canonical temp dir");
    assert_eq!(
        text(&out.stdout),
        format!("{} {allowed} 1\n", cwd.display())
    );
}

#[test]
fn many_sessions_run_at_once() {
    let node = Node::listen(2);
    let started = Instant::now();
    let clients: Vec<_> = (0..8)
        .map(|i| {
            let mut cmd = node.rsh(&["127.0.0.1", &format!("sleep 1; echo {i}")]);
            thread::spawn(move || output(&mut cmd, b""))
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let out = c.join().expect("client thread");
        assert_eq!(text(&out.stdout), format!("{i}\n"));
    }
    // One at a time would take 8 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn refusals_are_reported_and_logged() {
    let node = Node::listen(2);
    std::fs::write(node.path("other-secret"), "ffeeddcc").expect("write secret");
    let other_secret = node.path("other-secret");
    let other_secret = other_secret.to_str().expect("a UTF-8 temp path");
    let cases: [(&str, &[(&str, &str)]); 5] = [
        ("bad secret", &[("DROVER_LAUNCH_SECRET_FILE", other_secret)]),
        ("wrong job", &[("DROVER_JOB_NAME", "other")]),
        ("wrong job", &[("DROVER_ATTEMPT", "2")]),
        // 127.0.0.1 as node rank 0: the listener is rank 1.
        (
            "wrong node",
            &[("AZ_BATCH_HOST_LIST", "127.0.0.1,10.255.255.1")],
        ),
        // A wrong node is told before a wrong secret.
        (
            "wrong node",
            &[
                ("AZ_BATCH_HOST_LIST", "127.0.0.1"),
                ("DROVER_LAUNCH_SECRET_FILE", other_secret),
            ],
        ),
    ];
    for (i, (reason, env)) in cases.iter().enumerate() {
        let marker = node.path(&format!("ran-{i}"));
        let mut cmd = node.rsh(&["127.0.0.1", &format!("touch {}", marker.display())]);
        cmd.envs(env.iter().copied());
        let out = output(&mut cmd, b"");
        assert_eq!(out.status.code(), Some(255), "{reason}");
        assert_eq!(
            text(&out.stderr),
            format!("drover-init: launch on 127.0.0.1 refused: {reason}\n")
        );
        assert!(!marker.exists(), "{reason}: the command ran");
    }
    let log = node.wait_for("5 refusals", |log| {
        log.matches("refused launch from 127.0.0.1:").count() == 5
    });
    for reason in ["bad secret", "wrong job", "wrong node"] {
        assert!(log.contains(&format!(": {reason}\n")), "{log}");
    }
    assert!(!log.contains("accepted"), "{log}");
}

#[test]
fn a_host_that_is_not_a_node_is_refused_at_once() {
    let node = Node::new();
    let out = output(node.rsh(&["10.9.9.9", "true"]), b"");
    assert_eq!(out.status.code(), Some(255));
    assert_eq!(
        text(&out.stderr),
        format!("drover-init: 10.9.9.9 is not a node of this job (AZ_BATCH_HOST_LIST={HOSTS})\n")
    );
}

#[test]
fn the_client_waits_for_the_listener_and_gives_up_in_time() {
    let mut node = Node::new();
    let mut cmd = node.rsh(&["127.0.0.1", "echo late"]);
    let client = thread::spawn(move || output(&mut cmd, b""));
    thread::sleep(Duration::from_millis(1200));
    node.spawn_listener(2);
    let out = client.join().expect("client thread");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "late\n");

    // Nobody listens: 255 after the connect timeout, naming host and port.
    let lonely = Node::new();
    let started = Instant::now();
    let out = output(
        lonely
            .rsh(&["127.0.0.1", "true"])
            .env("DROVER_LAUNCH_CONNECT_TIMEOUT", "1"),
        b"",
    );
    assert_eq!(out.status.code(), Some(255));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("127.0.0.1:{}", lonely.port)), "{err}");
    assert!(err.contains("within 1 s"), "{err}");
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn killing_the_client_kills_the_remote_process() {
    let node = Node::listen(2);
    let pid_file = node.path("pid");
    let mut client = node
        .rsh(&[
            "127.0.0.1",
            &format!("echo $$ > {}; exec sleep 300", pid_file.display()),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the client");
    let remote = wait_pid_file(&pid_file);
    assert!(Path::new(&format!("/proc/{remote}")).exists());
    client.kill().expect("SIGKILL the client");
    let _ = client.wait();
    wait_gone(remote, Duration::from_secs(4));
    let log = node.wait_log("ended: exit code 143");
    assert!(log.contains("SIGTERM to its process group"), "{log}");
}

#[test]
fn signals_to_the_client_reach_the_remote_process() {
    let node = Node::listen(2);
    let ready = node.path("ready");
    let mut cmd = node.rsh(&[
        "127.0.0.1",
        &format!(
            "trap 'echo got TERM; exit 3' TERM; touch {}; while :; do sleep 0.1; done",
            ready.display()
        ),
    ]);
    let mut client = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // The remote shell says "Terminated" for its sleep.
        .stderr(Stdio::null())
        .spawn()
        .expect("start the client");
    let until = Instant::now() + STEP;
    while !ready.exists() {
        assert!(Instant::now() < until, "the remote command never started");
        thread::sleep(Duration::from_millis(20));
    }
    signal(client.id() as libc::pid_t, libc::SIGTERM);
    let mut out = String::new();
    client
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    let status = client.wait().expect("wait for the client");
    assert_eq!(status.code(), Some(3));
    assert_eq!(out, "got TERM\n");
}

#[test]
fn sigterm_stops_the_listener_and_its_sessions() {
    let mut node = Node::listen(1);
    let pid_file = node.path("pid");
    let mut cmd = node.rsh(&[
        "127.0.0.1",
        &format!("echo $$ > {}; exec sleep 300", pid_file.display()),
    ]);
    let client = thread::spawn(move || output(&mut cmd, b""));
    // A session that ignores SIGTERM gets SIGKILL after the grace.
    let stubborn_file = node.path("stubborn");
    let mut cmd = node.rsh(&[
        "127.0.0.1",
        &format!(
            "trap '' TERM; echo $$ > {}; exec sleep 300",
            stubborn_file.display()
        ),
    ]);
    let stubborn_client = thread::spawn(move || output(&mut cmd, b""));
    let remote = wait_pid_file(&pid_file);
    let stubborn = wait_pid_file(&stubborn_file);

    let started = Instant::now();
    signal(node.listener_pid(), libc::SIGTERM);
    assert_eq!(node.listener_exit(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    wait_gone(remote, Duration::from_secs(1));
    wait_gone(stubborn, Duration::from_secs(1));
    assert_eq!(client.join().expect("client").status.code(), Some(143));
    assert_eq!(
        stubborn_client.join().expect("client").status.code(),
        Some(137)
    );
    let log = node.wait_log("SIGKILL to 1 session(s)");
    assert!(
        log.contains("SIGTERM: stopping; SIGTERM to 2 session(s)"),
        "{log}"
    );
    assert!(log.contains("SIGKILL to 1 session(s)"), "{log}");
}

#[test]
fn the_listener_needs_its_configuration() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("secret"), "not hex").expect("write");
    let base = |cmd: &mut Command| {
        clean(cmd)
            .arg("launch-listen")
            .env("DROVER_JOB_NAME", "job")
            .env("DROVER_ATTEMPT", "1")
            .env("NODE_RANK", "1")
            .env("DROVER_LAUNCH_BIND", "127.0.0.1")
            .env("DROVER_LAUNCH_PORT", free_port().to_string());
    };
    let mut cmd = Command::new(BIN);
    base(&mut cmd);
    let out = output(&mut cmd, b"");
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("DROVER_LAUNCH_SECRET_FILE is not set"));

    let mut cmd = Command::new(BIN);
    base(&mut cmd);
    let out = output(
        cmd.env("DROVER_LAUNCH_SECRET_FILE", dir.path().join("secret")),
        b"",
    );
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("does not hold a hex string"));

    let mut cmd = Command::new(BIN);
    base(&mut cmd);
    let out = output(
        cmd.env("DROVER_LAUNCH_SECRET_FILE", dir.path().join("missing"))
            .env_remove("NODE_RANK"),
        b"",
    );
    assert_eq!(out.status.code(), Some(127));
    assert!(text(&out.stderr).contains("NODE_RANK is not set"));
}

/// Speaks the protocol by hand: what a client that is not drover-init
/// (or a broken one) meets.
#[test]
fn the_protocol_by_hand() {
    let node = Node::listen(1);
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", node.port)).expect("connect");
        s.set_read_timeout(Some(STEP)).expect("timeout");
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let greeting = launch::read_line(&mut r, launch::MAX_HEADER).expect("greeting");
        let nonce = launch::parse_greeting(&greeting).expect("a greeting of version 1");
        (s, r, nonce)
    };

    // Garbage, and a header line past its limit.
    for request in [b"HELLO\n".to_vec(), vec![b'L'; 600]] {
        let (mut s, mut r, _) = connect();
        s.write_all(&request).expect("send");
        let answer = launch::read_line(&mut r, launch::MAX_HEADER).expect("answer");
        assert_eq!(answer, b"DENY bad request");
    }

    // A proper request: the exit frame comes after all the output.
    let who = launch::Identity {
        job: "job".into(),
        attempt: "1".into(),
        node_rank: 1,
    };
    let send_request = |s: &mut TcpStream, nonce: &str, command: &str| {
        let request = launch::Request {
            mac: launch::launch_mac(SECRET.as_bytes(), nonce, &who, command.as_bytes()),
            who: who.clone(),
            command_len: command.len(),
        };
        s.write_all(request.line().as_bytes()).expect("send");
        s.write_all(command.as_bytes()).expect("send");
    };
    let (mut s, mut r, nonce) = connect();
    send_request(&mut s, &nonce, "echo out; echo err >&2; exit 5");
    assert_eq!(launch::read_line(&mut r, 100).expect("answer"), b"OK");
    let mut frames = Vec::new();
    let mut payload = Vec::new();
    while let Some(kind) = launch::read_frame(&mut r, &mut payload).expect("frame") {
        frames.push((kind, payload.clone()));
        if kind == launch::EXIT {
            break;
        }
    }
    let (stdout, stderr): (Vec<_>, Vec<_>) = frames[..frames.len() - 1]
        .iter()
        .partition(|(k, _)| *k == launch::STDOUT);
    assert_eq!(
        stdout
            .iter()
            .flat_map(|(_, p)| p.clone())
            .collect::<Vec<u8>>(),
        b"out\n"
    );
    assert_eq!(
        stderr
            .iter()
            .flat_map(|(_, p)| p.clone())
            .collect::<Vec<u8>>(),
        b"err\n"
    );
    assert!(stderr.iter().all(|(k, _)| *k == launch::STDERR));
    assert_eq!(
        frames.last(),
        Some(&(launch::EXIT, 5u32.to_be_bytes().to_vec()))
    );

    // A replayed request (another connection's nonce) is refused.
    let (mut s2, mut r2, _) = connect();
    send_request(&mut s2, &nonce, "echo replayed");
    assert_eq!(
        launch::read_line(&mut r2, 100).expect("answer"),
        b"DENY bad secret"
    );

    // A frame past the limit closes the connection and stops the process.
    let pid_file = node.path("pid");
    let (mut s, mut r, nonce) = connect();
    send_request(
        &mut s,
        &nonce,
        &format!("echo $$ > {}; exec sleep 300", pid_file.display()),
    );
    assert_eq!(launch::read_line(&mut r, 100).expect("answer"), b"OK");
    let remote = wait_pid_file(&pid_file);
    let mut head = vec![launch::STDIN];
    head.extend_from_slice(&(launch::MAX_FRAME as u32 + 1).to_be_bytes());
    s.write_all(&head).expect("send");
    wait_gone(remote, Duration::from_secs(4));
    let log = node.wait_log("frame too long before it exited");
    assert!(log.contains("refused launch from 127.0.0.1:"), "{log}");
}

#[test]
fn mpi_mode_runs_mpirun_once_without_ranks() {
    let probe = "echo \"${RANK-unset} ${LOCAL_RANK-unset} ${LOCAL_WORLD_SIZE-unset} ${WORLD_SIZE-unset} ${NODE_RANK-unset} ${OMPI_ALLOW_RUN_AS_ROOT-unset} ${OMPI_ALLOW_RUN_AS_ROOT_CONFIRM-unset}\"";
    let out = output(
        clean(&mut Command::new(BIN))
            .args(["--mpi", "--grace", "1", "--", probe])
            .env("WORLD_SIZE", "16"),
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let allowed = if is_root() { "1 1" } else { "unset unset" };
    assert_eq!(
        text(&out.stdout),
        format!("unset unset unset 16 unset {allowed}\n")
    );

    // What the environment says is kept.
    let out = output(
        clean(&mut Command::new(BIN))
            .args(["--mpi", "--procs", "1", "--", probe])
            .env("OMPI_ALLOW_RUN_AS_ROOT", "0"),
        b"",
    );
    let confirm = if is_root() { "1" } else { "unset" };
    assert_eq!(
        text(&out.stdout),
        format!("unset unset unset unset unset 0 {confirm}\n")
    );

    // The normal mode still numbers its ranks and leaves Open MPI alone.
    let out = output(clean(&mut Command::new(BIN)).args(["--", probe]), b"");
    assert_eq!(text(&out.stdout), "0 0 1 1 0 unset unset\n");

    let out = output(
        clean(&mut Command::new(BIN)).args(["--mpi", "--procs", "2", "--", "true"]),
        b"",
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--procs must be 1"));
}

#[test]
fn each_local_rank_gets_its_own_tensorflow_task() {
    let out = output(
        clean(&mut Command::new(BIN))
            .args(["--procs", "2", "--", "echo \"$LOCAL_RANK:$TF_CONFIG\""])
            .env("DROVER_TF_CONFIG_0", "{\"task\":0}")
            .env("DROVER_TF_CONFIG_1", "{\"task\":1}"),
        b"",
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for want in ["0:{\"task\":0}", "1:{\"task\":1}"] {
        assert!(stdout.contains(want), "{stdout}");
    }
}
