//! The default mode: `--procs N` local ranks of one command (or, with
//! `--mpi`, the one `mpirun` that starts all of them).

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use drover_init::{Lines, write_marker};

use crate::sys::{self, exit_code, say};

/// Signals forwarded to the ranks.
pub const FORWARDED: &[libc::c_int] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

pub struct Args {
    pub procs: u32,
    pub grace: Duration,
    /// `mpirun` (or a script that calls it) is the command: it starts the
    /// ranks and gives them their own numbers.
    pub mpi: bool,
    pub command: String,
}

struct Rank {
    pid: libc::pid_t,
    rank: u32,
    alive: bool,
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

pub fn run(args: Args) -> ! {
    let node_rank = sys::env_u32("NODE_RANK", 0);
    let world_size = sys::env_u32("WORLD_SIZE", args.procs);
    // One rank has nothing to tell apart: it writes to the container itself.
    let marked = args.procs > 1;

    let mut handled: Vec<libc::c_int> = FORWARDED.to_vec();
    handled.push(libc::SIGCHLD);
    // The signals we wait for queue for the signalfd instead of running
    // default actions; children get an empty mask back before exec.
    let signals = sys::signalfd(&handled);

    let mut ranks = Vec::with_capacity(args.procs as usize);
    let mut streams: Vec<Stream> = Vec::new();
    for local in 0..args.procs {
        let rank = node_rank * args.procs + local;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(&args.command).process_group(0);
        if args.mpi {
            // mpirun numbers its ranks itself (OMPI_COMM_WORLD_RANK…); a
            // RANK of ours would contradict it for every rank but one.
            sys::allow_mpi_as_root(&mut cmd);
        } else {
            cmd.env("RANK", rank.to_string())
                .env("LOCAL_RANK", local.to_string())
                .env("LOCAL_WORLD_SIZE", args.procs.to_string())
                .env("WORLD_SIZE", world_size.to_string())
                .env("NODE_RANK", node_rank.to_string());
            // TensorFlow's tasks differ per process: the planner gives
            // local rank i its `TF_CONFIG` as `DROVER_TF_CONFIG_<i>`.
            if let Ok(tf) = std::env::var(format!("DROVER_TF_CONFIG_{local}")) {
                cmd.env("TF_CONFIG", tf);
            }
        }
        if marked {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        sys::unblock_signals_in_child(&mut cmd);
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
        for sig in sys::read_signals(signals) {
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
