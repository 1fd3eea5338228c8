//! `resources.docker_args`: the safe subset of `docker run` flags a job may set.
//!
//! Azure ML passes `docker_args` straight to `docker run`. Drover runs jobs on
//! shared nodes with an agent that holds the node's identity, so it accepts
//! only flags that shape the job's own container (limits, environment, IPC)
//! and refuses the ones that widen what the container can reach (privileges,
//! host namespaces, host mounts, devices). Each refusal says what to use
//! instead where Drover has a safe equivalent.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::FieldError;
use crate::units::parse_bytes;

/// The smallest `--memory` Docker accepts (it refuses less with its own words).
pub const MIN_MEMORY_BYTES: u64 = 6 << 20;
/// The largest memory or `/dev/shm` size a job may ask for: above any VM's
/// memory, far below where the engine's signed 64-bit fields overflow.
pub const MAX_MEMORY_BYTES: u64 = 64 << 40;
/// The largest `--cpus`.
pub const MAX_CPUS: f64 = 4096.0;
/// The largest `--pids-limit` (the kernel's own maximum, `pid_max`).
pub const MAX_PIDS_LIMIT: i64 = 4_194_304;
/// The largest `--stop-timeout`, in seconds.
pub const MAX_STOP_TIMEOUT_SECONDS: u64 = 3600;
/// The most `--ulimit`, `--env`, `--tmpfs` or `--label` entries of one kind.
pub const MAX_ENTRIES: usize = 64;

/// `--ipc`: the container's IPC namespace. Only modes that keep the job in
/// a namespace of its own exist: `host` and `container:ID` are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum IpcMode {
    /// Its own namespace (Docker's default).
    Private,
    /// Its own namespace, which other containers may join.
    Shareable,
    /// Its own namespace without `/dev/shm`.
    None,
}

impl IpcMode {
    /// Docker's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            IpcMode::Private => "private",
            IpcMode::Shareable => "shareable",
            IpcMode::None => "none",
        }
    }
}

impl std::str::FromStr for IpcMode {
    type Err = String;

    fn from_str(v: &str) -> Result<Self, String> {
        match v {
            "private" => Ok(IpcMode::Private),
            "shareable" => Ok(IpcMode::Shareable),
            "none" => Ok(IpcMode::None),
            "host" => Err(
                "--ipc=host is not allowed: it shares the node's IPC namespace; \
                 set resources.shm_size for a large /dev/shm"
                    .into(),
            ),
            other if other.starts_with("container:") => Err(format!(
                "--ipc={other} is not allowed: it joins another container's IPC namespace"
            )),
            other => Err(format!(
                "--ipc: expected private, shareable or none, got {other}"
            )),
        }
    }
}

impl TryFrom<String> for IpcMode {
    type Error = String;

    fn try_from(v: String) -> Result<Self, String> {
        v.parse()
    }
}

impl From<IpcMode> for String {
    fn from(m: IpcMode) -> String {
        m.as_str().to_string()
    }
}

impl fmt::Display for IpcMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The resource a `--ulimit` limits, as Docker names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum UlimitName {
    /// Core file size.
    Core,
    /// CPU time.
    Cpu,
    /// Data segment size.
    Data,
    /// File size.
    Fsize,
    /// File locks.
    Locks,
    /// Locked memory (RDMA and NCCL pin memory).
    Memlock,
    /// POSIX message queue bytes.
    Msgqueue,
    /// Nice ceiling.
    Nice,
    /// Open files.
    Nofile,
    /// Processes.
    Nproc,
    /// Resident set size.
    Rss,
    /// Real-time priority.
    Rtprio,
    /// Real-time CPU time.
    Rttime,
    /// Pending signals.
    Sigpending,
    /// Stack size.
    Stack,
}

