//! `resources.docker_args`: the safe subset of `docker run` flags a job may set.
//!
//! Azure ML passes `docker_args` straight to `docker run`. Drover runs jobs on
//! shared nodes with an agent that holds the node's identity, so it accepts
//! only flags that shape the job's own container (limits, environment, IPC)
//! and refuses the ones that widen what the container can reach (privileges,
//! host namespaces, host mounts, devices). Each refusal says what to use
//! instead where Drover has a safe equivalent.

use serde::{Deserialize, Serialize};

use crate::units::parse_bytes;

/// A resource limit (`--ulimit name=soft[:hard]`); `-1` means unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    /// Limit name as Docker spells it (`memlock`, `nofile`, `stack`).
    pub name: String,
    /// Soft limit, -1 for unlimited.
    pub soft: i64,
    /// Hard limit, -1 for unlimited.
    pub hard: i64,
}

/// The container settings a job's `docker_args` asked for.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// `--ipc`: `private`, `shareable` or `none`.
    pub ipc: Option<String>,
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
        name: name.to_string(),
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
            "--ipc" => {
                let v = value()?;
                match v.as_str() {
                    "private" | "shareable" | "none" => out.ipc = Some(v),
                    "host" => {
                        return Err(
                            "--ipc=host is not allowed: it shares the node's IPC namespace; \
                             set resources.shm_size for a large /dev/shm"
                                .into(),
                        );
                    }
                    other => {
                        return Err(format!(
                            "--ipc: expected private, shareable or none, got {other}"
                        ));
                    }
                }
            }
            "-u" | "--user" => out.user = Some(value()?),
            "-w" | "--workdir" => out.workdir = Some(value()?),
            "--tmpfs" => {
                let v = value()?;
                let (path, opts) = v.split_once(':').unwrap_or((v.as_str(), ""));
                if !path.starts_with('/') {
                    return Err(format!("--tmpfs expects an absolute path, got {path}"));
                }
                out.tmpfs.push((path.to_string(), opts.to_string()));
            }
            "-l" | "--label" => {
                let v = value()?;
                let kv = key_value(&flag, &v)?;
                if kv.0.starts_with("drover.") {
                    return Err(format!(
                        "--label {}: the drover. label prefix is reserved",
                        kv.0
                    ));
                }
                out.labels.push(kv);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<DockerArgs, String> {
        parse_docker_args(&split_words(s).unwrap())
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
                    name: "memlock".into(),
                    soft: -1,
                    hard: -1
                },
                Ulimit {
                    name: "nofile".into(),
                    soft: 1024,
                    hard: 1024
                }
            ]
        );
        assert_eq!(a.env, vec![("A".to_string(), "1".to_string())]);
        assert_eq!(a.ipc.as_deref(), Some("shareable"));
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
