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
//!   distributed job never hangs waiting for a dead peer.
//!
//! It is linked statically so it runs in any image, and uses only libc.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

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

fn main() {
    let args = parse_args();
    let node_rank = env_u32("NODE_RANK", 0);
    let world_size = env_u32("WORLD_SIZE", args.procs);

    let mut handled: Vec<libc::c_int> = FORWARDED.to_vec();
    handled.push(libc::SIGCHLD);
    let set = signal_set(&handled);
    // Block the signals we wait for, so they queue for sigtimedwait instead of
    // running default actions; children get an empty mask back in pre_exec.
    // SAFETY: changes this process's signal mask only.
    unsafe {
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }

    let mut ranks = Vec::with_capacity(args.procs as usize);
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
            Ok(child) => ranks.push(Rank {
                pid: child.id() as libc::pid_t,
                rank,
                alive: true,
            }),
            Err(e) => {
                say(&format!("cannot start rank {rank}: {e}"));
                signal_ranks(&ranks, libc::SIGKILL);
                std::process::exit(127);
            }
        }
    }

    let mut result: Option<i32> = None;
    let mut kill_at: Option<Instant> = None;
    while ranks.iter().any(|r| r.alive) {
        // Wake at least once a second so a lost SIGCHLD can never hang us.
        let wait = kill_at
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: waits for a signal in `set`; info is ours.
        let sig = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::sigtimedwait(&set, &mut info, &ts)
        };
        if FORWARDED.contains(&sig) {
            signal_ranks(&ranks, sig);
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
            let code = exit_code(status);
            if code != 0 && result.is_none() {
                result = Some(code);
                let failed = r.rank;
                if ranks.iter().any(|r| r.alive) {
                    say(&format!(
                        "rank {failed} exited with code {code}; stopping the other ranks"
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
    std::process::exit(result.unwrap_or(0));
}
