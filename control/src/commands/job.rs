//! `drover job create|list|show|cancel|logs`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use drover_api::cluster::JobState;
use drover_api::job::ParallelProgress;
use drover_api::wire;
use drover_api::{JobSpec, SetOverride};
use reqwest::Method;

use super::client::{Client, ClientArgs, encode, print_json};
use super::files;
use super::output::{ago, or_dash, table};
use drover_control::output;
use drover_control::server::now;

/// `drover job …`.
#[derive(clap::Args)]
pub struct JobArgs {
    #[command(subcommand)]
    command: JobCommand,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(clap::Subcommand)]
enum JobCommand {
    /// Submit a job (Azure ML YAML) to a cluster's queue.
    Create {
        /// The job file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// The cluster (overrides `compute:` in the file).
        #[arg(long, short = 'c')]
        compute: Option<String>,
        /// The job's name (overrides `name:`; generated when neither is given).
        #[arg(long, short = 'n')]
        name: Option<String>,
        /// Override a key of the YAML: `--set resources.instance_count=2`
        /// (repeatable), as `az ml job create --set`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Follow the job's logs until it ends; exit 0 only if it completed
        /// (as `az ml job create --stream`).
        #[arg(long, short = 's')]
        stream: bool,
        /// Azure ML's studio link; Drover has none (refused with what to do).
        #[arg(long, short = 'w')]
        web: bool,
    },
    /// List jobs.
    List {
        /// Only this cluster's.
        #[arg(long, short = 'c')]
        compute: Option<String>,
    },
    /// Show a job, its parts and its outputs.
    Show(JobName),
    /// Download a job's outputs (`az ml job download`): the default output
    /// (the working directory's ./outputs and ./logs) to DIR/artifacts, named
    /// outputs to DIR/named-outputs/NAME.
    Download {
        #[command(flatten)]
        job: JobName,
        /// One named output (`default` for the artifacts).
        #[arg(long)]
        output_name: Option<String>,
        /// Every output: the artifacts and each named output.
        #[arg(long, conflicts_with = "output_name")]
        all: bool,
        /// Where to put them (default: the current directory).
        #[arg(long, short = 'p')]
        download_path: Option<PathBuf>,
        /// The attempt whose outputs to fetch (default: the latest).
        #[arg(long)]
        attempt: Option<u32>,
    },
    /// Follow a job's logs until it ends (`az ml job stream`).
    Stream(JobName),
    /// Cancel a job.
    Cancel(JobName),
    /// Print a job's logs.
    Logs {
        #[command(flatten)]
        job: JobName,
        /// Keep printing new lines until the job ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// The attempt whose lines to print (default: the current one; a
        /// follower moves on to a new attempt when the job is requeued).
        #[arg(long)]
        attempt: Option<u32>,
    },
}

/// The job a command is about: positional (`show job-1`) or `-n job-1`.
#[derive(clap::Args)]
struct JobName {
    /// The job.
    #[arg(required_unless_present = "name")]
    job: Option<String>,
    /// The job (the Azure CLI's spelling).
    #[arg(long, short = 'n', conflicts_with = "job")]
    name: Option<String>,
    /// Azure ML's studio link; Drover has none (refused with what to do).
    #[arg(long, short = 'w')]
    web: bool,
}

impl JobName {
    fn get(&self) -> anyhow::Result<String> {
        refuse_web(self.web)?;
        Ok(self
            .name
            .clone()
            .or_else(|| self.job.clone())
            .unwrap_or_default())
    }
}

/// `--web` opens Azure ML studio in a browser; there is no studio here.
fn refuse_web(web: bool) -> anyhow::Result<()> {
    if web {
        bail!(
            "--web opens Azure ML studio, which Drover does not have: follow the job with --stream or `drover job stream -n NAME`, and see it with `drover job show -n NAME`"
        );
    }
    Ok(())
}

