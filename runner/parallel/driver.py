#!/usr/bin/env python3
"""Drover's runtime for Azure ML parallel steps (`type: parallel`).

Runs a user's entry script the way Azure ML's parallel run step does:
`init()` once per worker process, `run(mini_batch)` per mini-batch (a list
of file paths for a `uri_folder`, a pandas DataFrame for tabular
`mltable` input), `shutdown()` at the end; returned items appended to one
output file (`append_row_to`); retries, per-call timeouts and error
thresholds; Azure ML's log layout under `--logs`.

Mini-batches are files in a queue directory, handed out by atomic renames
(`pending/` -> `leased/` -> `done/`), so that a worker that dies (a crash,
kill -9, the OOM killer) or overruns its timeout gives its mini-batch back
to the queue and a new worker takes its place. A mini-batch's results are
written to `results/` under the mini-batch's own name before it is marked
done, and the output file is assembled from them in order at the end: a
retried or reassigned mini-batch never appears twice in the output.

Needs only the Python standard library (pandas for tabular input).

Usage (what the agent runs in the step's container):
  python3 driver.py --code DIR --entry-script score.py --input-kind uri_folder
      --input PATH --mini-batch-size 10 --work DIR --logs DIR
      [--output FILE] [--workers N] [--max-retries 2] [--timeout 60]
      [--mini-batch-error-threshold -1] [--error-threshold -1]
      [--node-name NAME] [--gpus N] -- [program arguments]
"""

import argparse
import csv
import importlib.util
import inspect
import json
import os
import signal
import sys
import time
import traceback

EXIT_THRESHOLD = 42
POLL_SECONDS = 0.05
PROGRESS_SECONDS = 2.0


class UserError(Exception):
    """A mistake in the step's definition: reported as job_error.txt."""


# ---------------------------------------------------------------- options


