//! `drover-init`: PID 1 of every Drover job container.
//!
//! ```text
//! drover-init [--procs N | --mpi] [--grace SECONDS] -- COMMAND
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
//! With `--mpi` the command is `mpirun` (or a script around it) on node
//! rank 0 of an MPI job: it runs once, without `RANK`/`LOCAL_RANK`/
//! `LOCAL_WORLD_SIZE` (mpirun gives its ranks their own), with
//! `OMPI_ALLOW_RUN_AS_ROOT`/`_CONFIRM` when drover-init runs as root.
//!
//! It is linked statically so it runs in any image, and uses only libc.

mod ranks;
mod sys;

use std::time::Duration;

const USAGE: &str = "usage: drover-init [--procs N | --mpi] [--grace SECONDS] -- COMMAND";

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

fn main() {
    ranks::run(parse_ranks_args(std::env::args().skip(1)))
}