impl UlimitName {
    /// Every name, in Docker's order.
    pub const ALL: [UlimitName; 15] = [
        UlimitName::Core,
        UlimitName::Cpu,
        UlimitName::Data,
        UlimitName::Fsize,
        UlimitName::Locks,
        UlimitName::Memlock,
        UlimitName::Msgqueue,
        UlimitName::Nice,
        UlimitName::Nofile,
        UlimitName::Nproc,
        UlimitName::Rss,
        UlimitName::Rtprio,
        UlimitName::Rttime,
        UlimitName::Sigpending,
        UlimitName::Stack,
    ];

    /// Docker's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            UlimitName::Core => "core",
            UlimitName::Cpu => "cpu",
            UlimitName::Data => "data",
            UlimitName::Fsize => "fsize",
            UlimitName::Locks => "locks",
            UlimitName::Memlock => "memlock",
            UlimitName::Msgqueue => "msgqueue",
            UlimitName::Nice => "nice",
            UlimitName::Nofile => "nofile",
            UlimitName::Nproc => "nproc",
            UlimitName::Rss => "rss",
            UlimitName::Rtprio => "rtprio",
            UlimitName::Rttime => "rttime",
            UlimitName::Sigpending => "sigpending",
            UlimitName::Stack => "stack",
        }
    }
}

impl std::str::FromStr for UlimitName {
    type Err = String;

    fn from_str(v: &str) -> Result<Self, String> {
        UlimitName::ALL
            .into_iter()
            .find(|n| n.as_str() == v)
            .ok_or_else(|| {
                let names: Vec<&str> = UlimitName::ALL.iter().map(|n| n.as_str()).collect();
                format!(
                    "--ulimit: unknown limit `{v}` (one of {})",
                    names.join(", ")
                )
            })
    }
}

impl TryFrom<String> for UlimitName {
    type Error = String;

    fn try_from(v: String) -> Result<Self, String> {
        v.parse()
    }
}

impl From<UlimitName> for String {
    fn from(n: UlimitName) -> String {
        n.as_str().to_string()
    }
}

impl fmt::Display for UlimitName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resource limit (`--ulimit name=soft[:hard]`); `-1` means unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    /// The limited resource.
    pub name: UlimitName,
    /// Soft limit, -1 for unlimited.
    pub soft: i64,
    /// Hard limit, -1 for unlimited.
    pub hard: i64,
}

/// The container settings a job's `docker_args` asked for.
///
/// Every field that reaches the engine is typed or checked by
/// [`DockerArgs::check`], whichever door the job came through.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DockerArgs {
    /// `--memory`: hard memory limit in bytes.
    pub memory: Option<u64>,
    /// `--memory-swap`: memory plus swap in bytes, -1 for unlimited swap.
    pub memory_swap: Option<i64>,
    /// `--memory-reservation`: soft memory limit in bytes.
    pub memory_reservation: Option<u64>,
    /// `--cpus`: CPU quota in cores.
    pub cpus: Option<f64>,
    /// `--cpu-shares`: relative CPU weight.
    pub cpu_shares: Option<i64>,
    /// `--cpuset-cpus`: CPUs the container may use (`0-3`).
    pub cpuset_cpus: Option<String>,
    /// `--pids-limit`.
    pub pids_limit: Option<i64>,
    /// `--ulimit`, in order; later entries for one name win.
    pub ulimits: Vec<Ulimit>,
    /// `--env`/`-e` `NAME=VALUE` (a bare `NAME` takes the value from the job's environment).
    pub env: Vec<(String, String)>,
    /// `--ipc`.
    pub ipc: Option<IpcMode>,
    /// `--shm-size` in bytes (also settable as `resources.shm_size`).
    pub shm_size: Option<u64>,
    /// `--user`/`-u`.
    pub user: Option<String>,
    /// `--workdir`/`-w`.
    pub workdir: Option<String>,
    /// `--tmpfs PATH[:OPTIONS]`.
    pub tmpfs: Vec<(String, String)>,
    /// `--read-only`: read-only root filesystem.
    pub read_only: bool,
    /// `--label`/`-l` `KEY=VALUE`.
    pub labels: Vec<(String, String)>,
    /// `--stop-timeout`: seconds between SIGTERM and SIGKILL.
    pub stop_timeout: Option<u64>,
}

