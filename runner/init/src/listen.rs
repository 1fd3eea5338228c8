//! `drover-init launch-listen`: PID 1 of the containers on node ranks above
//! 0 of an MPI job, starting the processes that `drover-init rsh` asks for
//! (what sshd would be for Open MPI).
//!
//! Threads: the main thread owns the signalfd, the listening socket and
//! every `waitpid(-1)` — the one place children are reaped, so that adopted
//! orphans and session processes alike are collected, and each session
//! learns its process's exit code from [`Shared::table`]. Each connection
//! gets a session thread (handshake, then the process's stdout), and a
//! session with a process three more: stderr, the client's frames, and the
//! process's stdin.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use drover_init::launch::{self, Identity};

mod session;

use crate::ranks::FORWARDED;
use crate::sys::{self, say};

pub struct Args {
    pub grace: Duration,
}

/// The most connections in their handshake at once: a flood of idle
/// connections costs at most this many threads, each gone within
/// [`launch::HANDSHAKE_TIMEOUT`]. An MPI job opens one per `mpirun`.
const MAX_HANDSHAKES: usize = 64;

/// After the final SIGKILL on stop, how long sessions get to send their
/// exit frames before the listener exits.
const LAST_WORDS: Duration = Duration::from_secs(2);

/// A session's process: its pid (also its process group) and the session,
/// so that a pid the kernel reuses is never taken for an earlier one.
#[derive(Clone, Copy)]
struct Proc {
    id: u64,
    pid: libc::pid_t,
}

/// The sessions' processes.
#[derive(Default)]
struct Table {
    /// The running session processes: pid → session. A pid leaves when it
    /// is reaped, before the kernel can give it to another process.
    running: HashMap<libc::pid_t, u64>,
    /// Exit codes of reaped session processes, until their session takes
    /// them.
    exited: HashMap<u64, i32>,
    /// Sessions that started a process and have not sent its exit frame.
    active: usize,
    next_id: u64,
    /// The listener is stopping: no new processes.
    stopping: bool,
}

impl Table {
    /// Whether `p` has not exited yet.
    fn is_running(&self, p: Proc) -> bool {
        self.running.get(&p.pid) == Some(&p.id)
    }
}

