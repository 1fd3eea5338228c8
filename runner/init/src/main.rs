//! `drover-init`: PID 1 of every Drover job container.
//!
//! ```text
//! drover-init [--procs N] [--grace SECONDS] -- COMMAND
//! ```
//!
//! Starts `N` copies of `/bin/sh -c COMMAND` (the local ranks), each in its
//! own process group with `RANK`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE` and
//! `WORLD_SIZE` set, then:
//!
//! * reaps every child, including orphans re-parented to PID 1 — without this
//!   a container accumulates zombies (the reason `tini` exists);
//! * forwards the signals it receives to every rank's process group — PID 1
//!   gets no default signal handling from the kernel, so without forwarding
//!   `docker stop` would always end in SIGKILL after the grace period;
//! * when one rank fails, stops the others (SIGTERM, then SIGKILL after
//!   `--grace` seconds) and exits with the failed rank's code, so a
//!   distributed job never hangs waiting for a dead peer;
//! * with more than one rank, gives each rank its own stdout and stderr
//!   pipes and forwards their output line by line, each line marked with
//!   the rank's `RANK` (the protocol is this crate's library,
//!   [`drover_init`]), so the agent can tell which process said what. A
//!   rank's output is forwarded in full before its exit is reported. A
//!   single rank keeps the container's stdout and stderr: nothing to tell
//!   apart, nothing to copy.
//!
//! It is linked statically so it runs in any image, and uses only libc.

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_init::{Lines, write_marker};

/// Signals forwarded to the ranks.
const FORWARDED: &[libc::c_int] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

struct Args {
    procs: u32,
    grace: Duration,
    command: String,
}

fn usage(msg: &str) -> ! {
    eprintln!("drover-init: {msg}");
    eprintln!("usage: drover-init [--procs N] [--grace SECONDS] -- COMMAND");
    std::process::exit(2);
}

fn parse_args() -> Args {
    let mut procs = 1u32;
    let mut grace = Duration::from_secs(10);
    let mut args = std::env::args().skip(1);
    let mut command = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--procs" => {
                procs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n >= 1)
                    .unwrap_or_else(|| usage("--procs expects a positive integer"));
            }
            "--grace" => {
                grace = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .map(Duration::from_secs)
                    .unwrap_or_else(|| usage("--grace expects seconds"));
            }
            "--" => {
                let rest: Vec<String> = args.by_ref().collect();
                if rest.is_empty() {
                    usage("missing command after --");
                }
                command = Some(rest.join(" "));
            }
            "--version" => {
                println!("drover-init {}", env!("CARGO_PKG_VERSION"));
                std::process::exit(0);
            }
            other => usage(&format!("unknown argument {other}")),
        }
    }
    Args {
        procs,
        grace,
        command: command.unwrap_or_else(|| usage("missing command")),
    }
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

struct Rank {
    pid: libc::pid_t,
    rank: u32,
    alive: bool,
}

/// Exit code a shell would report for a wait status.
fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

fn say(msg: &str) {
    let _ = writeln!(std::io::stderr(), "drover-init: {msg}");
}

fn signal_ranks(ranks: &[Rank], sig: libc::c_int) {
    for r in ranks.iter().filter(|r| r.alive) {
        // SAFETY: kill(2) on a process group we created; failure (already
        // gone) is harmless.
        unsafe {
            libc::kill(-r.pid, sig);
        }
    }
}

/// Where a forwarded line goes.
#[derive(Clone, Copy)]
enum Out {
    Stdout,
    Stderr,
}

/// One output pipe of one rank, read without blocking.
struct Stream {
    fd: OwnedFd,
    rank: u32,
    out: Out,
    lines: Lines,
    /// False once the write end is closed everywhere (end of file).
    open: bool,
}

/// The most bytes one pass reads from a pipe: enough to empty a full pipe
/// buffer many times over, bounded so that a background process writing
/// without end cannot keep drover-init from its signals and children.
const DRAIN_LIMIT: usize = 4 * 1024 * 1024;

impl Stream {
    fn new(fd: OwnedFd, rank: u32, out: Out) -> Stream {
        // SAFETY: fcntl on a descriptor we own; failure leaves it blocking,
        // which poll still guards.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Stream {
            fd,
            rank,
            out,
            lines: Lines::default(),
            open: true,
        }
    }

    /// Forwards what the pipe holds now (up to [`DRAIN_LIMIT`]); at end of
    /// file also an unterminated last line.
    fn drain(&mut self, buf: &mut [u8], line: &mut Vec<u8>) {
        let mut read = 0;
        while self.open && read < DRAIN_LIMIT {
            // SAFETY: reads into a buffer we own, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                n if n > 0 => {
                    let data = &buf[..n as usize];
                    read += data.len();
                    let (rank, out) = (self.rank, self.out);
                    self.lines.push(data, &mut |l| forward(rank, out, l, line));
                }
                0 => {
                    self.open = false;
                    let (rank, out) = (self.rank, self.out);
                    self.lines.finish(&mut |l| forward(rank, out, l, line));
                }
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        // EAGAIN: empty for now.
                        return;
                    }
                }
            }
        }
    }
}

/// Writes one marked line to drover-init's own stdout or stderr, in one
/// write so that lines of different ranks never interleave. A write that
/// fails (nobody reads the container's output) drops the line: the ranks
/// must not stop for it.
fn forward(rank: u32, out: Out, text: &[u8], line: &mut Vec<u8>) {
    line.clear();
    write_marker(rank, line);
    line.extend_from_slice(text);
    line.push(b'\n');
    let _ = match out {
        Out::Stdout => std::io::stdout().lock().write_all(line),
        Out::Stderr => std::io::stderr().lock().write_all(line),
    };
}