/// Runs a `drover job` command.
pub async fn run(args: JobArgs) -> anyhow::Result<i32> {
    let client = Client::new(&args.client)?;
    let json = args.client.json;
    match args.command {
        JobCommand::Create {
            file,
            compute,
            name,
            set,
            stream,
            web,
        } => {
            refuse_web(web)?;
            let job = create(&client, &file, compute, name, &set, json, stream).await?;
            if !stream {
                return Ok(0);
            }
            stream_job(&client, &job, json).await
        }
        JobCommand::Stream(j) => stream_job(&client, &j.get()?, json).await,
        JobCommand::List { compute } => {
            let path = match &compute {
                Some(c) => format!("/v1/jobs?compute={}", encode(c)),
                None => "/v1/jobs".to_string(),
            };
            let list: wire::JobList = client
                .call(Method::GET, &path, None::<&()>)
                .await
                .context("cannot list jobs")?;
            if json {
                print_json(&list)?;
            } else {
                let t = now();
                let rows: Vec<Vec<String>> = list
                    .jobs
                    .iter()
                    .map(|j| {
                        vec![
                            j.id.clone(),
                            j.cluster.clone(),
                            j.state.to_string(),
                            j.instance_count.to_string(),
                            format!("{}/{}", j.attempt, j.max_attempts),
                            ago(j.submitted_at, t),
                        ]
                    })
                    .collect();
                output::print(&table(
                    &[
                        "NAME",
                        "COMPUTE",
                        "STATE",
                        "INSTANCES",
                        "ATTEMPT",
                        "SUBMITTED",
                    ],
                    &rows,
                ))?;
            }
            Ok(0)
        }
        JobCommand::Show(j) => {
            let name = j.get()?;
            let job = get_job(&client, &name).await?;
            if json {
                print_json(&job)?;
            } else {
                // A job whose outputs cannot be read is still shown.
                let outputs = get_outputs(&client, &name, None).await.ok();
                output::print(&show(&job, outputs.as_ref()))?;
            }
            Ok(0)
        }
        JobCommand::Download {
            job,
            output_name,
            all,
            download_path,
            attempt,
        } => {
            let name = job.get()?;
            let wanted = match (all, output_name) {
                (true, _) => files::Wanted::All,
                (false, Some(o)) if o == drover_api::files::DEFAULT_OUTPUT => {
                    files::Wanted::Default
                }
                (false, Some(o)) => files::Wanted::Named(o),
                (false, None) => files::Wanted::Default,
            };
            let info = get_job(&client, &name).await?;
            let outputs = get_outputs(&client, &name, attempt).await?;
            let dir = download_path.unwrap_or_else(|| PathBuf::from("."));
            let (count, bytes) =
                files::download_outputs(&outputs, &wanted, &dir, &client.blobs()).await?;
            if !info.state.is_terminal() {
                output::note(format_args!(
                    "drover: job {name} is {}; a part's outputs arrive when it ends",
                    info.state
                ));
            }
            if json {
                print_json(&serde_json::json!({
                    "job": name,
                    "attempt": outputs.attempt,
                    "files": count,
                    "bytes": bytes,
                    "download_path": dir,
                }))?;
            } else {
                output::println(format_args!(
                    "downloaded {count} files ({}) of job {name} to {}",
                    super::output::bytes(bytes),
                    dir.display()
                ))?;
            }
            Ok(0)
        }
        JobCommand::Cancel(j) => {
            let name = j.get()?;
            let job: wire::JobInfo = client
                .call(
                    Method::POST,
                    &format!("/v1/jobs/{}/cancel", encode(&name)),
                    None::<&()>,
                )
                .await
                .with_context(|| format!("cannot cancel job {name}"))?;
            if json {
                print_json(&job)?;
            } else {
                output::println(format_args!("job {name} is {}", job.state))?;
            }
            Ok(0)
        }
        JobCommand::Logs {
            job,
            follow,
            attempt,
        } => logs(&client, &job.get()?, follow, attempt, json).await,
    }
}

/// Follows `job`'s logs until it ends; exit status 0 only if it completed
/// (`az ml job create --stream`, `az ml job stream`), else node rank 0's
/// exit code when it has one (an MPI job's is its `mpirun`'s), else 1.
async fn stream_job(client: &Client, job: &str, json: bool) -> anyhow::Result<i32> {
    logs(client, job, true, None, json).await?;
    let end = get_job(client, job).await?;
    output::note(format_args!("job {job} {}", end.state));
    Ok(exit_status(&end))
}

