//! `bench-kill-loop [JOBS] [LINES] [SEED]`: the agent kill loop at full
//! length (default 20 jobs of 20 numbered lines), release builds. Prints
//! jobs completed, duplicate containers, lines lost and lines duplicated;
//! every number but the first must be 0. Results go to BENCHMARKS.md.

fn main() {
    drover_tests::require_docker();
    let mut args = std::env::args().skip(1);
    let jobs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let lines: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    let seed: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_261_201);
    let started = std::time::Instant::now();
    let report = drover_tests::kill_loop::run(jobs, lines, seed, true);
    println!(
        "kill loop: {jobs} jobs x {lines} lines, seed {seed}, {:.0} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "  jobs completed (first attempt): {}/{}",
        report.completed, report.jobs
    );
    println!(
        "  duplicate containers:           {}",
        report.duplicate_containers
    );
    println!("  lines lost:                     {}", report.lines_lost);
    println!(
        "  lines duplicated:               {}",
        report.lines_duplicated
    );
    for p in &report.problems {
        println!("  problem: {p}");
    }
    let clean = report.completed == report.jobs
        && report.duplicate_containers == 0
        && report.lines_lost == 0
        && report.lines_duplicated == 0;
    std::process::exit(if clean { 0 } else { 1 });
}
