//! Job files through the control plane, against the file system's own
//! copy, side by side in one run:
//!
//! ```text
//! cargo run --release -p drover-tests --bin bench-files -- [--runs 3] [--mib 1024] [--code-mib 100]
//! ```
//!
//! Method.
//!
//! * **Output upload and fetch.** A file of `--mib` MiB in a temporary
//!   folder on the same disk as a release `drover server`'s data dir (its
//!   artifact store is the default, a local folder). Each run changes the
//!   file's first bytes, so every upload is of a blob the server does not
//!   have. Three timings per run, interleaved (cp, upload, fetch, then the
//!   next run): `cp` of the file to a new name in the same folder (the
//!   baseline); **upload** as an agent does it: `sha256_file` then
//!   `BlobClient::upload_file` (streamed over loopback HTTP, staged, hashed
//!   again and moved into the store by the server); **fetch** as `drover job
//!   download` does it: `BlobClient::download_to` (streamed, hashed as it is
//!   written, fsynced, renamed). The page cache is warm for all three (the
//!   file was just written), as it is for a part's outputs right after it
//!   ends.
//! * **A code snapshot already on the server.** A folder of `--code-mib`
//!   MiB (100 files) is submitted once with `drover job create` (uploaded),
//!   then the same job file with and without `code:` is submitted
//!   alternately (ABBA) `--runs` × 2 times each; the added cost of the code
//!   is the difference of the medians of the CLI's wall time.
//!
//! Prints Markdown for BENCHMARKS.md.

use std::io::{Seek, SeekFrom, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use drover_files::transfer::{BlobClient, BlobRoutes};
use drover_tests::{ServerProc, bench_arg, median, unique_name};

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

fn main() {
    let runs = bench_arg::<u64>("--runs", 3) as usize;
    let mib = bench_arg::<u64>("--mib", 1024);
    let code_mib = bench_arg::<u64>("--code-mib", 100);
    let server = ServerProc::start_release(30);
    let work = tempfile::tempdir_in(server.data.path()).expect("tempdir");

    // A file of pseudo-random bytes (not compressible, not sparse).
    let src = work.path().join("output.bin");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&src).expect("create"));
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).expect("write");
        }
        f.flush().expect("flush");
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .expect("http");
    let blobs = BlobClient::new(http, &server.url(), BlobRoutes::User, server.token.clone());

    let (mut cp, mut up, mut down) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .open(&src)
                .expect("open");
            f.seek(SeekFrom::Start(0)).expect("seek");
            f.write_all(format!("run {run} {}", unique_name("b")).as_bytes())
                .expect("write");
        }
        let copy = work.path().join("copy.bin");
        let t = Instant::now();
        let status = Command::new("cp")
            .arg(&src)
            .arg(&copy)
            .status()
            .expect("cp");
        assert!(status.success());
        cp.push(secs(t.elapsed()));
        std::fs::remove_file(&copy).expect("rm");

        let t = Instant::now();
        let blob = drover_files::sha256_file(&src).expect("hash");
        let done = rt
            .block_on(blobs.upload_file(&src, blob, &|_| {}))
            .expect("upload");
        assert!(!done.already_stored && done.sent == blob.size);
        up.push(secs(t.elapsed()));

        let fetched = work.path().join("fetched.bin");
        let t = Instant::now();
        rt.block_on(blobs.download_to(blob, &fetched, &|_| {}))
            .expect("download");
        down.push(secs(t.elapsed()));
        std::fs::remove_file(&fetched).expect("rm");
    }
    let (mcp, mup, mdown) = (median(&mut cp), median(&mut up), median(&mut down));

    // The code snapshot: upload once, then time submissions with and without it.
    let cluster = "bench-files";
    server.create_cluster(cluster, 1);
    let job_dir = tempfile::tempdir_in(server.data.path()).expect("tempdir");
    let src_dir = job_dir.path().join("src");
    std::fs::create_dir_all(&src_dir).expect("mkdir");
    let per_file = (code_mib << 20) / 100;
    for i in 0..100 {
        let body: Vec<u8> = (0..per_file).map(|b| (b as u8) ^ (i as u8)).collect();
        std::fs::write(src_dir.join(format!("f{i:03}.bin")), body).expect("write");
    }
    let with_code = job_dir.path().join("with-code.yml");
    let without = job_dir.path().join("without.yml");
    let body = format!(
        "command: echo hi\nenvironment:\n  image: drover/base:bookworm\ncompute: {cluster}\n"
    );
    std::fs::write(&with_code, format!("{body}code: src\n")).expect("write");
    std::fs::write(&without, &body).expect("write");
    let submit = |file: &std::path::Path| -> f64 {
        let t = Instant::now();
        let out = server.cli(&["job", "create", "-f", &file.display().to_string()]);
        assert!(
            out.status.success(),
            "submit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        secs(t.elapsed())
    };
    let first = submit(&with_code);
    let (mut with, mut plain) = (Vec::new(), Vec::new());
    for i in 0..runs * 2 {
        // ABBA: alternate which side goes first.
        if i % 2 == 0 {
            with.push(submit(&with_code));
            plain.push(submit(&without));
        } else {
            plain.push(submit(&without));
            with.push(submit(&with_code));
        }
    }
    let (mwith, mplain) = (median(&mut with), median(&mut plain));

    println!("| measure ({mib} MiB output, {runs} runs, medians) | seconds | vs `cp` |");
    println!("|---|---|---|");
    println!("| `cp` on the same disk (baseline) | {mcp:.3} | 1.00× |");
    println!(
        "| upload (hash + PUT, agent's path) | {mup:.3} | {:.2}× |",
        mup / mcp
    );
    println!(
        "| fetch (GET, hashed, fsynced; `job download`'s path) | {mdown:.3} | {:.2}× |",
        mdown / mcp
    );
    println!(
        "| upload + fetch vs two `cp` | {:.3} | {:.2}× |",
        mup + mdown,
        (mup + mdown) / (2.0 * mcp)
    );
    println!();
    println!("| `drover job create` ({code_mib} MiB code, 100 files) | seconds |");
    println!("|---|---|");
    println!("| first submission (packs and uploads) | {first:.3} |");
    println!("| again, snapshot on the server (median) | {mwith:.3} |");
    println!("| the same job without `code:` (median) | {mplain:.3} |");
    println!("| added by the unchanged code | {:.3} |", mwith - mplain);
}