/// The exit status `--stream` ends with for a job that has ended.
fn exit_status(end: &wire::JobInfo) -> i32 {
    if end.state == JobState::Completed {
        return 0;
    }
    end.parts
        .iter()
        .find(|p| p.attempt == end.attempt && p.node_rank == 0)
        .and_then(|p| p.exit_code)
        .and_then(|c| i32::try_from(c).ok())
        .filter(|c| (1..=255).contains(c))
        .unwrap_or(1)
}

async fn get_outputs(
    client: &Client,
    name: &str,
    attempt: Option<u32>,
) -> anyhow::Result<drover_api::files::JobOutputs> {
    let query = attempt.map(|a| format!("?attempt={a}")).unwrap_or_default();
    client
        .call(
            Method::GET,
            &format!("/v1/jobs/{}/outputs{query}", encode(name)),
            None::<&()>,
        )
        .await
        .with_context(|| format!("cannot list the outputs of job {name}"))
}

async fn get_job(client: &Client, name: &str) -> anyhow::Result<wire::JobInfo> {
    client
        .call(
            Method::GET,
            &format!("/v1/jobs/{}", encode(name)),
            None::<&()>,
        )
        .await
        .with_context(|| format!("cannot show job {name}"))
}

async fn create(
    client: &Client,
    file: &Path,
    compute: Option<String>,
    name: Option<String>,
    set: &[String],
    json: bool,
    stream: bool,
) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    // Relative paths in the job resolve against its folder, as `drover run` does.
    let base = std::path::absolute(file)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let sets = set
        .iter()
        .map(|s| s.parse::<SetOverride>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("--set: {e}"))?;
    let parsed = JobSpec::from_yaml_with(&file.display().to_string(), &text, &base, &sets)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("invalid job definition")?;
    for w in &parsed.warnings {
        output::note(format_args!("warning: {w}"));
    }
    let mut spec = parsed.spec;
    if let Some(name) = name {
        spec.set_name(name);
        spec.validate()
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("invalid --name")?;
    }
    let JobSpec::Command(job) = &mut spec;
    let origin = files::Origin {
        file: &file.display().to_string(),
        lines: &parsed.lines,
    };
    files::upload_job_files(job, &client.blobs(), &origin).await?;
    let job: wire::JobInfo = client
        .call(
            Method::POST,
            "/v1/jobs",
            Some(&wire::JobSubmit { spec, compute }),
        )
        .await
        .with_context(|| format!("cannot submit {}", file.display()))?;
    if json && stream {
        // The log lines that follow are JSON lines: the job is one line too.
        output::println(serde_json::to_string(&job).context("cannot encode the answer as json")?)?;
    } else if json {
        print_json(&job)?;
    } else {
        output::println(format_args!(
            "job {} queued on cluster {}",
            job.id, job.cluster
        ))?;
    }
    Ok(job.id)
}

