//! `drover-init rsh`: the remote-launch agent Open MPI runs instead of ssh
//! (`OMPI_MCA_plm_rsh_agent="/drover/bin/drover-init rsh"`). It asks the
//! `drover-init launch-listen` of HOST's container to run the command and
//! then stands in for it: stdin there, output back, signals there, its exit
//! code as ours. Its own failures exit 255, as ssh's do, which mpirun
//! reports as a failed daemon launch.

use std::io::{self, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use drover_init::launch::{self, Identity, Reply, Request};

use crate::sys;

/// ssh's exit code for its own errors.
const FAILED: i32 = 255;

/// ssh's options without an argument (from its getopt string).
const SSH_FLAGS: &str = "1246afgknqstvxACGKMNTVXYy";
/// ssh's options with an argument (`-p 22` or `-p22`).
const SSH_WITH_ARG: &str = "bceilmopBDEFIJLOPQRSwW";

/// Signals forwarded to the remote process group.
const FORWARDED: &[libc::c_int] = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// How long one connection attempt may take: bounded, so that a host that
/// drops packets is retried until the connect timeout rather than waited on.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the listener may take to greet and to answer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

fn fail(msg: &str) -> ! {
    sys::say(msg);
    std::process::exit(FAILED);
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Call {
    host: String,
    command: String,
    /// `-n`: stdin is not read (ssh redirects it from /dev/null).
    no_stdin: bool,
}

/// Reads an ssh command line: options (ignored), `[user@]HOST`, and the
/// command's words, joined by spaces as ssh joins them for the remote
/// shell.
fn parse(args: Vec<String>) -> Result<Call, String> {
    let mut args = args.into_iter();
    let mut no_stdin = false;
    let host = loop {
        let Some(arg) = args.next() else {
            return Err("missing HOST".into());
        };
        if arg == "--" {
            break args.next().ok_or("missing HOST")?;
        }
        let Some(letters) = arg.strip_prefix('-').filter(|l| !l.is_empty()) else {
            break arg;
        };
        for (i, c) in letters.char_indices() {
            if SSH_WITH_ARG.contains(c) {
                // The rest of the word is the argument, or the next word is.
                if i + c.len_utf8() == letters.len() && args.next().is_none() {
                    return Err(format!("option -{c} expects an argument"));
                }
                break;
            } else if SSH_FLAGS.contains(c) {
                no_stdin |= c == 'n';
            } else {
                return Err(format!("unknown option -{c}"));
            }
        }
    };
    let host = match host.rsplit_once('@') {
        Some((_user, host)) => host.to_string(),
        None => host,
    };
    let words: Vec<String> = args.collect();
    if words.is_empty() {
        return Err(format!(
            "no command for {host}: drover-init rsh runs commands, not login shells"
        ));
    }
    Ok(Call {
        host,
        command: words.join(" "),
        no_stdin,
    })
}

/// HOST's node rank: its place in `AZ_BATCH_HOST_LIST`.
fn node_rank(host: &str) -> Result<u32, String> {
    let list = std::env::var("AZ_BATCH_HOST_LIST").unwrap_or_default();
    list.split(',')
        .position(|h| h.trim() == host)
        .and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| format!("{host} is not a node of this job (AZ_BATCH_HOST_LIST={list})"))
}

pub fn run(args: Vec<String>) -> ! {
    let call = parse(args).unwrap_or_else(|e| {
        sys::say(&e);
        eprintln!("usage: drover-init rsh [SSH-OPTIONS] [USER@]HOST WORD...");
        std::process::exit(FAILED);
    });
    // Blocked before any thread starts: while connecting they are waited
    // for between attempts, once connected one thread forwards them.
    let signals = sys::block(FORWARDED);

    let rank = node_rank(&call.host).unwrap_or_else(|e| fail(&e));
    let who = (|| {
        Ok::<_, String>(Identity {
            job: sys::env_token("DROVER_JOB_NAME")?,
            attempt: sys::env_token("DROVER_ATTEMPT")?,
            node_rank: rank,
        })
    })()
    .unwrap_or_else(|e| fail(&e));
    let key = sys::launch_secret().unwrap_or_else(|e| fail(&e));
    let port = sys::launch_port().unwrap_or_else(|e| fail(&e));
    let connect_timeout = match std::env::var(launch::ENV_CONNECT_TIMEOUT) {
        Err(_) => launch::DEFAULT_CONNECT_TIMEOUT,
        Ok(v) => v.parse().map(Duration::from_secs).unwrap_or_else(|_| {
            fail(&format!(
                "{} must be whole seconds, not {v:?}",
                launch::ENV_CONNECT_TIMEOUT
            ))
        }),
    };
    if call.command.len() > launch::MAX_COMMAND {
        fail(&format!(
            "the command for {} is {} bytes, more than the {} a launch carries",
            call.host,
            call.command.len(),
            launch::MAX_COMMAND
        ));
    }

    let target = format!("{}:{port}", call.host);
    let stream = connect(&call.host, port, connect_timeout, &signals);
    sys::keepalive(&stream);
    let reader = handshake(&stream, &target, &call, who, &key);
    stream_session(stream, reader, &target, call.no_stdin, signals)
}

/// Connects to the listener, retrying (every 100 ms, growing to 1 s) until
/// `timeout`: the other node's container may still be pulling its image.
/// A forwarded signal while waiting ends the client as it would have ended
/// a process that was never started.
fn connect(host: &str, port: u16, timeout: Duration, signals: &libc::sigset_t) -> TcpStream {
    let until = Instant::now() + timeout;
    let mut delay = Duration::from_millis(100);
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let err = match connect_once(
            host,
            port,
            left.clamp(Duration::from_millis(100), ATTEMPT_TIMEOUT),
        ) {
            Ok(stream) => return stream,
            Err(e) => e,
        };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            fail(&format!(
                "cannot connect to the launch listener at {host}:{port} within {} s: {err}",
                timeout.as_secs()
            ));
        }
        if let Some(sig) = wait_signal(signals, delay.min(left)) {
            sys::say(&format!(
                "{} while connecting to {host}:{port}",
                sys::signal_name(sig)
            ));
            std::process::exit(128 + sig);
        }
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

fn connect_once(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in (host, port).to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Waits up to `wait` for one of `signals` (blocked); `None` when none came.
fn wait_signal(signals: &libc::sigset_t, wait: Duration) -> Option<libc::c_int> {
    let ts = libc::timespec {
        tv_sec: wait.as_secs() as libc::time_t,
        tv_nsec: wait.subsec_nanos() as libc::c_long,
    };
    // SAFETY: waits on a set we own; no siginfo is asked for.
    let sig = unsafe { libc::sigtimedwait(signals, std::ptr::null_mut(), &ts) };
    // -1 is the timeout (EAGAIN) or another signal (EINTR): keep going.
    (sig > 0).then_some(sig)
}

/// Reads the greeting, sends the request, reads the answer; returns the
/// read side, which may already hold frames.
fn handshake(
    stream: &TcpStream,
    target: &str,
    call: &Call,
    who: Identity,
    key: &[u8],
) -> BufReader<TcpStream> {
    let broke = |what: &str, e: io::Error| -> ! {
        fail(&format!("launch on {target}: {what}: {e}"));
    };
    if let Err(e) = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)) {
        broke("cannot set a timeout", e);
    }
    let mut reader = match stream.try_clone() {
        Ok(s) => BufReader::new(s),
        Err(e) => broke("cannot clone the connection", e),
    };
    let greeting = launch::read_line(&mut reader, launch::MAX_HEADER)
        .unwrap_or_else(|e| broke("no greeting", e));
    let Some(nonce) = launch::parse_greeting(&greeting) else {
        fail(&format!(
            "{target} does not speak the drover launch protocol (it said {:?})",
            String::from_utf8_lossy(&greeting)
        ));
    };
    let command = call.command.as_bytes();
    let request = Request {
        mac: launch::launch_mac(key, &nonce, &who, command),
        who,
        command_len: command.len(),
    };
    let mut message = request.line().into_bytes();
    message.extend_from_slice(command);
    let mut w = stream;
    if let Err(e) = w.write_all(&message) {
        broke("cannot send the request", e);
    }
    let answer = launch::read_line(&mut reader, launch::MAX_HEADER)
        .unwrap_or_else(|e| broke("no answer to the request", e));
    match Reply::parse(&answer) {
        Some(Reply::Ok) => {}
        Some(Reply::Deny(reason)) => fail(&format!("launch on {} refused: {reason}", call.host)),
        None => fail(&format!(
            "launch on {target}: unexpected answer {:?}",
            String::from_utf8_lossy(&answer)
        )),
    }
    if let Err(e) = stream.set_read_timeout(None) {
        broke("cannot clear a timeout", e);
    }
    reader
}