fn main() {
    let args = parse_args();
    let node_rank = env_u32("NODE_RANK", 0);
    let world_size = env_u32("WORLD_SIZE", args.procs);
    // One rank has nothing to tell apart: it writes to the container itself.
    let marked = args.procs > 1;

    let mut handled: Vec<libc::c_int> = FORWARDED.to_vec();
    handled.push(libc::SIGCHLD);
    let set = signal_set(&handled);
    // Block the signals we wait for, so they queue for the signalfd instead
    // of running default actions; children get an empty mask back in
    // pre_exec.
    // SAFETY: changes this process's signal mask only, then opens a
    // descriptor that reads the blocked signals.
    let signals = unsafe {
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC)
    };
    if signals < 0 {
        say(&format!(
            "cannot read signals: {}",
            std::io::Error::last_os_error()
        ));
        std::process::exit(127);
    }

    let mut ranks = Vec::with_capacity(args.procs as usize);
    let mut streams: Vec<Stream> = Vec::new();
    for local in 0..args.procs {
        let rank = node_rank * args.procs + local;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(&args.command)
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("LOCAL_WORLD_SIZE", args.procs.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("NODE_RANK", node_rank.to_string())
            .process_group(0);
        if marked {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(mut child) => {
                if let Some(out) = child.stdout.take() {
                    streams.push(Stream::new(out.into(), rank, Out::Stdout));
                }
                if let Some(err) = child.stderr.take() {
                    streams.push(Stream::new(err.into(), rank, Out::Stderr));
                }
                ranks.push(Rank {
                    pid: child.id() as libc::pid_t,
                    rank,
                    alive: true,
                });
            }
            Err(e) => {
                say(&format!("cannot start rank {rank}: {e}"));
                signal_ranks(&ranks, libc::SIGKILL);
                std::process::exit(127);
            }
        }
    }

    let mut buf = vec![0u8; 64 * 1024];
    let mut line = Vec::with_capacity(drover_init::MAX_PIECE + 32);
    let mut result: Option<i32> = None;
    let mut kill_at: Option<Instant> = None;
    let mut polled: Vec<libc::pollfd> = Vec::new();
    while ranks.iter().any(|r| r.alive) {
        // Wake at least once a second so a lost SIGCHLD can never hang us.
        let wait = kill_at
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        polled.clear();
        polled.push(libc::pollfd {
            fd: signals,
            events: libc::POLLIN,
            revents: 0,
        });
        polled.extend(streams.iter().filter(|s| s.open).map(|s| libc::pollfd {
            fd: s.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }));
        // SAFETY: polls descriptors we own, listed in a vector we own.
        unsafe {
            libc::poll(
                polled.as_mut_ptr(),
                polled.len() as libc::nfds_t,
                wait.as_millis().max(1) as libc::c_int,
            );
        }
        for p in &polled[1..] {
            if p.revents != 0
                && let Some(s) = streams.iter_mut().find(|s| s.fd.as_raw_fd() == p.fd)
            {
                s.drain(&mut buf, &mut line);
            }
        }
        for sig in read_signals(signals) {
            if FORWARDED.contains(&sig) {
                signal_ranks(&ranks, sig);
            }
        }

        // Reap everything that has exited: our ranks and adopted orphans.
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: non-blocking wait for any child.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            let Some(r) = ranks.iter_mut().find(|r| r.pid == pid && r.alive) else {
                continue;
            };
            r.alive = false;
            let exited = r.rank;
            // What the rank wrote before it exited is in its pipes now:
            // forward it before anything speaks of its end.
            for s in streams.iter_mut().filter(|s| s.rank == exited) {
                s.drain(&mut buf, &mut line);
            }
            let code = exit_code(status);
            if code != 0 && result.is_none() {
                result = Some(code);
                if ranks.iter().any(|r| r.alive) {
                    say(&format!(
                        "rank {exited} exited with code {code}; stopping the other ranks"
                    ));
                    signal_ranks(&ranks, libc::SIGTERM);
                    kill_at = Some(Instant::now() + args.grace);
                }
            }
        }

        if let Some(t) = kill_at
            && Instant::now() >= t
        {
            signal_ranks(&ranks, libc::SIGKILL);
            kill_at = None;
        }
    }
    // Whatever background processes of the ranks wrote so far; their pipes
    // may stay open, but they end with this container.
    for s in &mut streams {
        s.drain(&mut buf, &mut line);
        let (rank, out) = (s.rank, s.out);
        s.lines.finish(&mut |l| forward(rank, out, l, &mut line));
    }
    let _ = std::io::stdout().flush();
    std::process::exit(result.unwrap_or(0));
}

/// The signals the signalfd holds now.
fn read_signals(fd: libc::c_int) -> Vec<libc::c_int> {
    let mut got = Vec::new();
    loop {
        // SAFETY: reads one signalfd record into a zeroed struct we own.
        let (n, info) = unsafe {
            let mut info: libc::signalfd_siginfo = std::mem::zeroed();
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            let n = libc::read(fd, (&mut info as *mut libc::signalfd_siginfo).cast(), size);
            (n, info)
        };
        if n != std::mem::size_of::<libc::signalfd_siginfo>() as isize {
            return got;
        }
        got.push(info.ssi_signo as libc::c_int);
    }
}