/// `job show` as text.
fn show(j: &wire::JobInfo, outputs: Option<&drover_api::files::JobOutputs>) -> String {
    let t = now();
    let mut out = String::new();
    let mut kv = |k: &str, v: String| out.push_str(&format!("{k:<16}{v}\n"));
    kv("name:", j.id.clone());
    kv("compute:", j.cluster.clone());
    kv("state:", j.state.to_string());
    kv("instances:", j.instance_count.to_string());
    kv("attempt:", format!("{} of {}", j.attempt, j.max_attempts));
    kv("submitted:", ago(j.submitted_at, t));
    kv("started:", or_dash(j.started_at.map(|s| ago(s, t))));
    kv("ended:", or_dash(j.ended_at.map(|s| ago(s, t))));
    if let Some(r) = &j.failure_reason {
        kv("reason:", r.clone());
    }
    if let Some(w) = &j.waiting_reason {
        kv("waiting:", w.clone());
    }
    if let Some(p) = &j.progress {
        let of = if p.attempt == j.attempt {
            String::new()
        } else {
            format!(" (attempt {})", p.attempt)
        };
        kv("progress:", format!("{} {p}{of}", p.bar(20)));
    }
    if let Some(job) = j.spec.as_ref().and_then(|s| s.as_command()) {
        kv("image:", job.image.clone());
        if let Some(env) = &job.environment {
            let from = match (&env.name, &env.label) {
                (Some(_), Some(label)) => format!("{} (from @{label})", env.describe()),
                (Some(_), None) => env.describe(),
                (None, _) => "inline build".to_string(),
            };
            kv("environment:", from);
        }
        kv("command:", job.command.clone());
    }
    if !j.parts.is_empty() {
        out.push('\n');
        let rows: Vec<Vec<String>> = j
            .parts
            .iter()
            .map(|p| {
                vec![
                    p.attempt.to_string(),
                    p.node_rank.to_string(),
                    p.node.clone(),
                    p.state.to_string(),
                    or_dash(p.exit_code),
                ]
            })
            .collect();
        out.push_str(&table(&["ATTEMPT", "RANK", "NODE", "STATE", "EXIT"], &rows));
    }
    if let Some(o) = outputs.filter(|o| !o.outputs.is_empty()) {
        out.push('\n');
        let rows: Vec<Vec<String>> = o
            .outputs
            .iter()
            .map(|x| {
                let mut notes = Vec::new();
                if !x.conflicts.is_empty() {
                    notes.push(format!("{} paths written by two nodes", x.conflicts.len()));
                }
                if !x.skipped.is_empty() {
                    notes.push(format!(
                        "{} not uploaded (links or unreadable)",
                        x.skipped.len()
                    ));
                }
                if let Some(d) = &x.destination {
                    notes.push(format!("also at {d}"));
                }
                vec![
                    x.name.clone(),
                    x.files.len().to_string(),
                    super::output::bytes(x.bytes),
                    or_dash((!notes.is_empty()).then(|| notes.join("; "))),
                ]
            })
            .collect();
        out.push_str(&format!("outputs of attempt {}:\n", o.attempt));
        out.push_str(&table(&["OUTPUT", "FILES", "SIZE", "NOTES"], &rows));
    }
    out
}

/// How often a follower asks a queued job why it waits.
const WAITING_POLL: Duration = Duration::from_secs(1);

/// Prints, on stderr, why a followed job waits: when a reason first appears
/// and whenever it changes, so a job that cannot start is not silence.
#[derive(Default)]
struct WaitingNotes {
    last: Option<String>,
}

impl WaitingNotes {
    /// The line to print for the job's latest reason, if it is news.
    fn note(&mut self, reason: Option<&str>) -> Option<String> {
        let reason = reason?;
        if self.last.as_deref() == Some(reason) {
            return None;
        }
        self.last = Some(reason.to_string());
        Some(format!("queued: {reason}"))
    }
}

/// Whether a job's log lines say which node and process wrote them: a job
/// of more than one node, or whose nodes start more than one process each.
fn multi_process(job: &wire::JobInfo) -> bool {
    let procs = job
        .spec
        .as_ref()
        .and_then(|s| s.as_command())
        .map_or(1, |c| c.processes_started_per_instance());
    job.instance_count > 1 || procs > 1
}

/// One page of log lines as `job logs` prints them: each line with its
/// prefix, or (`json`) one JSON document per line; with `bars` (`--stream`)
/// the parallel runtime's progress lines are drawn as progress bars.
fn render_lines(
    lines: &[wire::LogLine],
    multi: bool,
    json: bool,
    bars: bool,
) -> anyhow::Result<String> {
    let mut out = String::new();
    for l in lines {
        if json {
            out.push_str(&serde_json::to_string(l).context("cannot encode a log line")?);
        } else {
            out.push_str(&output::line_prefix(multi, l.node_rank, l.rank));
            match ParallelProgress::parse_line(&l.text, l.attempt).filter(|_| bars) {
                Some(p) => out.push_str(&format!("drover-parallel: {} {p}", p.bar(30))),
                None => out.push_str(&l.text),
            }
        }
        out.push('\n');
    }
    Ok(out)
}