/// Why a flag is refused, with what to do instead.
fn refusal(flag: &str) -> Option<&'static str> {
    Some(match flag {
        "--privileged" => "gives the job full control of the node",
        "--cap-add" | "--security-opt" | "--device-cgroup-rule" => {
            "widens what the job may do on the node"
        }
        "--device" => "exposes host devices; request GPUs with drover.gpus_per_instance",
        "--gpus" => "GPUs are allocated by Drover; use drover.gpus_per_instance",
        "-v" | "--volume" | "--mount" | "--volumes-from" => {
            "mounts host paths; use code, inputs, outputs or drover.mounts"
        }
        "--pid" | "--uts" | "--userns" | "--cgroupns" => "shares a host namespace with the job",
        "--network" | "--net" | "--network-alias" | "-p" | "--publish" | "-P" | "--publish-all"
        | "--add-host" | "--dns" | "--mac-address" | "--ip" | "--ip6" => {
            "networking is managed by Drover"
        }
        "--cgroup-parent" | "--runtime" | "--isolation" | "--oom-score-adj" => {
            "changes how the node runs containers"
        }
        "--entrypoint" | "--init" => {
            "drover-init is every job's entrypoint; put the program in command"
        }
        "--rm" | "-d" | "--detach" | "-i" | "--interactive" | "-t" | "--tty" | "--name"
        | "--restart" => "the container's lifecycle is managed by Drover",
        _ => return None,
    })
}

