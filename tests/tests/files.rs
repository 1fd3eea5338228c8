//! Job files through a real cluster (a `drover server`, two `drover-agent`
//! processes, real Docker): code snapshots, inputs from a URL and from a
//! datastore, outputs and `drover job download`, and what a user is told
//! when any of them is wrong.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use drover_tests::cluster::{Cluster, parts};
use drover_tests::{BASE_IMAGE, unique_name, wait_until};

/// An image built by `images/build-offline.sh` that has python3 (the base
/// image is a minimal Debian without it).
const PYTHON_IMAGE: &str = "drover/openmpi:bookworm";

/// Files under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The blobs the server's artifact store holds (its default, a folder).
fn stored_blobs(c: &Cluster) -> usize {
    files_under(&c.server.data.path().join("srv/artifacts/blobs")).len()
}

/// A job folder with `job.yml` and the given files, in a folder of its own.
fn job_dir(yaml: &str, files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("job.yml"), yaml).expect("write job");
    for (rel, body) in files {
        let p = dir.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, body).expect("write");
    }
    dir
}

/// `drover job create -f DIR/job.yml`, run from another folder, as `name`.
fn submit(c: &Cluster, dir: &Path, name: &str) -> std::process::Output {
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let mut cmd = c.server.command(&[
        "job",
        "create",
        "-f",
        &dir.join("job.yml").display().to_string(),
        "--compute",
        &c.name,
        "--name",
        name,
    ]);
    cmd.current_dir(elsewhere.path());
    cmd.output().expect("drover job create")
}

