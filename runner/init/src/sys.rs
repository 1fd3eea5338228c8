//! The few libc calls every mode of drover-init shares: signal masks and
//! signalfds, wait statuses, messages.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Writes `drover-init: MSG` to stderr in one write; a failed write (nobody
/// reads the container's stderr) must not stop anything.
pub fn say(msg: &str) {
    let _ = std::io::stderr()
        .lock()
        .write_all(format!("drover-init: {msg}\n").as_bytes());
}

pub fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn signal_set(signals: &[libc::c_int]) -> libc::sigset_t {
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

/// Blocks `signals` in the calling thread — call it before any thread is
/// started, so every thread inherits the mask and the signals queue for
/// one reader instead of running default actions.
pub fn block(signals: &[libc::c_int]) -> libc::sigset_t {
    let set = signal_set(signals);
    // SAFETY: changes this thread's signal mask only.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    set
}

/// Blocks `signals` and opens a non-blocking signalfd that reads them;
/// exits with 127 when the kernel refuses one.
pub fn signalfd(signals: &[libc::c_int]) -> libc::c_int {
    let set = block(signals);
    // SAFETY: opens a descriptor that reads the signals of a set we own.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        say(&format!(
            "cannot read signals: {}",
            std::io::Error::last_os_error()
        ));
        std::process::exit(127);
    }
    fd
}

/// The signals the signalfd holds now.
pub fn read_signals(fd: libc::c_int) -> Vec<libc::c_int> {
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

/// Gives a child an empty signal mask: drover-init blocks the signals it
/// reads through a signalfd, and a blocked mask survives exec.
pub fn unblock_signals_in_child(cmd: &mut Command) {
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            Ok(())
        });
    }
}

/// Open MPI's `mpirun` and `orted` refuse to run as root unless both of
/// these are set; job containers usually run as root, and the container is
/// the isolation that the check stands in for.
pub fn allow_mpi_as_root(cmd: &mut Command) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    for name in ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] {
        if std::env::var_os(name).is_none() {
            cmd.env(name, "1");
        }
    }
}

/// Exit code a shell would report for a wait status.
pub fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// Sends `sig` to the process group `pgid`; failure (already gone) is
/// harmless.
pub fn kill_group(pgid: libc::pid_t, sig: libc::c_int) {
    if pgid > 0 {
        // SAFETY: kill(2) on a process group we created.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

/// The name of a signal for messages.
pub fn signal_name(sig: libc::c_int) -> String {
    match sig {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGQUIT => "SIGQUIT".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        other => format!("signal {other}"),
    }
}

/// The value of `name`, which must be one word of a protocol line (a job
/// name, an attempt).
pub fn env_token(name: &str) -> Result<String, String> {
    let value = std::env::var(name).map_err(|_| format!("{name} is not set"))?;
    if !drover_init::launch::is_token(&value) {
        return Err(format!(
            "{name} must be one word of printable ASCII, not {value:?}"
        ));
    }
    Ok(value)
}

/// The job's launch secret, from the file `DROVER_LAUNCH_SECRET_FILE` names.
pub fn launch_secret() -> Result<Vec<u8>, String> {
    use drover_init::launch::{ENV_SECRET_FILE, parse_secret};
    let path =
        std::env::var_os(ENV_SECRET_FILE).ok_or_else(|| format!("{ENV_SECRET_FILE} is not set"))?;
    let shown = std::path::Path::new(&path).display().to_string();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read the launch secret {shown}: {e}"))?;
    parse_secret(&text).map_err(|e| format!("launch secret {shown}: {e}"))
}

/// `DROVER_LAUNCH_PORT`, or the protocol's default.
pub fn launch_port() -> Result<u16, String> {
    use drover_init::launch::{DEFAULT_PORT, ENV_PORT};
    match std::env::var(ENV_PORT) {
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_PORT),
        Ok(v) => v
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{ENV_PORT} must be a port number, not {v:?}")),
        Err(_) => Err(format!("{ENV_PORT} must be a port number")),
    }
}

/// Turns on TCP keepalives, so that a session whose peer vanished (its
/// node powered off: no FIN, no RST) ends within minutes instead of never.
pub fn keepalive(stream: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    for (level, name, value) in [
        (libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1),
        (libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30),
        (libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10),
        (libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6),
    ] {
        let value: libc::c_int = value;
        // SAFETY: sets an integer option on a socket we own, from a value
        // that outlives the call; failure only loses the early detection.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}