/// Splits a `docker_args` string the way a POSIX shell splits words
/// (single and double quotes, backslash escapes), without expansion.
pub fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => cur.push(c),
                            Some(c) => {
                                cur.push('\\');
                                cur.push(c);
                            }
                            None => return Err("unterminated double quote".into()),
                        },
                        Some(c) => cur.push(c),
                        None => return Err("unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                if let Some(c) = chars.next() {
                    cur.push(c);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

fn parse_ulimit(v: &str) -> Result<Ulimit, String> {
    let (name, limits) = v
        .split_once('=')
        .ok_or_else(|| format!("--ulimit expects name=soft[:hard], got {v}"))?;
    let num = |s: &str| {
        s.parse::<i64>()
            .map_err(|_| format!("--ulimit {name}: expected a number or -1, got {s}"))
    };
    let (soft, hard) = match limits.split_once(':') {
        Some((s, h)) => (num(s)?, num(h)?),
        None => {
            let n = num(limits)?;
            (n, n)
        }
    };
    Ok(Ulimit {
        name: name.parse()?,
        soft,
        hard,
    })
}

fn key_value(flag: &str, v: &str) -> Result<(String, String), String> {
    match v.split_once('=') {
        Some((k, val)) if !k.is_empty() => Ok((k.to_string(), val.to_string())),
        _ => Err(format!("{flag} expects KEY=VALUE, got {v}")),
    }
}

/// Parses and checks a job's `docker_args` words. The error names the flag.
pub fn parse_docker_args(words: &[String]) -> Result<DockerArgs, String> {
    let mut out = DockerArgs::default();
    let mut i = 0;
    while i < words.len() {
        let word = &words[i];
        i += 1;
        if !word.starts_with('-') {
            return Err(format!(
                "unexpected argument `{word}`: docker_args holds only flags; the program goes in command"
            ));
        }
        let (flag, inline) = match word.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (word.clone(), None),
        };
        // `--ipc=host` and friends are refused by value below; everything in the
        // refusal table is refused whatever its value.
        if let Some(why) = refusal(&flag) {
            return Err(format!("{flag} is not allowed: {why}"));
        }
        if flag == "--read-only" {
            out.read_only = inline.map(|v| v != "false").unwrap_or(true);
            continue;
        }
        let mut value = || -> Result<String, String> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            let v = words
                .get(i)
                .cloned()
                .ok_or_else(|| format!("{flag} expects a value"))?;
            i += 1;
            Ok(v)
        };
        let bytes = |flag: &str, v: &str| parse_bytes(v).map_err(|e| format!("{flag}: {e}"));
        let int = |flag: &str, v: &str| {
            v.parse::<i64>()
                .map_err(|_| format!("{flag}: expected an integer, got {v}"))
        };
        match flag.as_str() {
            "-m" | "--memory" => {
                let v = value()?;
                out.memory = Some(bytes(&flag, &v)?);
            }
            "--memory-swap" => {
                let v = value()?;
                out.memory_swap = Some(if v == "-1" {
                    -1
                } else {
                    bytes(&flag, &v)? as i64
                });
            }
            "--memory-reservation" => {
                let v = value()?;
                out.memory_reservation = Some(bytes(&flag, &v)?);
            }
            "--shm-size" => {
                let v = value()?;
                out.shm_size = Some(bytes(&flag, &v)?);
            }
            "--cpus" => {
                let v = value()?;
                let cpus: f64 = v
                    .parse()
                    .ok()
                    .filter(|c: &f64| c.is_finite() && *c > 0.0)
                    .ok_or_else(|| format!("--cpus: expected a positive number, got {v}"))?;
                out.cpus = Some(cpus);
            }
            "-c" | "--cpu-shares" => {
                let v = value()?;
                out.cpu_shares = Some(int(&flag, &v)?);
            }
            "--cpuset-cpus" => out.cpuset_cpus = Some(value()?),
            "--pids-limit" => {
                let v = value()?;
                out.pids_limit = Some(int(&flag, &v)?);
            }
            "--ulimit" => {
                let v = value()?;
                out.ulimits.push(parse_ulimit(&v)?);
            }
            "-e" | "--env" => {
                let v = value()?;
                let kv = match v.split_once('=') {
                    Some((k, val)) => (k.to_string(), val.to_string()),
                    None => (v.clone(), String::new()),
                };
                if kv.0.is_empty() {
                    return Err(format!("{flag} expects NAME=VALUE, got {v}"));
                }
                out.env.push(kv);
            }
            "--ipc" => out.ipc = Some(value()?.parse()?),
            "-u" | "--user" => out.user = Some(value()?),
            "-w" | "--workdir" => out.workdir = Some(value()?),
            "--tmpfs" => {
                let v = value()?;
                let (path, opts) = v.split_once(':').unwrap_or((v.as_str(), ""));
                out.tmpfs.push((path.to_string(), opts.to_string()));
            }
            "-l" | "--label" => {
                let v = value()?;
                out.labels.push(key_value(&flag, &v)?);
            }
            "--stop-timeout" => {
                let v = value()?;
                out.stop_timeout = Some(
                    v.parse()
                        .map_err(|_| format!("--stop-timeout: expected seconds, got {v}"))?,
                );
            }
            _ => {
                return Err(format!(
                    "{flag} is not supported in docker_args (allowed: --memory, --memory-swap, \
                     --memory-reservation, --cpus, --cpu-shares, --cpuset-cpus, --pids-limit, \
                     --ulimit, --env, --ipc, --shm-size, --user, --workdir, --tmpfs, --read-only, \
                     --label, --stop-timeout)"
                ));
            }
        }
    }
    Ok(out)
}

/// Sizes as people read them in messages (`6 MiB`, `64 TiB`, `100 bytes`).
pub fn human_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    match UNITS.iter().find(|(_, size)| b >= *size) {
        Some((unit, size)) if (b / size) * size == b => format!("{} {unit}", b / size),
        Some((unit, size)) => format!("{:.1} {unit}", b as f64 / *size as f64),
        None => format!("{b} bytes"),
    }
}