def driver_options(program_arguments):
    """Azure ML's own driver arguments inside `program_arguments`, parsed as
    argparse parses them (unambiguous prefixes included); the rest stays
    for the user's script."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=True)
    p.add_argument("--error_threshold", type=int)
    p.add_argument("--allowed_failed_percent", type=float)
    p.add_argument("--task_overhead_timeout", type=float)
    p.add_argument("--progress_update_timeout", type=float)
    p.add_argument("--first_task_creation_timeout", type=float)
    p.add_argument("--resource_monitor_interval", type=float)
    p.add_argument("--copy_logs_to_parent", type=str)
    p.add_argument("--logging_level", type=str)
    known, rest = p.parse_known_args(program_arguments)
    return known, rest


def parse_size(text):
    """`10kb`, `1MB`, `512` -> bytes (k/m/g are x1024, as Azure ML)."""
    t = str(text).strip().lower()
    units = {"kb": 1024, "mb": 1024**2, "gb": 1024**3, "k": 1024, "m": 1024**2, "g": 1024**3, "b": 1}
    for suffix, factor in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * factor)
    return int(t)


# ---------------------------------------------------------------- batches


def folder_batches(root, size):
    files = []
    for d, _, names in os.walk(root):
        for n in names:
            files.append(os.path.join(d, n))
    files.sort()
    count = max(1, int(size))
    return [{"files": files[i : i + count]} for i in range(0, len(files), count)]


def read_mltable(root):
    """The delimited files and reading options of an MLTable folder."""
    path = os.path.join(root, "MLTable")
    if not os.path.exists(path):
        raise UserError(f"{root} has no MLTable file")
    files, delimiter, header = [], ",", True
    section = None
    for raw in open(path, encoding="utf-8"):
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line.startswith(" ") and not line.startswith("-"):
            section = line.split(":", 1)[0].strip()
        item = line.strip().lstrip("-").strip()
        if section == "paths" and ":" in item:
            key, value = (s.strip().strip("'\"") for s in item.split(":", 1))
            if key == "file":
                files.append(os.path.normpath(os.path.join(root, value)))
            elif key == "folder":
                folder = os.path.normpath(os.path.join(root, value))
                files += sorted(os.path.join(folder, f) for f in os.listdir(folder))
            elif key == "pattern":
                import glob

                files += sorted(glob.glob(os.path.join(root, value), recursive=True))
        if section == "transformations" and ":" in item:
            key, value = (s.strip().strip("'\"") for s in item.split(":", 1))
            if key == "delimiter":
                delimiter = value
            elif key == "header":
                header = value not in ("no_header", "false", "False")
    if not files:
        raise UserError(f"{path} names no files under paths:")
    return files, delimiter, header


def tabular_batches(root, size_bytes):
    """Byte ranges of the delimited files, cut at line ends, about
    `size_bytes` each: rows are never split between mini-batches."""
    files, delimiter, header = read_mltable(root)
    batches = []
    for f in files:
        with open(f, "rb") as fh:
            first = fh.readline() if header else b""
            start = fh.tell()
            while True:
                fh.seek(start)
                chunk = fh.read(size_bytes)
                if not chunk:
                    break
                end = start + len(chunk)
                if not chunk.endswith(b"\n"):
                    rest = fh.readline()
                    end += len(rest)
                batches.append({"file": f, "start": start, "end": end,
                                "header": first.decode("utf-8").rstrip("\r\n"),
                                "delimiter": delimiter})
                start = end
    return batches


# ---------------------------------------------------------------- queue


class Queue:
    """Mini-batches as files: claimed by rename, so exactly one worker holds one."""

    def __init__(self, work):
        self.work = work
        self.finished = {}
        for d in ("pending", "leased", "done", "results"):
            os.makedirs(os.path.join(work, d), exist_ok=True)

    def path(self, state, name):
        return os.path.join(self.work, state, name)

    def fill(self, batches):
        if os.listdir(os.path.join(self.work, "pending")) or os.listdir(os.path.join(self.work, "done")):
            return  # a restarted driver goes on with what is there
        for i, b in enumerate(batches):
            b["index"], b["tries"] = i, 0
            name = f"{i:06d}.json"
            write_atomic(self.path("pending", name), json.dumps(b))

    def claim(self, worker):
        for name in sorted(os.listdir(os.path.join(self.work, "pending"))):
            leased = self.path("leased", f"{name}.{worker}")
            try:
                os.rename(self.path("pending", name), leased)
            except FileNotFoundError:
                continue  # another worker took it
            os.utime(leased)  # the lease's age is its run()'s
            with open(leased, encoding="utf-8") as fh:
                return name, leased, json.load(fh)
        return None

    def leases(self):
        out = []
        for lease in os.listdir(os.path.join(self.work, "leased")):
            name, _, worker = lease.rpartition(".")
            out.append((name, worker, self.path("leased", lease)))
        return out

    def give_back(self, lease_path, name, batch, failed_try, why, max_retries):
        """Back to pending, or done as failed when its tries are spent."""
        if failed_try:
            batch["tries"] += 1
            batch.setdefault("errors", []).append(why)
        if failed_try and batch["tries"] > max_retries:
            self.finish(lease_path, name, batch, ok=False)
            return
        write_atomic(lease_path, json.dumps(batch))
        try:
            os.rename(lease_path, self.path("pending", name))
        except FileNotFoundError:
            pass

    def finish(self, lease_path, name, batch, ok, results=None, elapsed=0.0):
        if results is not None:
            write_atomic(self.path("results", name.replace(".json", ".txt")), results)
        batch["ok"], batch["elapsed"] = ok, elapsed
        write_atomic(lease_path, json.dumps(batch))
        try:
            os.rename(lease_path, self.path("done", name))
        except FileNotFoundError:
            pass

    def done(self):
        """Finished mini-batches, by name (a done file never changes: each
        is read once)."""
        for name in os.listdir(os.path.join(self.work, "done")):
            if name.endswith(".json") and name not in self.finished:
                with open(self.path("done", name), encoding="utf-8") as fh:
                    self.finished[name] = json.load(fh)
        return [self.finished[n] for n in sorted(self.finished)]

    def remaining(self):
        return len(os.listdir(os.path.join(self.work, "pending"))) + len(os.listdir(os.path.join(self.work, "leased")))


def write_atomic(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- worker


class MiniBatchContext:
    def __init__(self, batch):
        self.minibatch_index = batch["index"]
        self.partition_key_value = batch.get("partition", {})
        self.dataset = batch.get("file")


def load_entry(code, entry_script):
    path = os.path.join(code, entry_script)
    if not os.path.exists(path):
        raise UserError(f"entry_script {entry_script} is not in the code folder {code}")
    sys.path.insert(0, code)
    spec = importlib.util.spec_from_file_location("drover_entry_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "run"):
        raise UserError(f"entry_script {entry_script} has no run() function")
    return module


def batch_input(batch):
    if "files" in batch:
        return batch["files"], len(batch["files"])
    import io

    import pandas as pd

    with open(batch["file"], "rb") as fh:
        fh.seek(batch["start"])
        data = fh.read(batch["end"] - batch["start"]).decode("utf-8")
    header = batch["header"]
    text = (header + "\n" + data) if header else data
    frame = pd.read_csv(io.StringIO(text), sep=batch["delimiter"], header=0 if header else None)
    return frame, len(frame)


def result_lines(result, settings):
    try:
        import pandas as pd

        if isinstance(result, pd.DataFrame):
            options = {"sep": " ", "header": False, "index": False}
            options.update(settings.get("append_row", {}).get("pandas.DataFrame.to_csv", {}))
            text = result.to_csv(**options)
            return text, len(result)
    except ImportError:
        pass
    items = list(result)
    return "".join(f"{item}\n" for item in items), len(items)


def worker_main(args, user_args, worker_id, stdout_path):
    """One worker process: init(), then run() on claimed mini-batches."""
    out = os.open(stdout_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sys.argv = [args.entry_script] + user_args
    queue = Queue(args.work)
    settings_path = os.path.join(args.code, "parallel_run_step.settings.json")
    settings = json.load(open(settings_path)) if os.path.exists(settings_path) else {}
    module = load_entry(args.code, args.entry_script)
    print(f"drover-parallel: worker {worker_id} init()", flush=True)
    if hasattr(module, "init"):
        module.init()
    takes_context = len(inspect.signature(module.run).parameters) >= 2
    while True:
        claimed = queue.claim(worker_id)
        if claimed is None:
            break
        name, lease, batch = claimed
        started = time.time()
        try:
            data, count = batch_input(batch)
            result = module.run(data, MiniBatchContext(batch)) if takes_context else module.run(data)
            if result is None:
                raise RuntimeError("run() returned None")
            text, returned = result_lines(result, settings)
            if returned < count:
                raise RuntimeError(f"run() returned {returned} items for {count} inputs")
        except Exception as e:  # the user's failure: counted, retried
            traceback.print_exc()
            queue.give_back(lease, name, batch, True, f"{type(e).__name__}: {e}", args.max_retries)
            continue
        batch["items"] = count
        queue.finish(lease, name, batch, ok=True, results=text, elapsed=time.time() - started)
    if hasattr(module, "shutdown"):
        module.shutdown()
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------- driver


def items_of(batch):
    if "files" in batch:
        return len(batch["files"])
    return batch.get("items", 1)


class Report:
    def __init__(self, logs):
        self.logs = logs
        os.makedirs(os.path.join(logs, "sys", "job_report"), exist_ok=True)

    def write(self, name, text):
        write_atomic(os.path.join(self.logs, name), text)


def run_driver(args, user_args):
    report = Report(args.logs)
    node_dir = os.path.join(args.logs, "user", "stdout", args.node_name)
    os.makedirs(node_dir, exist_ok=True)
    queue = Queue(args.work)
    if args.input_kind == "uri_folder":
        batches = folder_batches(args.input, args.mini_batch_size)
    elif args.input_kind == "mltable":
        batches = tabular_batches(args.input, parse_size(args.mini_batch_size))
    else:
        raise UserError(f"input kind {args.input_kind} is not supported (uri_folder or mltable)")
    queue.fill(batches)
    total = len(os.listdir(os.path.join(args.work, "pending"))) + len(queue.done())
    # The container sees its GPUs as 0..N-1; worker slot k gets GPU k while
    # GPUs last (a replacement worker takes its slot's GPU), the rest none.
    gpus = args.gpus if args.gpus is not None else int(os.environ.get("AZ_BATCHAI_GPU_COUNT_FOUND", "0") or 0)
    workers = {}  # pid -> worker id
    slots = {}  # worker id -> slot
    spawned = 0

    def spawn(slot=None):
        nonlocal spawned
        spawned += 1
        if slot is None:
            taken = {slots[w] for w in workers.values()}
            slot = next(k for k in range(args.workers + 1) if k not in taken)
        worker_id = f"{args.node_name}-w{spawned:03d}"
        slots[worker_id] = slot
        stdout_path = os.path.join(node_dir, f"process{spawned:03d}.stdout.txt")
        pid = os.fork()
        if pid == 0:
            if gpus:
                os.environ["CUDA_VISIBLE_DEVICES"] = str(slot) if slot < gpus else ""
            try:
                worker_main(args, user_args, worker_id, stdout_path)
            except BaseException:
                traceback.print_exc()
                sys.stderr.flush()
                os._exit(3)
        workers[pid] = worker_id

    for slot in range(args.workers):
        spawn(slot)
    failure = None
    init_failures = 0
    last_progress = [-1, 0.0]  # mini-batches finished, when last said

    def give_back_leases(worker_id, why):
        held = False
        for name, holder, lease in queue.leases():
            if holder == worker_id:
                held = True
                with open(lease, encoding="utf-8") as fh:
                    batch = json.load(fh)
                queue.give_back(lease, name, batch, True, why, args.max_retries)
        return held

    while True:
        # Reap workers; a dead worker's mini-batch is a failed try, back
        # in the queue while it has tries left.
        for pid in list(workers):
            done_pid, status = os.waitpid(pid, os.WNOHANG)
            if done_pid == 0:
                continue
            worker_id = workers.pop(pid)
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                if not give_back_leases(worker_id, f"the worker process died ({how})"):
                    init_failures += 1
                print(f"drover-parallel: worker {worker_id} died ({how})", flush=True)
        if init_failures >= 3:
            failure = (f"init() or the entry script failed in {init_failures} worker processes; "
                       f"see logs/user/stdout/{args.node_name}/")
            break
        # A run() past its timeout: its worker is killed, the try fails.
        now = time.time()
        for name, holder, lease in queue.leases():
            try:
                age = now - os.stat(lease).st_mtime
            except FileNotFoundError:
                continue
            if args.timeout > 0 and age > args.timeout:
                pid = next((p for p, w in workers.items() if w == holder), None)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    workers.pop(pid)
                give_back_leases(holder, f"run() timed out after {args.timeout:g}s")
        # Keep the worker count while mini-batches wait.
        while len(workers) < args.workers and queue.remaining() > len(workers):
            spawn()
        finished = queue.done()
        failed = [b for b in finished if not b["ok"]]
        failed_items = sum(items_of(b) for b in failed)
        if args.mini_batch_error_threshold >= 0 and len(failed) > args.mini_batch_error_threshold:
            failure = (f"{len(failed)} mini-batches failed, more than mini_batch_error_threshold "
                       f"{args.mini_batch_error_threshold}")
        elif args.error_threshold >= 0 and failed_items > args.error_threshold:
            failure = f"{failed_items} items failed, more than error_threshold {args.error_threshold}"
        elif args.allowed_failed_percent is not None and total and \
                100.0 * len(failed) / total > args.allowed_failed_percent:
            failure = (f"{100.0 * len(failed) / total:.1f}% of mini-batches failed, more than "
                       f"--allowed_failed_percent {args.allowed_failed_percent}")
        if len(finished) != last_progress[0] and (time.time() - last_progress[1] >= PROGRESS_SECONDS
                                                  or len(finished) == total):
            last_progress[:] = [len(finished), time.time()]
            print(f"drover-parallel: progress {len(finished)}/{total} mini-batches ({len(failed)} failed), "
                  f"{sum(items_of(b) for b in finished if b['ok'])} items", flush=True)
        if failure or (not workers and not queue.remaining()):
            break
        time.sleep(POLL_SECONDS)
    for pid in list(workers):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)

    finished = queue.done()
    ok = [b for b in finished if b["ok"]]
    failed = [b for b in finished if not b["ok"]]
    with open(os.path.join(args.logs, "sys", "job_report", "processed_mini-batches.csv"), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Mini-batch index", "Status", "Tries", "Items", "Elapsed seconds", "Errors"])
        for b in finished:
            w.writerow([b["index"], "succeeded" if b["ok"] else "failed", b["tries"] + (1 if b["ok"] else 0),
                        items_of(b), f"{b.get('elapsed', 0):.3f}", " | ".join(b.get("errors", []))])
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as out:
            for b in sorted(ok, key=lambda b: b["index"]):
                with open(queue.path("results", f"{b['index']:06d}.txt"), encoding="utf-8") as fh:
                    out.write(fh.read())
        os.replace(tmp, args.output)
    summary = (f"mini-batches: {len(ok)} succeeded, {len(failed)} failed, {total} in all; "
               f"items: {sum(items_of(b) for b in ok)} succeeded, {sum(items_of(b) for b in failed)} failed")
    if failure:
        report.write("job_result.txt", f"The job failed: {failure}.\n{summary}\n")
        report.write("job_error.txt", f"{failure}\n" + "".join(
            f"mini-batch {b['index']}: {' | '.join(b.get('errors', []))}\n" for b in failed))
        print(f"drover-parallel: {failure}; {summary}", flush=True)
        return EXIT_THRESHOLD
    report.write("job_result.txt", f"The job succeeded.\n{summary}\n")
    print(f"drover-parallel: {summary}", flush=True)
    return 0


def main(argv):
    if "--" in argv:
        split = argv.index("--")
        own, program = argv[:split], argv[split + 1 :]
    else:
        own, program = argv, []
    p = argparse.ArgumentParser(prog="drover-parallel")
    p.add_argument("--code", required=True)
    p.add_argument("--entry-script", required=True)
    p.add_argument("--input-kind", default="uri_folder")
    p.add_argument("--input", required=True)
    p.add_argument("--mini-batch-size", default="10")
    p.add_argument("--work", required=True)
    p.add_argument("--logs", required=True)
    p.add_argument("--output")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-retries", type=int, default=2)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--mini-batch-error-threshold", type=int, default=-1)
    p.add_argument("--error-threshold", type=int, default=-1)
    p.add_argument("--node-name", default=os.uname().nodename)
    p.add_argument("--gpus", type=int, help="GPUs of the node (default: AZ_BATCHAI_GPU_COUNT_FOUND)")
    args = p.parse_args(own)
    known, user_args = driver_options(program)
    if known.error_threshold is not None:
        args.error_threshold = known.error_threshold
    args.allowed_failed_percent = known.allowed_failed_percent
    try:
        return run_driver(args, user_args)
    except UserError as e:
        os.makedirs(args.logs, exist_ok=True)
        write_atomic(os.path.join(args.logs, "job_error.txt"), f"{e}\n")
        write_atomic(os.path.join(args.logs, "job_result.txt"), f"The job failed: {e}.\n")
        print(f"drover-parallel: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