/// What the main thread and the sessions share.
struct Shared {
    table: Mutex<Table>,
    /// Notified whenever an exit code enters the table.
    changed: Condvar,
    me: Identity,
    key: Vec<u8>,
    grace: Duration,
    handshakes: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panicking session must not take the others down with it: the
        // table stays consistent under every single update.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The listener's configuration from its environment.
struct Config {
    me: Identity,
    key: Vec<u8>,
    addr: SocketAddr,
}

fn config() -> Result<Config, String> {
    let job = sys::env_token("DROVER_JOB_NAME")?;
    let attempt = sys::env_token("DROVER_ATTEMPT")?;
    let node_rank = std::env::var("NODE_RANK")
        .map_err(|_| "NODE_RANK is not set".to_string())?
        .parse::<u32>()
        .map_err(|_| "NODE_RANK must be a node rank".to_string())?;
    let key = sys::launch_secret()?;
    let bind = match std::env::var(launch::ENV_BIND) {
        Err(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Ok(v) => v
            .parse()
            .map_err(|_| format!("{} must be an IP address, not {v:?}", launch::ENV_BIND))?,
    };
    let port = sys::launch_port()?;
    Ok(Config {
        me: Identity {
            job,
            attempt,
            node_rank,
        },
        key,
        addr: SocketAddr::new(bind, port),
    })
}

pub fn run(args: Args) -> ! {
    let mut handled: Vec<libc::c_int> = FORWARDED.to_vec();
    handled.push(libc::SIGCHLD);
    // Before any thread starts, so that every thread inherits the mask and
    // the signals reach the signalfd alone.
    let signals = sys::signalfd(&handled);

    let cfg = config().unwrap_or_else(|e| {
        say(&format!("launch-listen: {e}"));
        std::process::exit(127);
    });
    let listener = TcpListener::bind(cfg.addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .unwrap_or_else(|e| {
            say(&format!(
                "launch-listen: cannot listen on {}: {e}",
                cfg.addr
            ));
            std::process::exit(127);
        });
    let addr = listener.local_addr().unwrap_or(cfg.addr);
    say(&format!(
        "waiting for launches on {addr} (job {} attempt {} node {})",
        cfg.me.job, cfg.me.attempt, cfg.me.node_rank
    ));
    let shared = Arc::new(Shared {
        table: Mutex::new(Table::default()),
        changed: Condvar::new(),
        me: cfg.me,
        key: cfg.key,
        grace: args.grace,
        handshakes: AtomicUsize::new(0),
    });

    let mut listener = Some(listener);
    // Set once stopping: when the sessions' groups get SIGKILL, then when
    // the listener exits whatever is left.
    let mut kill_at: Option<Instant> = None;
    let mut exit_at: Option<Instant> = None;
    loop {
        let stopping = kill_at.is_some() || exit_at.is_some();
        let mut polled = vec![libc::pollfd {
            fd: signals,
            events: libc::POLLIN,
            revents: 0,
        }];
        if let Some(l) = &listener {
            polled.push(libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Wake at least once a second so a lost SIGCHLD can never hang us,
        // and often while stopping to exit as soon as the sessions are done.
        let wait_ms = if stopping { 50 } else { 1000 };
        // SAFETY: polls descriptors we own, listed in a vector we own.
        unsafe {
            libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, wait_ms);
        }

        if let Some(l) = &listener {
            accept_all(l, &shared);
        }
        for sig in sys::read_signals(signals) {
            if sig == libc::SIGTERM || sig == libc::SIGINT {
                if !stopping {
                    // New connections are refused by the kernel from now on.
                    listener = None;
                    let n = signal_sessions(&shared, libc::SIGTERM, true);
                    say(&format!(
                        "{}: stopping; SIGTERM to {n} session(s)",
                        sys::signal_name(sig)
                    ));
                    kill_at = Some(Instant::now() + shared.grace);
                }
            } else if FORWARDED.contains(&sig) {
                signal_sessions(&shared, sig, false);
            }
        }
        reap(&shared);

        if kill_at.is_some() || exit_at.is_some() {
            if shared.lock().active == 0 {
                std::process::exit(0);
            }
            if let Some(t) = kill_at
                && Instant::now() >= t
            {
                let n = signal_sessions(&shared, libc::SIGKILL, false);
                say(&format!("SIGKILL to {n} session(s) after the grace period"));
                kill_at = None;
                exit_at = Some(Instant::now() + LAST_WORDS);
            }
            if let Some(t) = exit_at
                && Instant::now() >= t
            {
                std::process::exit(0);
            }
        }
    }
}

/// Sends `sig` to the process group of every session whose process still
/// runs and returns how many; `stop` also refuses new processes.
fn signal_sessions(shared: &Shared, sig: libc::c_int, stop: bool) -> usize {
    let mut table = shared.lock();
    table.stopping |= stop;
    for pid in table.running.keys() {
        sys::kill_group(*pid, sig);
    }
    table.running.len()
}

/// Reaps every child that has exited, session processes and adopted
/// orphans alike; a session's exit code goes to its table entry.
fn reap(shared: &Shared) {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: non-blocking wait for any child.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        // The table is locked after the wait: a session holds the lock
        // from before its fork until its pid is in the table, so the pid is
        // there by the time we look.
        let mut table = shared.lock();
        if let Some(id) = table.running.remove(&pid) {
            table.exited.insert(id, sys::exit_code(status));
            shared.changed.notify_all();
        }
    }
}

/// Accepts every pending connection and gives each a session thread.
fn accept_all(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // ECONNABORTED, EMFILE…: this connection is lost, the
                // listener is not.
                say(&format!("cannot accept a connection: {e}"));
                return;
            }
        };
        if shared.handshakes.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
            say(&format!(
                "dropped connection from {peer}: {MAX_HANDSHAKES} handshakes under way"
            ));
            continue;
        }
        let for_session = Arc::clone(shared);
        let started = thread::Builder::new()
            .name(format!("session {peer}"))
            .spawn(move || session::session(&for_session, stream, peer));
        if let Err(e) = started {
            shared.handshakes.fetch_sub(1, Ordering::SeqCst);
            say(&format!(
                "dropped connection from {peer}: cannot start a thread: {e}"
            ));
        }
    }
}