/// Forwards stdin and signals to the remote process and its output back,
/// and exits with its exit code.
fn stream_session(
    stream: TcpStream,
    mut reader: BufReader<TcpStream>,
    target: &str,
    no_stdin: bool,
    signals: libc::sigset_t,
) -> ! {
    let writer = Arc::new(Mutex::new(stream));
    let send = |w: &Mutex<TcpStream>, kind: u8, payload: &[u8]| {
        let mut w = w.lock().unwrap_or_else(PoisonError::into_inner);
        launch::write_frame(&mut *w, kind, payload)
    };

    let w = Arc::clone(&writer);
    let started = thread::Builder::new().name("stdin".into()).spawn(move || {
        if !no_stdin {
            let mut buf = vec![0u8; launch::MAX_FRAME];
            let mut input = io::stdin().lock();
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if send(&w, launch::STDIN, &buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // An unreadable stdin ends like an empty one.
                    Err(_) => break,
                }
            }
        }
        let _ = send(&w, launch::STDIN_EOF, &[]);
    });
    if let Err(e) = started {
        fail(&format!("launch on {target}: cannot start a thread: {e}"));
    }

    let w = Arc::clone(&writer);
    let started = thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: waits on a set we own, blocked in every thread.
                if unsafe { libc::sigwait(&signals, &mut sig) } != 0 {
                    continue;
                }
                if send(&w, launch::SIGNAL, &(sig as u32).to_be_bytes()).is_err() {
                    return;
                }
            }
        });
    if let Err(e) = started {
        fail(&format!("launch on {target}: cannot start a thread: {e}"));
    }

    let mut payload = Vec::new();
    loop {
        match launch::read_frame(&mut reader, &mut payload) {
            // Output that cannot be written (nobody reads ours) is dropped:
            // the remote process must not stop for it.
            Ok(Some(launch::STDOUT)) => {
                let mut out = io::stdout().lock();
                let _ = out.write_all(&payload).and_then(|()| out.flush());
            }
            Ok(Some(launch::STDERR)) => {
                let _ = io::stderr().lock().write_all(&payload);
            }
            Ok(Some(launch::EXIT)) => match launch::frame_u32(&payload) {
                Some(code) => {
                    let _ = io::stdout().flush();
                    std::process::exit(code as i32);
                }
                None => fail(&format!("launch on {target}: an exit frame without a code")),
            },
            Ok(Some(other)) => fail(&format!(
                "launch on {target}: unknown frame type {other:#04x}"
            )),
            Ok(None) => fail(&format!(
                "connection to {target} closed before the remote command exited"
            )),
            Err(e) => fail(&format!("connection to {target} broke: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(args: &[&str]) -> Result<Call, String> {
        parse(args.iter().map(|a| a.to_string()).collect())
    }

    #[test]
    fn ssh_options_are_skipped() {
        let want = Call {
            host: "10.0.0.5".into(),
            command: "orted -mca ess env --tree-spawn".into(),
            no_stdin: false,
        };
        for args in [
            &["10.0.0.5", "orted", "-mca", "ess", "env", "--tree-spawn"][..],
            &[
                "-x",
                "-T",
                "-q",
                "10.0.0.5",
                "orted -mca ess",
                "env",
                "--tree-spawn",
            ],
            &[
                "-o",
                "StrictHostKeyChecking=no",
                "-p",
                "22",
                "-l",
                "root",
                "10.0.0.5",
                "orted",
                "-mca",
                "ess",
                "env",
                "--tree-spawn",
            ],
            &[
                "-xT",
                "-p22",
                "-oBatchMode=yes",
                "-i",
                "/k",
                "-F",
                "/c",
                "root@10.0.0.5",
                "orted",
                "-mca",
                "ess",
                "env",
                "--tree-spawn",
            ],
            &[
                "-4",
                "-6",
                "-A",
                "-a",
                "-t",
                "--",
                "10.0.0.5",
                "orted",
                "-mca",
                "ess",
                "env",
                "--tree-spawn",
            ],
        ] {
            assert_eq!(call(args), Ok(want.clone()), "{args:?}");
        }
        assert!(call(&["-n", "h", "true"]).is_ok_and(|c| c.no_stdin));
        // Words after HOST are the command's, however they look.
        assert_eq!(
            call(&["h", "-x", "--"]).map(|c| c.command),
            Ok("-x --".into())
        );
    }

    #[test]
    fn bad_command_lines_are_refused() {
        for args in [
            &[][..],
            &["-x"],
            &["-p"],
            &["-Z", "h", "true"],
            &["h"],
            &["--"],
        ] {
            assert!(call(args).is_err(), "{args:?}");
        }
    }
}