fn submit_ok(c: &Cluster, dir: &Path, name: &str) -> String {
    let out = submit(c, dir, name);
    assert!(
        out.status.success(),
        "submitting failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Submits `dir/job.yml` as `name`, waits for the job to reach `state`, and
/// returns what the CLI said at submission and the job's logs.
fn run_job(c: &Cluster, dir: &Path, name: &str, state: &str) -> (String, String) {
    let said = submit_ok(c, dir, name);
    c.server
        .wait_job_state(name, state, Duration::from_secs(120));
    (said, c.server.cli_ok(&["job", "logs", name]))
}

fn sha256_of(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn code_reaches_every_node_as_its_working_directory_and_is_stored_once() {
    let c = Cluster::start(40);
    // Microsoft's hello-code, with a file .amlignore leaves out.
    let yaml = format!(
        "$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json\n\
         command: python3 hello.py; ls; test -e secret.txt && echo secret-is-there; pwd\n\
         code: src\nenvironment:\n  image: {PYTHON_IMAGE}\nresources:\n  instance_count: 2\n"
    );
    let dir = job_dir(
        &yaml,
        &[
            ("src/hello.py", b"import socket\nprint('hello from the code on', socket.gethostname() and 'a node')\n"),
            ("src/secret.txt", b"keep out\n"),
            ("src/.amlignore", b"secret.txt\n"),
        ],
    );
    let before = stored_blobs(&c);
    let first = unique_name("code");
    let (said, logs) = run_job(&c, dir.path(), &first, "completed");
    assert!(said.contains("uploaded code"), "{said}");
    for node in 0..2 {
        for expect in ["hello from the code on a node", "hello.py", "/drover/code"] {
            let line = format!("[node {node}] {expect}");
            assert!(
                logs.lines().any(|l| l == line),
                "{line} missing in:\n{logs}"
            );
        }
    }
    assert!(!logs.contains("secret"), "{logs}");
    let after_first = stored_blobs(&c);
    assert_eq!(after_first, before + 1, "one snapshot stored");

    // The same code again: nothing uploaded, nothing stored twice.
    let second = unique_name("code");
    let said = submit_ok(&c, dir.path(), &second);
    assert!(!said.contains("uploaded"), "{said}");
    c.server
        .wait_job_state(&second, "completed", Duration::from_secs(120));
    assert_eq!(stored_blobs(&c), after_first);
    c.assert_no_containers(&first);
    c.assert_no_containers(&second);
}

#[test]
fn outputs_and_artifacts_come_back_byte_identical_with_job_download() {
    let c = Cluster::start(40);
    let yaml = format!(
        "command: >-\n  head -c 3000000 /dev/urandom > ${{{{outputs.model}}}}/weights.bin &&\n  mkdir -p ${{{{outputs.model}}}}/sub && echo nested > ${{{{outputs.model}}}}/sub/n.txt &&\n  echo 'hello world' > ./outputs/helloworld.txt && echo step > ./logs/train.log &&\n  sha256sum ${{{{outputs.model}}}}/weights.bin\n\
         environment:\n  image: {BASE_IMAGE}\noutputs:\n  model:\n    type: uri_folder\n    mode: rw_mount\n"
    );
    let dir = job_dir(&yaml, &[]);
    let job = unique_name("out");
    let (_, logs) = run_job(&c, dir.path(), &job, "completed");
    let printed = logs
        .lines()
        .find(|l| l.contains("weights.bin"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    assert_eq!(printed.len(), 64, "{logs}");
    let show = c.server.cli_ok(&["job", "show", &job]);
    assert!(show.contains("outputs of attempt 1"), "{show}");
    assert!(show.lines().any(|l| l.starts_with("model ")), "{show}");

    let down = tempfile::tempdir().expect("tempdir");
    let d = down.path().display().to_string();
    c.server.cli_ok(&[
        "job",
        "download",
        "-n",
        &job,
        "--all",
        "--download-path",
        &d,
    ]);
    assert_eq!(
        std::fs::read_to_string(down.path().join("artifacts/outputs/helloworld.txt"))
            .unwrap_or_default(),
        "hello world\n"
    );
    assert_eq!(
        std::fs::read_to_string(down.path().join("artifacts/logs/train.log")).unwrap_or_default(),
        "step\n"
    );
    assert_eq!(
        sha256_of(&down.path().join("named-outputs/model/weights.bin")),
        printed
    );
    assert_eq!(
        std::fs::read_to_string(down.path().join("named-outputs/model/sub/n.txt"))
            .unwrap_or_default(),
        "nested\n"
    );
    // Without flags: the default output alone, as `az ml job download`.
    let only = tempfile::tempdir().expect("tempdir");
    c.server.cli_ok(&[
        "job",
        "download",
        "-n",
        &job,
        "--download-path",
        &only.path().display().to_string(),
    ]);
    assert!(
        only.path()
            .join("artifacts/outputs/helloworld.txt")
            .is_file()
    );
    assert!(!only.path().join("named-outputs").exists());
    let err = c
        .server
        .cli(&["job", "download", "-n", &job, "--output-name", "nope"]);
    assert!(!err.status.success());
    let msg = String::from_utf8_lossy(&err.stderr);
    assert!(
        msg.contains("no output named nope (its outputs: default, model)"),
        "{msg}"
    );
    c.assert_no_containers(&job);
}

#[test]
fn an_agent_killed_while_it_uploads_resumes_and_the_output_is_whole() {
    let c = Cluster::start(60);
    let yaml = format!(
        "command: head -c 200000000 /dev/urandom > ./outputs/big.bin && sha256sum ./outputs/big.bin\n\
         environment:\n  image: {BASE_IMAGE}\n"
    );
    let dir = job_dir(&yaml, &[]);
    let job = unique_name("big");
    submit_ok(&c, dir.path(), &job);
    let (_, i) = c.running_on(&job);
    let mut c = c;
    // Killed once the agent has begun to upload (its log says so).
    let uploading = wait_until(Duration::from_secs(120), || {
        c.agents[i].log_text().contains("uploading outputs")
    });
    assert!(uploading, "{}", c.agents[i].log_text());
    std::thread::sleep(Duration::from_millis(300));
    c.agents[i].kill9();
    assert_ne!(
        c.server.job_state(&job),
        "completed",
        "killed before it finished"
    );
    c.agents[i].spawn();
    c.server
        .wait_job_state(&job, "completed", Duration::from_secs(180));
    let logs = c.server.cli_ok(&["job", "logs", &job]);
    let printed = logs
        .lines()
        .find(|l| l.contains("big.bin"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    let down = tempfile::tempdir().expect("tempdir");
    c.server.cli_ok(&[
        "job",
        "download",
        "-n",
        &job,
        "--download-path",
        &down.path().display().to_string(),
    ]);
    let got = down.path().join("artifacts/outputs/big.bin");
    assert_eq!(
        std::fs::metadata(&got).map(|m| m.len()).unwrap_or(0),
        200_000_000
    );
    assert_eq!(sha256_of(&got), printed);
    c.assert_no_containers(&job);
}

/// An HTTP server on 127.0.0.1 serving one file with an ETag, counting the
/// full answers (200) and the revalidations (304) it gives.
struct FileServer {
    port: u16,
    full: Arc<AtomicUsize>,
    not_modified: Arc<AtomicUsize>,
}

impl FileServer {
    fn start(body: &'static [u8]) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let full = Arc::new(AtomicUsize::new(0));
        let not_modified = Arc::new(AtomicUsize::new(0));
        let (f, n) = (full.clone(), not_modified.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (f, n) = (f.clone(), n.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                    let mut stream = stream;
                    loop {
                        let mut request = String::new();
                        let mut line = String::new();
                        loop {
                            line.clear();
                            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                                return;
                            }
                            if line == "\r\n" {
                                break;
                            }
                            request.push_str(&line);
                        }
                        let lower = request.to_ascii_lowercase();
                        let answer = if lower.contains("if-none-match: \"v1\"") {
                            n.fetch_add(1, Ordering::SeqCst);
                            "HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 0\r\n\r\n"
                                .as_bytes()
                                .to_vec()
                        } else {
                            f.fetch_add(1, Ordering::SeqCst);
                            let mut a = format!(
                                "HTTP/1.1 200 OK\r\nETag: \"v1\"\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            a.extend_from_slice(body);
                            a
                        };
                        if stream.write_all(&answer).is_err() {
                            return;
                        }
                        let _ = reader.get_mut().read(&mut []);
                    }
                });
            }
        });
        FileServer {
            port,
            full,
            not_modified,
        }
    }
}

#[test]
fn a_url_input_is_downloaded_once_per_node_however_many_jobs_read_it() {
    let c = Cluster::start(40);
    let files = FileServer::start(b"sepal_length,species\n5.1,setosa\n");
    let yaml = format!(
        "command: cat ${{{{inputs.iris}}}}; ls ${{{{inputs.iris}}}}\nenvironment:\n  image: {BASE_IMAGE}\n\
         resources:\n  instance_count: 2\ninputs:\n  iris:\n    type: uri_file\n    path: http://127.0.0.1:{}/datasets/iris.csv\n",
        files.port
    );
    let dir = job_dir(&yaml, &[]);
    let mut jobs = Vec::new();
    for _ in 0..2 {
        let job = unique_name("url");
        let (_, logs) = run_job(&c, dir.path(), &job, "completed");
        for node in 0..2 {
            for line in ["5.1,setosa", "/drover/inputs/iris/iris.csv"] {
                let want = format!("[node {node}] {line}");
                assert!(logs.lines().any(|l| l == want), "{want} in {logs}");
            }
        }
        jobs.push(job);
    }
    // Each of the two nodes downloaded it once; the second job only asked
    // whether it changed.
    assert_eq!(files.full.load(Ordering::SeqCst), 2);
    assert_eq!(files.not_modified.load(Ordering::SeqCst), 2);
    for job in &jobs {
        c.assert_no_containers(job);
    }
}

#[test]
fn a_local_datastore_feeds_inputs_and_takes_outputs() {
    let c = Cluster::start(40);
    let store = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(store.path().join("datasets/iris")).expect("mkdir");
    std::fs::write(store.path().join("datasets/iris/a.csv"), "a\n").expect("write");
    std::fs::write(store.path().join("datasets/iris/b.csv"), "b\n").expect("write");
    let ds = job_dir(
        &format!(
            "name: shared_data\ntype: local\ndescription: a folder of the control plane's machine\npath: {}\n",
            store.path().display()
        ),
        &[],
    );
    let out = c.server.cli_ok(&[
        "datastore",
        "create",
        "-f",
        &ds.path().join("job.yml").display().to_string(),
    ]);
    assert!(out.contains("created datastore shared_data"), "{out}");
    let list = c.server.cli_ok(&["datastore", "list"]);
    assert!(list.contains("workspaceblobstore"), "{list}");
    assert!(list.contains("shared_data"), "{list}");

    let yaml = format!(
        "command: cat ${{{{inputs.data}}}}/a.csv ${{{{inputs.data}}}}/b.csv; echo scored > ${{{{outputs.scores}}}}/s.txt\n\
         environment:\n  image: {BASE_IMAGE}\ninputs:\n  data:\n    type: uri_folder\n    path: azureml://datastores/shared_data/paths/datasets/iris/\n    mode: download\n\
         outputs:\n  scores:\n    type: uri_folder\n    path: azureml://datastores/shared_data/paths/results/${{{{name}}}}/\n"
    );
    let dir = job_dir(&yaml, &[]);
    let job = unique_name("ds");
    let (_, logs) = run_job(&c, dir.path(), &job, "completed");
    assert!(
        logs.lines().any(|l| l == "a") && logs.lines().any(|l| l == "b"),
        "{logs}"
    );
    let exported = store.path().join(format!("results/{job}/s.txt"));
    assert!(
        wait_until(Duration::from_secs(30), || exported.is_file()),
        "output copied to the datastore: {:?}\n{}",
        files_under(store.path()),
        c.server.log_text()
    );
    assert_eq!(
        std::fs::read_to_string(&exported).unwrap_or_default(),
        "scored\n"
    );
    c.assert_no_containers(&job);
}

#[test]
fn bad_job_files_are_clear_errors_and_upload_nothing() {
    let c = Cluster::start(40);
    let before = stored_blobs(&c);
    let image = format!("environment:\n  image: {BASE_IMAGE}\n");

    // A code folder that is not there: the file and line, on this machine.
    let dir = job_dir(&format!("command: echo\n{image}code: ./src\n"), &[]);
    let out = submit(&c, dir.path(), &unique_name("bad"));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        msg.contains("job.yml:4: code: code folder") && msg.contains("src does not exist"),
        "{msg}"
    );

    // Code over Azure ML's 300 MB: its largest file named (a sparse file
    // costs no disk).
    let dir = job_dir(
        &format!("command: echo\n{image}code: ./src\n"),
        &[("src/train.py", b"")],
    );
    let big = std::fs::File::create(dir.path().join("src/checkpoint.pt")).expect("create");
    big.set_len(301 * 1024 * 1024).expect("sparse");
    let out = submit(&c, dir.path(), &unique_name("big"));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        msg.contains("job.yml:4: code:") && msg.contains("code may be at most 300.0 MiB"),
        "{msg}"
    );
    assert!(msg.contains("checkpoint.pt"), "{msg}");
    assert!(msg.contains(".amlignore"), "{msg}");

    // A datastore nobody registered: the server says which are known.
    let dir = job_dir(
        &format!(
            "command: echo\n{image}inputs:\n  d:\n    type: uri_folder\n    path: azureml://datastores/nosuch/paths/x\n"
        ),
        &[],
    );
    let out = submit(&c, dir.path(), &unique_name("ds"));
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(msg.contains("no datastore named nosuch"), "{msg}");
    assert!(msg.contains("workspaceblobstore"), "{msg}");
    assert_eq!(stored_blobs(&c), before, "nothing was uploaded");

    // A URL no one answers: the job fails, and says why, naming the input.
    let dir = job_dir(
        &format!(
            "command: cat ${{{{inputs.csv}}}}\n{image}inputs:\n  csv:\n    type: uri_file\n    path: http://127.0.0.1:9/x.csv\n"
        ),
        &[],
    );
    let job = unique_name("url");
    let (_, logs) = run_job(&c, dir.path(), &job, "failed");
    assert!(
        logs.contains("input csv") && logs.contains("http://127.0.0.1:9/x.csv"),
        "{logs}"
    );
    assert!(
        parts(&c.server.job(&job))
            .iter()
            .all(|p| p["state"] == "failed")
    );
    c.assert_no_containers(&job);
}

#[test]
fn code_and_outputs_travel_through_an_s3_artifact_store() {
    let moto = match drover_tests::moto::Moto::start() {
        Ok(m) => m,
        Err(why) => {
            println!("SKIPPED: no S3 API server to test against: {why}");
            return;
        }
    };
    moto.create_bucket("drover-e2e");
    let env = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = drover_tests::ServerProc::start_with(
        40,
        &["--artifacts", "s3://drover-e2e/team/artifacts"],
        &env,
    );
    let c = Cluster::start_on(server, &[]);
    let blobs = || {
        moto.keys("drover-e2e", "team/artifacts/")
            .iter()
            .filter(|k| k.contains("blobs/"))
            .count()
    };
    let yaml = format!(
        "command: >-\n  sh hello.sh && head -c 3000000 /dev/urandom > ${{{{outputs.model}}}}/weights.bin &&\n  echo 'hello world' > ./outputs/helloworld.txt && sha256sum ${{{{outputs.model}}}}/weights.bin\n\
         code: src\nenvironment:\n  image: {BASE_IMAGE}\nresources:\n  instance_count: 2\n\
         outputs:\n  model:\n    type: uri_folder\n"
    );
    let dir = job_dir(
        &yaml,
        &[("src/hello.sh", b"echo hello from the code in $(pwd)\n")],
    );
    let before = blobs();
    let job = unique_name("s3");
    let (said, logs) = run_job(&c, dir.path(), &job, "completed");
    assert!(said.contains("uploaded code"), "{said}");
    for node in 0..2 {
        let line = format!("[node {node}] hello from the code in /drover/code");
        assert!(
            logs.lines().any(|l| l == line),
            "{line} missing in:\n{logs}"
        );
    }
    let after = blobs();
    assert!(after > before, "blobs stored in the bucket: {after}");

    // The same code again: nothing new in the bucket for it.
    let again = unique_name("s3");
    let said = submit_ok(&c, dir.path(), &again);
    assert!(!said.contains("uploaded"), "{said}");

    // Node 0's weights (the lowest node rank's file is the one kept).
    let printed = logs
        .lines()
        .find(|l| l.starts_with("[node 0]") && l.contains("weights.bin"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_default()
        .to_string();
    assert_eq!(printed.len(), 64, "{logs}");
    let down = tempfile::tempdir().expect("tempdir");
    c.server.cli_ok(&[
        "job",
        "download",
        "-n",
        &job,
        "--all",
        "--download-path",
        &down.path().display().to_string(),
    ]);
    assert_eq!(
        std::fs::read_to_string(down.path().join("artifacts/outputs/helloworld.txt"))
            .unwrap_or_default(),
        "hello world\n"
    );
    assert_eq!(
        sha256_of(&down.path().join("named-outputs/model/weights.bin")),
        printed
    );
    c.server
        .wait_job_state(&again, "completed", Duration::from_secs(120));
    c.assert_no_containers(&job);
    c.assert_no_containers(&again);
}