async fn logs(
    client: &Client,
    name: &str,
    follow: bool,
    attempt: Option<u32>,
    json: bool,
) -> anyhow::Result<i32> {
    let job = get_job(client, name).await?;
    let multi = multi_process(&job);
    let mut waiting = WaitingNotes::default();
    if follow && let Some(line) = waiting.note(job.waiting_reason.as_deref()) {
        output::note(line);
    }
    let mut asked = std::time::Instant::now();
    let mut from = 0u64;
    let mut shown_attempt: Option<u32> = None;
    let only = attempt.map(|a| format!("&attempt={a}")).unwrap_or_default();
    loop {
        let page: wire::LogPage = client
            .call(
                Method::GET,
                &format!("/v1/jobs/{}/logs?from={from}{only}", encode(name)),
                None::<&()>,
            )
            .await
            .with_context(|| format!("cannot read the logs of job {name}"))?;
        // Each attempt has its own log: say which one this is, and when a
        // requeued job moves on to the next.
        if !json && page.attempt > 0 && shown_attempt != Some(page.attempt) {
            if shown_attempt.is_some() || page.attempts > 1 {
                output::note(format_args!(
                    "(attempt {} of the job{})",
                    page.attempt,
                    if page.attempt < page.attempts {
                        format!("; the current one is {}, see --attempt", page.attempts)
                    } else {
                        String::new()
                    }
                ));
            }
            shown_attempt = Some(page.attempt);
        }
        if page.first_seq > from && from < page.end_seq {
            output::note(format_args!(
                "({} earlier lines were dropped by the log cap)",
                page.first_seq - from
            ));
        }
        // A page in one write; a closed pipe ends the command quietly.
        output::print(&render_lines(&page.lines, multi, json, follow)?)?;
        from = page.next_seq;
        let caught_up = page.next_seq >= page.end_seq;
        // A follower of an older attempt has all of it.
        let old_attempt = attempt.is_some_and(|a| a < page.attempts);
        if caught_up && (!follow || page.job_state.is_terminal() || old_attempt) {
            return Ok(0);
        }
        if caught_up {
            if page.job_state == JobState::Queued && asked.elapsed() >= WAITING_POLL {
                asked = std::time::Instant::now();
                let job = get_job(client, name).await?;
                if let Some(line) = waiting.note(job.waiting_reason.as_deref()) {
                    output::note(line);
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(node_rank: u32, rank: Option<u32>, text: &str) -> wire::LogLine {
        wire::LogLine {
            seq: 0,
            at: drover_api::cluster::Timestamp(0),
            attempt: 1,
            node_rank,
            stream: wire::LogStream::Stdout,
            text: text.into(),
            rank,
        }
    }

    #[test]
    fn log_lines_say_which_process_wrote_them_in_multi_process_jobs() {
        let lines = [line(0, Some(2), "a"), line(1, None, "b")];
        assert_eq!(
            render_lines(&lines, true, false, false).unwrap(),
            "[node 0 rank 2] a\n[node 1] b\n"
        );
        assert_eq!(
            render_lines(&lines[1..], false, false, false).unwrap(),
            "b\n"
        );
        let json = render_lines(&lines, true, true, false).unwrap();
        let docs: Vec<serde_json::Value> = json
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(docs.len(), 2, "one JSON document a line: {json}");
        assert_eq!(
            (docs[0]["rank"].as_u64(), docs[0]["text"].as_str()),
            (Some(2), Some("a"))
        );
    }

    #[test]
    fn a_followed_log_draws_the_parallel_runtimes_progress_as_a_bar() {
        let lines = [
            line(
                0,
                None,
                "drover-parallel: progress 5/10 mini-batches (1 failed), 40 items",
            ),
            line(0, None, "other"),
        ];
        assert_eq!(
            render_lines(&lines, false, false, true).unwrap(),
            "drover-parallel: [###############---------------] 5/10 mini-batches (1 failed), 40 items\nother\n"
        );
        // `job logs` shows the log as it was written.
        assert_eq!(
            render_lines(&lines, false, false, false).unwrap(),
            "drover-parallel: progress 5/10 mini-batches (1 failed), 40 items\nother\n"
        );
    }

    #[test]
    fn a_waiting_reason_is_printed_when_it_appears_and_when_it_changes() {
        let mut w = WaitingNotes::default();
        assert_eq!(w.note(None), None);
        assert_eq!(
            w.note(Some("waiting for 1 node: cluster cpu is resizing 0 → 1"))
                .as_deref(),
            Some("queued: waiting for 1 node: cluster cpu is resizing 0 → 1")
        );
        assert_eq!(
            w.note(Some("waiting for 1 node: cluster cpu is resizing 0 → 1")),
            None
        );
        assert_eq!(w.note(None), None);
        assert_eq!(
            w.note(Some("cluster cpu cannot reach 1 node: quota"))
                .as_deref(),
            Some("queued: cluster cpu cannot reach 1 node: quota")
        );
    }
}