/// Checks that `bytes` (of `flag`) lies in `min..=MAX_MEMORY_BYTES`.
pub(crate) fn check_bytes(flag: &str, bytes: u64, min: u64) -> Result<(), String> {
    if bytes < min {
        return Err(format!(
            "{flag}: must be at least {}, got {}",
            human_bytes(min),
            human_bytes(bytes)
        ));
    }
    if bytes > MAX_MEMORY_BYTES {
        return Err(format!(
            "{flag}: must be at most {}, got {}",
            human_bytes(MAX_MEMORY_BYTES),
            human_bytes(bytes)
        ));
    }
    Ok(())
}

/// True for an environment variable name Docker passes on intact: not
/// empty, no `=` (which would shift the value into the name), no NUL,
/// whitespace or control characters.
pub fn is_valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 1024
        && !name
            .chars()
            .any(|c| c == '=' || c.is_whitespace() || c.is_control())
}

/// A user or group as `--user` takes it: a name or a number.
fn is_valid_user_part(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphanumeric() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && s.len() <= 64
}

/// `--cpuset-cpus`: `N`, `N-M`, separated by `,`.
fn check_cpuset(v: &str) -> Result<(), String> {
    let bad = || format!("--cpuset-cpus: expected CPU numbers like 0-3,8, got `{v}`");
    if v.is_empty() || v.len() > 256 {
        return Err(bad());
    }
    for item in v.split(',') {
        let (a, b) = item.split_once('-').unwrap_or((item, item));
        let a: u32 = a.parse().map_err(|_| bad())?;
        let b: u32 = b.parse().map_err(|_| bad())?;
        if a > b || b > 16_383 {
            return Err(bad());
        }
    }
    Ok(())
}

/// `--tmpfs` options that shape the mount and nothing else.
fn check_tmpfs_options(opts: &str) -> Result<(), String> {
    for o in opts.split(',').filter(|o| !o.is_empty()) {
        let (key, value) = o.split_once('=').unwrap_or((o, ""));
        let ok = match key {
            "size" => parse_bytes(value).is_ok() || value.ends_with('%'),
            "mode" => !value.is_empty() && value.chars().all(|c| c.is_digit(8)) && value.len() <= 4,
            "uid" | "gid" | "nr_inodes" => value.parse::<u64>().is_ok(),
            "ro" | "rw" | "exec" | "noexec" | "suid" | "nosuid" | "dev" | "nodev" | "atime"
            | "noatime" | "relatime" | "norelatime" => value.is_empty(),
            _ => false,
        };
        if !ok {
            return Err(format!(
                "--tmpfs: option `{o}` is not allowed (size=, mode=, uid=, gid=, nr_inodes=, ro, rw, [no]exec, [no]suid, [no]dev, [no|rel]atime)"
            ));
        }
    }
    Ok(())
}

/// Label keys Docker and Drover keep for themselves.
const RESERVED_LABEL_PREFIXES: &[&str] =
    &["drover.", "com.docker.", "io.docker.", "org.dockerproject."];

