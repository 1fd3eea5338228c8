//! `drover-init`: PID 1 of every Drover job container, and the launcher
//! that lets Open MPI start its daemons on other nodes without SSH.
//!
//! ```text
//! drover-init [--procs N | --mpi] [--grace SECONDS] -- COMMAND
//! drover-init launch-listen [--grace SECONDS]
//! drover-init rsh [SSH-OPTIONS] HOST WORD...
//! ```
//!
//! **Ranks** (the default mode). Starts `N` copies of `/bin/sh -c COMMAND`
//! (the local ranks), each in its own process group with `RANK`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE` and `WORLD_SIZE` set, then:
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
//! With `--mpi` the command is `mpirun` (or a script around it) on node
//! rank 0 of an MPI job: it runs once, without `RANK`/`LOCAL_RANK`/
//! `LOCAL_WORLD_SIZE` (mpirun gives its ranks their own), with
//! `OMPI_ALLOW_RUN_AS_ROOT`/`_CONFIRM` when drover-init runs as root.
//!
//! **Launch listener** (`launch-listen`, PID 1 on node ranks above 0 of an
//! MPI job: what sshd would be). Accepts TCP connections on
//! `DROVER_LAUNCH_BIND`:`DROVER_LAUNCH_PORT` (default `0.0.0.0:29450`) and,
//! for each that proves it holds the job's launch secret and names this
//! container's job, attempt and node rank, runs `/bin/sh -c COMMAND` in its
//! own process group with stdin, stdout, stderr and the exit code carried
//! over the connection. A connection that breaks before its process ended
//! has its process group stopped (SIGTERM, SIGKILL after `--grace`), as
//! sshd hangs up; SIGTERM to the listener stops every session the same way
//! and exits 0. It reaps every child, as in the ranks mode.
//!
//! **Launch client** (`rsh`: what ssh would be). Open MPI runs
//! `$OMPI_MCA_plm_rsh_agent HOST ORTED-WORDS...`; Drover sets the agent to
//! `drover-init rsh`. It ignores ssh's options, finds HOST's node rank in
//! `AZ_BATCH_HOST_LIST`, connects (retrying while the other container is
//! not up yet), and from then on is the remote command: its stdin goes
//! there, the remote output comes back, signals go there, and it exits with
//! the remote exit code — or 255, ssh's code for its own failures.
//!
//! The protocol between the two is [`drover_init::launch`].
//!
//! It is linked statically so it runs in any image, and uses only libc (and
//! two pure-Rust hash crates for the launch protocol's MAC).

mod listen;
mod ranks;
mod rsh;
mod sys;

use std::time::Duration;

const USAGE: &str = "usage: drover-init [--procs N | --mpi] [--grace SECONDS] -- COMMAND
       drover-init launch-listen [--grace SECONDS]
       drover-init rsh [SSH-OPTIONS] HOST WORD...";

/// Reports a usage error and exits.
fn usage(msg: &str) -> ! {
    sys::say(msg);
    eprintln!("{USAGE}");
    std::process::exit(2);
}

/// Seconds of `--grace`.
fn grace_arg(value: Option<String>) -> Duration {
    value
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or_else(|| usage("--grace expects seconds"))
}

fn parse_ranks_args(args: impl Iterator<Item = String>) -> ranks::Args {
    let mut procs = None;
    let mut mpi = false;
    let mut grace = Duration::from_secs(10);
    let mut args = args.into_iter();
    let mut command = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--procs" => {
                procs = Some(
                    args.next()
                        .and_then(|v| v.parse().ok())
                        .filter(|n: &u32| *n >= 1)
                        .unwrap_or_else(|| usage("--procs expects a positive integer")),
                );
            }
            "--mpi" => mpi = true,
            "--grace" => grace = grace_arg(args.next()),
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
    if mpi && procs.is_some_and(|n| n != 1) {
        usage("--mpi runs mpirun once: mpirun starts the ranks (--procs must be 1)");
    }
    ranks::Args {
        procs: procs.unwrap_or(1),
        grace,
        mpi,
        command: command.unwrap_or_else(|| usage("missing command")),
    }
}

fn parse_listen_args(args: impl Iterator<Item = String>) -> listen::Args {
    let mut grace = Duration::from_secs(10);
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--grace" => grace = grace_arg(args.next()),
            other => usage(&format!("unknown argument {other}")),
        }
    }
    listen::Args { grace }
}

fn main() {
    let mut args = std::env::args().skip(1).peekable();
    match args.peek().map(String::as_str) {
        Some("rsh") => {
            args.next();
            rsh::run(args.collect())
        }
        Some("launch-listen") => {
            args.next();
            listen::run(parse_listen_args(args))
        }
        _ => ranks::run(parse_ranks_args(args)),
    }
}
