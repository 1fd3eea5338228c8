//! A top-level `type: parallel` job on a local cluster, as Azure ML's
//! batch-scoring examples write it: an `mltable` of delimited rows read in
//! `10kb` mini-batches by two workers, scored with a model trained with
//! Debian's python3-sklearn, the returned rows appended to one output.

use std::collections::BTreeSet;
use std::time::Duration;

use drover_tests::{JobDir, LocalUp, require_image};

const ROWS: usize = 2000;

const DOCKERFILE: &str = "FROM drover/base:bookworm\nRUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-sklearn python3-pandas && rm -rf /var/lib/apt/lists/*\n";

const SCORE: &str = r#"
import argparse
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

def init():
    global model, args
    p = argparse.ArgumentParser()
    p.add_argument("--threshold", type=float, default=0.0)
    args, _ = p.parse_known_args()
    rng = np.random.default_rng(7)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] + x[:, 1] > args.threshold).astype(int)
    model = LogisticRegression().fit(x, y)
    print("model trained", flush=True)

def run(mini_batch):
    scores = model.predict(mini_batch[["x1", "x2"]].to_numpy())
    return pd.DataFrame({"id": mini_batch["id"], "label": scores})
"#;

const MLTABLE: &str = "type: mltable\npaths:\n  - file: ./rows.csv\ntransformations:\n  - read_delimited:\n      delimiter: ','\n      header: all_files_same_headers\n      encoding: utf8\n";

const JOB: &str = r#"$schema: https://azuremlschemas.azureedge.net/latest/parallelJob.schema.json
type: parallel
display_name: score rows
inputs:
  rows:
    type: mltable
    path: ./table
outputs:
  scores:
    type: uri_folder
input_data: ${{inputs.rows}}
mini_batch_size: "10kb"
resources:
  instance_count: 1
max_concurrency_per_instance: 2
mini_batch_error_threshold: 0
retry_settings:
  max_retries: 1
  timeout: 120
logging_level: INFO
task:
  type: run_function
  code: ./src
  entry_script: score.py
  environment:
    build:
      path: ./env
  program_arguments: --threshold 0.0
  append_row_to: ${{outputs.scores}}
"#;

#[test]
fn a_parallel_job_scores_a_table_with_sklearn_one_output_row_per_input_row() {
    require_image("drover/base:bookworm");
    let up = LocalUp::up(&["--max-nodes", "1"]);
    let dir = JobDir::new("");
    dir.write("env/Dockerfile", DOCKERFILE);
    dir.write("src/score.py", SCORE);
    dir.write("table/MLTable", MLTABLE);
    let mut csv = String::from("id,x1,x2\n");
    for i in 0..ROWS {
        let (a, b) = ((i % 17) as f64 / 8.0 - 1.0, (i % 13) as f64 / 6.0 - 1.0);
        csv.push_str(&format!("{i},{a:.4},{b:.4}\n"));
    }
    assert!(csv.len() > 30 * 1024, "several 10kb mini-batches");
    dir.write("table/rows.csv", &csv);
    dir.write("parallel.yml", JOB);

    let out = up.cli(&[
        "job",
        "create",
        "-f",
        &dir.path("parallel.yml").display().to_string(),
        "-c",
        &up.cluster,
        "--json",
    ]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("Drover convenience"),
        "the CLI says so: {said}"
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).expect("job json");
    let job = created["id"].as_str().expect("job id").to_string();
    // The first run builds the sklearn environment (minutes; cached after).
    up.wait_job_state(&job, "completed", Duration::from_secs(900));
    let logs = up.cli_ok(&["job", "logs", &job]);
    assert!(logs.contains("drover-parallel: progress"), "{logs}");
    assert!(logs.contains("0 failed, "), "{logs}");
    // The runtime's last progress line is the job's progress, in `show`
    // and in the server's metrics.
    let shown = up.job(&job);
    let progress = &shown["progress"];
    assert_eq!(progress["failed"], 0, "{shown}");
    assert!(progress["total"].as_u64().is_some_and(|t| t > 0), "{shown}");
    assert_eq!(progress["done"], progress["total"], "{shown}");
    assert_eq!(progress["items"], 2000, "{shown}");
    let text = up.cli_ok(&["job", "show", &job]);
    assert!(
        text.contains("progress:") && text.contains("(0 failed), 2000 items"),
        "{text}"
    );
    assert!(
        up.metrics()
            .contains("drover_server_minibatches_total{cluster="),
        "{}",
        up.metrics()
    );

    let down = tempfile::tempdir().expect("tempdir");
    up.cli_ok(&[
        "job",
        "download",
        "-n",
        &job,
        "--all",
        "--download-path",
        &down.path().display().to_string(),
    ]);
    let output = std::fs::read_to_string(
        down.path()
            .join("named-outputs/scores/parallel_run_step.txt"),
    )
    .expect("the appended output");
    let mut ids = BTreeSet::new();
    for line in output.lines() {
        let mut fields = line.split(' ');
        let id: usize = fields
            .next()
            .and_then(|f| f.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        let label = fields.next().unwrap_or_default();
        assert!(label == "0" || label == "1", "{line}");
        assert!(ids.insert(id), "row {id} appears twice");
    }
    assert_eq!(ids.len(), ROWS, "one output row per input row");
    assert_eq!(ids.iter().next_back(), Some(&(ROWS - 1)));
    let artifacts = down.path().join("artifacts/logs");
    let result = std::fs::read_to_string(artifacts.join("job_result.txt")).expect("job_result.txt");
    assert!(result.contains("The job succeeded"), "{result}");
    let report =
        std::fs::read_to_string(artifacts.join("sys/job_report/processed_mini-batches.csv"))
            .expect("processed_mini-batches.csv");
    let batches = report.lines().count() - 1;
    assert!(batches >= 3, "{report}");
    let stdout_dir = std::fs::read_dir(artifacts.join("user/stdout"))
        .expect("user/stdout")
        .next()
        .expect("a node folder")
        .expect("entry")
        .path();
    let trained =
        std::fs::read_to_string(stdout_dir.join("process001.stdout.txt")).unwrap_or_default();
    assert!(trained.contains("model trained"), "{trained}");
}