impl DockerArgs {
    /// Every problem with these settings, each naming its field under
    /// `prefix` (`resources.docker_args`) and, in the message, its flag.
    pub fn check(&self, prefix: &str) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let mut push = |field: &str, r: Result<(), String>| {
            if let Err(message) = r {
                errors.push(FieldError::new(format!("{prefix}.{field}"), message));
            }
        };
        if let Some(m) = self.memory {
            push("memory", check_bytes("--memory", m, MIN_MEMORY_BYTES));
        }
        if let Some(r) = self.memory_reservation {
            push(
                "memory_reservation",
                check_bytes("--memory-reservation", r, MIN_MEMORY_BYTES),
            );
            if let Some(m) = self.memory
                && r > m
            {
                push(
                    "memory_reservation",
                    Err(format!(
                        "--memory-reservation ({}) must not exceed --memory ({})",
                        human_bytes(r),
                        human_bytes(m)
                    )),
                );
            }
        }
        if let Some(sw) = self.memory_swap {
            let r = match (sw, self.memory) {
                (-1, Some(_)) => Ok(()),
                (_, None) => Err("--memory-swap needs --memory".to_string()),
                (sw, Some(m)) if sw < 0 || (sw as u64) < m => Err(format!(
                    "--memory-swap must be -1 or at least --memory ({}), got {sw}",
                    human_bytes(m)
                )),
                (sw, Some(_)) => check_bytes("--memory-swap", sw as u64, MIN_MEMORY_BYTES),
            };
            push("memory_swap", r);
        }
        if let Some(s) = self.shm_size {
            push("shm_size", check_bytes("--shm-size", s, 1));
        }
        if let Some(c) = self.cpus
            && !(c.is_finite() && (0.01..=MAX_CPUS).contains(&c))
        {
            push(
                "cpus",
                Err(format!(
                    "--cpus: must be between 0.01 and {MAX_CPUS}, got {}",
                    if c.abs() >= 1e6 {
                        format!("{c:e}")
                    } else {
                        c.to_string()
                    }
                )),
            );
        }
        if let Some(sh) = self.cpu_shares
            && sh != 0
            && !(2..=262_144).contains(&sh)
        {
            push(
                "cpu_shares",
                Err(format!(
                    "--cpu-shares: must be between 2 and 262144, got {sh}"
                )),
            );
        }
        if let Some(set) = &self.cpuset_cpus {
            push("cpuset_cpus", check_cpuset(set));
        }
        if let Some(p) = self.pids_limit
            && !(1..=MAX_PIDS_LIMIT).contains(&p)
        {
            push(
                "pids_limit",
                Err(format!(
                    "--pids-limit: must be between 1 and {MAX_PIDS_LIMIT}, got {p} (unlimited is not allowed on a shared node)"
                )),
            );
        }
        for (what, count) in [
            ("ulimits", self.ulimits.len()),
            ("env", self.env.len()),
            ("tmpfs", self.tmpfs.len()),
            ("labels", self.labels.len()),
        ] {
            if count > MAX_ENTRIES {
                push(
                    what,
                    Err(format!("at most {MAX_ENTRIES} entries, got {count}")),
                );
            }
        }
        for (i, u) in self.ulimits.iter().enumerate() {
            let r = if u.soft < -1 || u.hard < -1 {
                Err(format!(
                    "--ulimit {}: limits are -1 (unlimited) or at least 0",
                    u.name
                ))
            } else if u.hard != -1 && (u.soft == -1 || u.soft > u.hard) {
                Err(format!(
                    "--ulimit {}: the soft limit ({}) must not exceed the hard limit ({})",
                    u.name, u.soft, u.hard
                ))
            } else {
                Ok(())
            };
            push(&format!("ulimits[{i}]"), r);
        }
        for (i, (name, _)) in self.env.iter().enumerate() {
            if !is_valid_env_name(name) {
                push(
                    &format!("env[{i}]"),
                    Err(format!(
                        "--env: `{name}` is not a valid environment variable name"
                    )),
                );
            }
        }
        if let Some(user) = &self.user {
            let ok = match user.split_once(':') {
                Some((u, g)) => is_valid_user_part(u) && is_valid_user_part(g),
                None => is_valid_user_part(user),
            };
            if !ok {
                push(
                    "user",
                    Err(format!(
                        "--user: expected NAME|UID[:GROUP|GID], got `{user}`"
                    )),
                );
            }
        }
        if let Some(w) = &self.workdir
            && (!w.starts_with('/') || w.len() > 4096)
        {
            push(
                "workdir",
                Err(format!("--workdir: expected an absolute path, got `{w}`")),
            );
        }
        for (i, (path, opts)) in self.tmpfs.iter().enumerate() {
            let r = if !path.starts_with('/') || path == "/" || path.len() > 4096 {
                Err(format!(
                    "--tmpfs expects an absolute path other than /, got `{path}`"
                ))
            } else if path == crate::job::RESERVED_DIR || path.starts_with("/drover/") {
                Err(format!("--tmpfs {path}: {path} is reserved for Drover"))
            } else {
                check_tmpfs_options(opts)
            };
            push(&format!("tmpfs[{i}]"), r);
        }
        for (i, (key, value)) in self.labels.iter().enumerate() {
            let lower = key.to_ascii_lowercase();
            let r = if key.is_empty()
                || key.len() > 256
                || key
                    .chars()
                    .any(|c| c == '=' || c.is_whitespace() || c.is_control())
            {
                Err(format!("--label: `{key}` is not a valid label key"))
            } else if let Some(p) = RESERVED_LABEL_PREFIXES
                .iter()
                .find(|p| lower.starts_with(*p))
            {
                Err(format!("--label {key}: the {p} label prefix is reserved"))
            } else if value.len() > 4096 {
                Err(format!(
                    "--label {key}: the value is longer than 4096 bytes"
                ))
            } else {
                Ok(())
            };
            push(&format!("labels[{i}]"), r);
        }
        if let Some(t) = self.stop_timeout
            && t > MAX_STOP_TIMEOUT_SECONDS
        {
            push(
                "stop_timeout",
                Err(format!(
                    "--stop-timeout: must be at most {MAX_STOP_TIMEOUT_SECONDS} seconds, got {t}"
                )),
            );
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses and checks, as a job's docker_args are.
    fn parse(s: &str) -> Result<DockerArgs, String> {
        let args = parse_docker_args(&split_words(s).unwrap())?;
        match args.check("resources.docker_args").first() {
            Some(e) => Err(e.message.clone()),
            None => Ok(args),
        }
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            split_words(r#"--env "A=b c" -e 'X=y z' --memory=1g a\ b"#).unwrap(),
            vec!["--env", "A=b c", "-e", "X=y z", "--memory=1g", "a b"]
        );
        assert!(split_words("--env 'open").is_err());
    }

    #[test]
    fn safe_flags_are_read() {
        let a = parse(
            "--memory 64m --cpus=1.5 --ulimit memlock=-1:-1 --ulimit nofile=1024 -e A=1 \
             --ipc=shareable --shm-size 2g --pids-limit 100 --read-only --tmpfs /scratch:size=1g",
        )
        .unwrap();
        assert_eq!(a.memory, Some(64 << 20));
        assert_eq!(a.cpus, Some(1.5));
        assert_eq!(
            a.ulimits,
            vec![
                Ulimit {
                    name: UlimitName::Memlock,
                    soft: -1,
                    hard: -1
                },
                Ulimit {
                    name: UlimitName::Nofile,
                    soft: 1024,
                    hard: 1024
                }
            ]
        );
        assert_eq!(a.env, vec![("A".to_string(), "1".to_string())]);
        assert_eq!(a.ipc, Some(IpcMode::Shareable));
        assert_eq!(a.shm_size, Some(2 << 30));
        assert_eq!(a.pids_limit, Some(100));
        assert!(a.read_only);
        assert_eq!(a.tmpfs, vec![("/scratch".into(), "size=1g".into())]);
    }

    #[test]
    fn dangerous_flags_are_refused_with_reason() {
        for (args, expect) in [
            ("--privileged", "--privileged is not allowed"),
            ("--cap-add SYS_ADMIN", "--cap-add is not allowed"),
            ("-v /:/host", "-v is not allowed: mounts host paths"),
            ("--volume=/etc:/etc", "--volume is not allowed"),
            ("--mount type=bind,src=/,dst=/h", "--mount is not allowed"),
            ("--pid=host", "--pid is not allowed"),
            ("--network host", "--network is not allowed"),
            ("--ipc=host", "--ipc=host is not allowed"),
            ("--device /dev/sda", "--device is not allowed"),
            (
                "--security-opt seccomp=unconfined",
                "--security-opt is not allowed",
            ),
            ("--gpus all", "use drover.gpus_per_instance"),
            ("--frobnicate 1", "--frobnicate is not supported"),
            ("--memory", "--memory expects a value"),
            ("--memory lots", "--memory: expected a size"),
            ("python train.py", "unexpected argument `python`"),
            ("--label drover.job=x", "reserved"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(expect), "{args}: {err}");
        }
    }
}
