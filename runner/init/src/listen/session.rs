//! One connection of the launch listener: the handshake, then the
//! process it starts, its stdio as frames, and the hang-up when the client
//! goes first.

use std::ffi::OsStr;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use drover_init::launch::{self, Refusal, Reply, Request};

use super::{Proc, Shared};
use crate::sys::{self, say};

/// The signals a client may send to its process group: those a user or
/// `mpirun` means for the job. Others (SIGSTOP, SIGSEGV…) are ignored.
const HONOURED: &[libc::c_int] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGKILL,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// How many stdin frames wait for a process that does not read its stdin
/// before the client's frames stop being read (so at most 4 MiB per
/// session, and signal frames behind them still get through until then).
const STDIN_QUEUE: usize = 64;

/// How long a session waits, after its exit frame, for the client to close
/// the connection (closing first could reset it and lose the frame).
const LINGER: Duration = Duration::from_secs(5);

/// A connection's read side that gives up at a deadline, however slowly
/// the peer trickles its bytes.
struct Conn {
    stream: TcpStream,
    until: Option<Instant>,
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(until) = self.until {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

/// How a handshake failed.
enum Failed {
    /// Refused, with the reason the client is told.
    Refused(String),
    /// The connection broke or timed out: nobody to tell.
    Dropped(String),
}

impl From<Refusal> for Failed {
    fn from(r: Refusal) -> Failed {
        Failed::Refused(r.as_str().to_string())
    }
}

/// 16 random bytes in hex, from the kernel.
fn nonce() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    let mut got = 0;
    while got < bytes.len() {
        // SAFETY: writes at most the rest of a buffer we own.
        let n = unsafe { libc::getrandom(bytes[got..].as_mut_ptr().cast(), bytes.len() - got, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            got += n as usize;
        }
    }
    Ok(launch::hex(&bytes))
}

/// Greets, reads and judges the request; returns the command and the read
/// side of the connection (frames may already be in its buffer).
fn handshake(shared: &Shared, stream: &TcpStream) -> Result<(Vec<u8>, BufReader<Conn>), Failed> {
    let dropped = |what: &str, e: io::Error| Failed::Dropped(format!("{what}: {e}"));
    let until = Instant::now() + launch::HANDSHAKE_TIMEOUT;
    stream
        .set_write_timeout(Some(launch::HANDSHAKE_TIMEOUT))
        .map_err(|e| dropped("cannot set a timeout", e))?;
    let nonce = nonce().map_err(|e| dropped("no random bytes for a nonce", e))?;
    let mut w = stream;
    w.write_all(launch::greeting(&nonce).as_bytes())
        .map_err(|e| dropped("cannot greet", e))?;
    let read = stream
        .try_clone()
        .map_err(|e| dropped("cannot clone the connection", e))?;
    let mut reader = BufReader::new(Conn {
        stream: read,
        until: Some(until),
    });
    let incomplete = |e: io::Error| match e.kind() {
        io::ErrorKind::InvalidData => Failed::from(Refusal::BadRequest),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Failed::Dropped(format!(
            "handshake not finished within {} s",
            launch::HANDSHAKE_TIMEOUT.as_secs()
        )),
        _ => dropped("connection closed during the handshake", e),
    };
    let line = launch::read_line(&mut reader, launch::MAX_HEADER).map_err(incomplete)?;
    let request = Request::parse(&line)?;
    let mut command = vec![0; request.command_len];
    reader.read_exact(&mut command).map_err(incomplete)?;
    request.check(&command, &shared.me, &shared.key, &nonce)?;
    reader.get_mut().until = None;
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(|e| dropped("cannot clear a timeout", e))?;
    Ok((command, reader))
}

/// Tells the client why it is refused and closes gently: request bytes
/// left unread at close would reset the connection, and the reset could
/// overtake the answer.
fn deny(stream: &TcpStream, reason: String) {
    let mut w = stream;
    if w.write_all(Reply::Deny(reason).line().as_bytes()).is_err() {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    // Until the client closes (it does on reading the answer), for a
    // bounded time and number of bytes.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut r = stream;
    let mut sink = [0u8; 8192];
    let mut left = 2 * launch::MAX_COMMAND;
    while left > 0 {
        match r.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

/// Counts a session as in its handshake until dropped.
struct HandshakeSlot<'a>(&'a Shared);

impl Drop for HandshakeSlot<'_> {
    fn drop(&mut self) {
        self.0.handshakes.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One connection, from greeting to exit frame.
pub(super) fn session(shared: &Arc<Shared>, stream: TcpStream, peer: SocketAddr) {
    let slot = HandshakeSlot(shared);
    let (command, reader) = match handshake(shared, &stream) {
        Ok(ok) => ok,
        Err(Failed::Refused(reason)) => {
            say(&format!("refused launch from {peer}: {reason}"));
            deny(&stream, reason);
            return;
        }
        Err(Failed::Dropped(why)) => {
            say(&format!("dropped connection from {peer}: {why}"));
            return;
        }
    };
    drop(slot);
    sys::keepalive(&stream);

    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(OsStr::from_bytes(&command))
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    sys::allow_mpi_as_root(&mut cmd);
    sys::unblock_signals_in_child(&mut cmd);
    let spawned = {
        // Held across the fork: see `reap`.
        let mut table = shared.lock();
        if table.stopping {
            Err("the listener is stopping".to_string())
        } else {
            match cmd.spawn() {
                Ok(child) => {
                    let p = Proc {
                        id: table.next_id,
                        pid: child.id() as libc::pid_t,
                    };
                    table.next_id += 1;
                    table.running.insert(p.pid, p.id);
                    table.active += 1;
                    Ok((p, child))
                }
                Err(e) => Err(format!("cannot start /bin/sh: {e}")),
            }
        }
    };
    let (p, mut child) = match spawned {
        Ok(ok) => ok,
        Err(reason) => {
            say(&format!("refused launch from {peer}: {reason}"));
            deny(&stream, reason);
            return;
        }
    };
    let shown: String = String::from_utf8_lossy(&command)
        .chars()
        .take(200)
        .collect();
    say(&format!(
        "accepted launch from {peer} (pid {}): {}",
        p.pid,
        shown.escape_debug()
    ));
    let (stdin, stdout, stderr) = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    // The child is never waited for here: the main thread reaps it.
    drop(child);

    let code = serve(shared, &stream, reader, p, stdin, stdout, stderr);
    say(&format!(
        "launch from {peer} (pid {}) ended: exit code {code}",
        p.pid
    ));
}

/// Carries a started session: OK, then frames until the exit frame.
/// Returns the exit code.
fn serve(
    shared: &Arc<Shared>,
    stream: &TcpStream,
    reader: BufReader<Conn>,
    p: Proc,
    stdin: Option<ChildStdin>,
    stdout: Option<impl Read + Send + 'static>,
    stderr: Option<impl Read + Send + 'static>,
) -> i32 {
    let pid = p.pid;
    let writer = match stream.try_clone() {
        Ok(w) => Arc::new(Mutex::new(w)),
        Err(e) => {
            say(&format!("pid {pid}: cannot clone the connection: {e}"));
            signal_proc(shared, p, libc::SIGKILL);
            return finish(shared, p);
        }
    };
    let connected = lock(&writer).write_all(Reply::Ok.line().as_bytes()).is_ok();
    let mut helpers_ok = connected;

    let (stdin_tx, stdin_rx) = mpsc::sync_channel::<Vec<u8>>(STDIN_QUEUE);
    // Told when the client's frames have ended (it closed the connection).
    let (done_tx, done_rx) = mpsc::channel::<()>();
    if let Some(stdin) = stdin {
        helpers_ok &= thread::Builder::new()
            .name(format!("stdin {pid}"))
            .spawn(move || feed_stdin(stdin, stdin_rx))
            .is_ok();
    }
    if connected {
        let shared = Arc::clone(shared);
        helpers_ok &= thread::Builder::new()
            .name(format!("frames {pid}"))
            .spawn(move || {
                read_frames(&shared, reader, stdin_tx, p);
                let _ = done_tx.send(());
            })
            .is_ok();
    } else {
        drop(done_tx);
    }
    let err_pump = stderr.and_then(|err| {
        let w = Arc::clone(&writer);
        let started = thread::Builder::new()
            .name(format!("stderr {pid}"))
            .spawn(move || pump(err, launch::STDERR, &w));
        helpers_ok &= started.is_ok();
        started.ok()
    });
    if !helpers_ok {
        // Without its connection or its helpers the session cannot be
        // served: stop its process rather than leave it unattended.
        say(&format!(
            "pid {pid}: session broken at its start; SIGKILL to its process group"
        ));
        signal_proc(shared, p, libc::SIGKILL);
    }
    if let Some(out) = stdout {
        pump(out, launch::STDOUT, &writer);
    }
    if let Some(t) = err_pump {
        let _ = t.join();
    }
    let code = wait_exit(shared, p);
    let _ = launch::write_frame(
        &mut *lock(&writer),
        launch::EXIT,
        &(code as u32).to_be_bytes(),
    );
    let _ = stream.shutdown(Shutdown::Write);
    finish(shared, p);
    // Let the client read the exit frame and close first; then close
    // whatever it left.
    let _ = done_rx.recv_timeout(LINGER);
    let _ = stream.shutdown(Shutdown::Both);
    code
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked while writing a frame leaves the stream as
    // usable as a failed write does.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Sends `sig` to `p`'s process group if `p` still runs (checked under the
/// lock: once reaped, its pid may be another process's).
fn signal_proc(shared: &Shared, p: Proc, sig: libc::c_int) {
    let table = shared.lock();
    if table.is_running(p) {
        sys::kill_group(p.pid, sig);
    }
}

/// Waits for the main thread to reap `p` and returns its exit code.
fn wait_exit(shared: &Shared, p: Proc) -> i32 {
    let mut table = shared.lock();
    loop {
        if let Some(code) = table.exited.get(&p.id) {
            return *code;
        }
        table = shared
            .changed
            .wait(table)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// Ends `p`'s session in the table (once reaped) and returns the exit code.
fn finish(shared: &Shared, p: Proc) -> i32 {
    let code = wait_exit(shared, p);
    let mut table = shared.lock();
    table.exited.remove(&p.id);
    table.active -= 1;
    code
}

/// Copies queued stdin frames to the process; the queue's end (stdin EOF,
/// or the connection's) closes the process's stdin.
fn feed_stdin(mut stdin: ChildStdin, queue: mpsc::Receiver<Vec<u8>>) {
    for data in queue {
        if stdin.write_all(&data).is_err() {
            // The process closed its stdin: the rest has no reader.
            return;
        }
    }
}

/// Forwards one of the process's output pipes as frames of `kind`, to its
/// end. Once the connection fails the output is read and dropped, so that
/// the process never blocks on a full pipe while it is being stopped.
fn pump(mut from: impl Read, kind: u8, writer: &Mutex<TcpStream>) {
    let mut buf = vec![0u8; launch::MAX_FRAME];
    let mut connected = true;
    loop {
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if connected {
                    connected = launch::write_frame(&mut *lock(writer), kind, &buf[..n]).is_ok();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Reads the client's frames until the connection ends, then hangs up on
/// the process if it still runs.
fn read_frames(
    shared: &Shared,
    mut reader: BufReader<Conn>,
    stdin: mpsc::SyncSender<Vec<u8>>,
    p: Proc,
) {
    let mut stdin = Some(stdin);
    let mut payload = Vec::new();
    let ended = loop {
        match launch::read_frame(&mut reader, &mut payload) {
            Ok(Some(launch::STDIN)) => {
                if let Some(q) = &stdin {
                    // A closed queue: the process closed its stdin.
                    let _ = q.send(std::mem::take(&mut payload));
                }
            }
            // Dropping the queue's sender closes the process's stdin.
            Ok(Some(launch::STDIN_EOF)) => stdin = None,
            Ok(Some(launch::SIGNAL)) => match launch::frame_u32(&payload) {
                Some(sig) => {
                    let sig = sig as libc::c_int;
                    if HONOURED.contains(&sig) {
                        signal_proc(shared, p, sig);
                    }
                }
                None => break "a signal frame without a 4-byte signal".to_string(),
            },
            Ok(Some(other)) => break format!("unknown frame type {other:#04x}"),
            Ok(None) => break "connection closed".to_string(),
            Err(e) => break format!("connection broke: {e}"),
        }
    };
    drop(stdin);
    // A protocol error ends the connection too.
    let _ = reader.get_ref().stream.shutdown(Shutdown::Both);
    hang_up(shared, p, &ended);
}

/// What sshd does when its client is gone: the session's process group
/// gets SIGTERM, and SIGKILL if it still runs after the grace period.
fn hang_up(shared: &Shared, p: Proc, why: &str) {
    let mut table = shared.lock();
    if !table.is_running(p) {
        return;
    }
    say(&format!(
        "pid {}: {why} before it exited; SIGTERM to its process group",
        p.pid
    ));
    sys::kill_group(p.pid, libc::SIGTERM);
    let until = Instant::now() + shared.grace;
    while table.is_running(p) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            say(&format!(
                "pid {}: still running {} s after SIGTERM; SIGKILL to its process group",
                p.pid,
                shared.grace.as_secs()
            ));
            sys::kill_group(p.pid, libc::SIGKILL);
            return;
        }
        table = shared
            .changed
            .wait_timeout(table, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}
