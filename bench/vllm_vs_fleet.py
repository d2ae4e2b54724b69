"""llm-fleet side by side with `vllm serve`, on one GPU, with vLLM's own benchmark client.

For one model: start `vllm serve --api-server-count N` (N = the fleet's front processes: front-ends
+ gateways, unless given), run vLLM's benchmark client (random dataset, --ignore-eos) for every
shape and concurrency, stop it; then the same against `llm-fleet up` (embedded Valkey, gateways,
one vLLM worker with its front-ends) with the same engine settings. While each run goes it samples
every process's CPU use, the requests running in the engine, profiles every process with py-spy
(engine core included) and, with --engine-probe, counts the engine core's batches step by step
(bench/engine_probe/): the same engine, fed by each server, compared batch for batch.

Shapes: --input-len/--output-len/--range-ratio, or several as --shape IN/OUT[/RATIO].
Run on the GPU machine (bench/gpu_setup.sh): python bench/vllm_vs_fleet.py --model smollm2-135m
Prints a markdown table; writes everything as JSON to --out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
FLEET_CLI = [sys.executable, "-m", "common.cli"]
BENCH_CLIENT = [sys.executable, str(Path(__file__).resolve().with_name("vllm_bench_client.py"))]
ENGINE_PROBE = Path(__file__).resolve().with_name("engine_probe")
METRICS = [("output_throughput", "output tok/s", 0), ("request_throughput", "req/s", 1),
           ("median_ttft_ms", "TTFT p50 ms", 0), ("p99_ttft_ms", "TTFT p99 ms", 0),
           ("median_tpot_ms", "TPOT p50 ms", 1), ("p99_tpot_ms", "TPOT p99 ms", 1),
           ("median_itl_ms", "ITL p50 ms", 1), ("p99_itl_ms", "ITL p99 ms", 1)]


@dataclass(frozen=True)
class Shape:
    input_len: int
    output_len: int
    range_ratio: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Shape:
        parts = text.split("/")
        return cls(int(parts[0]), int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.0)

    def __str__(self) -> str:
        return f"{self.input_len}/{self.output_len}" + (f"/{self.range_ratio:g}" if self.range_ratio else "")

    def client_args(self) -> list[str]:
        return ["--random-input-len", str(self.input_len), "--random-output-len", str(self.output_len),
                "--random-range-ratio", str(self.range_ratio)]


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


@contextlib.contextmanager
def server(argv: list[str], ready_url: str, log_path: Path, env: dict[str, str], timeout_s: float,
           ready: Callable[[str], bool] = lambda body: True) -> Iterator[int]:
    """Start a server in its own process group, wait until `ready_url` answers 200 with a body that
    `ready` accepts, stop it after."""
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    started = time.monotonic()
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{argv[:4]} exited {process.returncode}; see {log_path}:\n"
                                   + log_path.read_text()[-3000:])
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200 and ready(response.read().decode(errors="replace")):
                        break
            except urllib.error.HTTPError as exc:  # the fleet's /ready says why it is not ready
                reason = exc.read().decode(errors="replace")
                if "failed to load" in reason:
                    raise RuntimeError(f"{argv[:4]}: {reason}") from exc
            except OSError:
                pass
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"not ready after {timeout_s:.0f}s; see {log_path}")
            time.sleep(1)
        log(f"ready in {time.monotonic() - started:.0f}s: {' '.join(argv[2:6])}")
        yield process.pid
    finally:
        descendants = []
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(process.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # What outlived its parent (vLLM's engine core, in a process of its own) goes too, to leave the GPU
        # free for the next server; only this server's own (another may run beside it on another GPU).
        for leftover in descendants:
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        time.sleep(3)


def process_tree(root_pid: int) -> dict[str, psutil.Process]:
    """The server's processes by role (gateway, worker, valkey, vLLM's API server and engine core)."""
    root = psutil.Process(root_pid)
    roles: dict[str, psutil.Process] = {}
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(process.cmdline())
            name = process.name()
            role = ("engine-core" if "EngineCore" in cmd or "EngineCore" in name else
                    "valkey" if "valkey" in cmd else
                    "gateway" if " gateway " in f"{cmd} " else
                    "worker" if " worker " in f"{cmd} " else
                    "vllm-api-server" if "apiserver" in f"{cmd} {name}".lower() or (
                        "serve" in cmd and process.pid == root_pid and "--api-server-count 1" in cmd)
                    else None)
            if role:  # several of a kind (front-ends, API servers): worker, worker-2, ...
                roles[role if role not in roles else f"{role}-{sum(r.startswith(role) for r in roles) + 1}"] = process
    return roles


class CpuSampler:
    """CPU seconds each process used during a run, as % of one core over the benchmark's own
    duration (the servers idle while the client starts up and generates its prompts)."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self.before = {role: self._cpu(p) for role, p in processes.items()}

    @staticmethod
    def _cpu(process: psutil.Process) -> float:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            return times.user + times.system
        return 0.0

    def percent(self, busy_s: float) -> dict[str, float]:
        return {role: round(100 * (self._cpu(p) - self.before[role]) / busy_s, 1) for role, p in self.processes.items()}


def profile(pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy's collapsed stacks per thread, idle samples included (the engine core waiting on the GPU),
    sampled without pausing the target (which would slow what is measured)."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100",
                             "--nonblocking", "--idle", "--threads", "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(collapsed: Path, n: int = 15) -> dict[str, list[tuple[str, float]]]:
    """Of the thread with the most samples (the main one): the functions on top of its stack most often
    (self time) and those on its stack most often (inclusive), as % of its samples."""
    if not collapsed.exists():
        return {}
    threads: collections.Counter[str] = collections.Counter()
    stacks: list[tuple[list[str], int]] = []
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            frames = stack.split(";")
            threads[frames[0]] += int(count)
            stacks.append((frames, int(count)))
    if not threads:
        return {}
    main, total = threads.most_common(1)[0]
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        if frames[0] == main:
            self_time[frames[-1]] += count
            for frame in set(frames[1:]):
                inclusive[frame] += count
    return {kind: [(frame, round(100 * c / total, 1)) for frame, c in counter.most_common(n)]
            for kind, counter in (("self", self_time), ("inclusive", inclusive))}


def pin_engine_core(root_pid: int) -> str:
    """Give vLLM's engine core a physical core of its own (CPU 0 and its SMT siblings) and every other
    process of the server, and this script with its client, the rest: is the engine core slowed by
    busy neighbours? Returns what was done, for the log."""
    siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text().strip()
    own = {int(c) for part in siblings.split(",") for c in (
        range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1))}
    rest = set(range(os.cpu_count() or 1)) - own
    root = psutil.Process(root_pid)
    engine = process_tree(root_pid)["engine-core"]
    for process in [root, *root.children(recursive=True), psutil.Process()]:
        with contextlib.suppress(psutil.Error, OSError):
            for thread in process.threads():
                os.sched_setaffinity(thread.id, own if process.pid == engine.pid else rest)
    return f"engine core (pid {engine.pid}) on CPUs {sorted(own)}, everything else on {len(rest)} others"


def engine_running(base_url: str, fleet: bool) -> float | None:
    """Requests running in vLLM's scheduler now: vllm serve's own gauge, or the fleet's (from the
    heartbeat of the worker that gets the engine core's stats, via /v1/models)."""
    with contextlib.suppress(OSError, ValueError, KeyError):
        if fleet:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as response:
                models = json.load(response)["data"]
            return max(w.get("engine_running") or 0 for m in models for w in m["workers"])
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=2) as response:
            lines = response.read().decode().splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith("vllm:num_requests_running"))
    return None


class RunningSampler(threading.Thread):
    """Samples the engine's running requests twice a second while a run goes (is its batch full?)."""

    def __init__(self, base_url: str, fleet: bool) -> None:
        super().__init__(daemon=True)
        self.base_url, self.fleet = base_url, fleet
        self.values: list[float] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            value = engine_running(self.base_url, self.fleet)
            if value is not None:
                self.values.append(value)

    def mean(self) -> float | None:
        self.done.set()
        # The first and last seconds are ramp-up and tail.
        steady = self.values[2:-2] if len(self.values) > 6 else self.values
        return round(sum(steady) / len(steady), 1) if steady else None


def probe_counters(probe_dir: Path | None, engine_pid: int | None) -> dict[str, float]:
    if probe_dir is None or engine_pid is None:
        return {}
    with contextlib.suppress(OSError, ValueError):
        return json.loads((probe_dir / f"engine-{engine_pid}.json").read_text())
    return {}


def engine_steps(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the engine core's busy loop did during a run (bench/engine_probe): batches per second, the
    share that was decode-only, requests per batch, and the cost of a cycle of each kind."""
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after if key != "at"}
    seconds = after.get("at", 0) - before.get("at", 0)
    if not delta or seconds <= 0:
        return {}
    decode, mixed = delta.get("batches_decode", 0), delta.get("batches_mixed", 0)
    out = {"seconds": round(seconds, 1), "batches_per_s": round((decode + mixed) / seconds, 1),
           "decode_only_share": round(decode / max(decode + mixed, 1), 3),
           "requests_per_decode_batch": round(delta.get("requests_decode", 0) / max(decode, 1), 1),
           "ms_per_decode_cycle": round(1000 * delta.get("cycle_s_decode", 0) / max(decode, 1), 2),
           "ms_per_mixed_cycle": round(1000 * delta.get("cycle_s_mixed", 0) / max(mixed, 1), 2),
           "tokens_per_mixed_batch": round(delta.get("tokens_mixed", 0) / max(mixed, 1), 1),
           "input_ms_per_s": round(1000 * delta.get("input_s", 0) / seconds, 1)}
    out.update({f"{key}_per_s": round(value / seconds, 1) for key, value in sorted(delta.items())
                if key.startswith(("requests_", "utility_", "aborted_"))})
    return out


def worker_metrics_url(fleet_log: Path) -> str | None:
    """The fleet worker's /metrics (its front-ends' series folded in), from the fleet's log."""
    match = re.search(r"worker HTTP \(/health, /ready, /metrics\) on (\S+):(\d+)", fleet_log.read_text())
    return f"http://{match[1]}:{match[2]}/metrics" if match else None


def latency_sums(url: str | None) -> dict[str, float]:
    """Sums and counts of the worker's queue-wait and time-to-first-token histograms (every front-end)."""
    sums: collections.Counter[str] = collections.Counter()
    if url is not None:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            for line in response.read().decode().splitlines():
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if name.startswith(("llm_fleet_queue_wait_seconds_", "llm_fleet_time_to_first_token_seconds_")) \
                        and name.endswith(("_sum", "_count")):
                    sums[name] += float(line.rsplit(" ", 1)[-1])
    return dict(sums)


def fleet_latencies(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms from the gateway's enqueue to a worker starting the job, and to its first output token
    (what is left of the client's TTFT is the gateway: tokenizing, enqueueing, relaying)."""
    out = {}
    for key, prefix in (("queue_wait_ms", "llm_fleet_queue_wait_seconds"),
                        ("worker_ttft_ms", "llm_fleet_time_to_first_token_seconds")):
        count = after.get(f"{prefix}_count", 0) - before.get(f"{prefix}_count", 0)
        if count:
            out[key] = round(1000 * (after[f"{prefix}_sum"] - before.get(f"{prefix}_sum", 0)) / count, 1)
    return out


@dataclass
class Run:
    shape: Shape
    concurrency: int
    result_file: Path


class RunWatch:
    """Everything sampled while one run's timed part goes."""

    def __init__(self, label: str, run: Run, roles: dict[str, psutil.Process], base_url: str,
                 args: argparse.Namespace, work: Path) -> None:
        self.cpu = CpuSampler(roles)
        self.running = RunningSampler(base_url, fleet=label.startswith("llm-fleet"))
        self.running.start()
        engine = roles.get("engine-core")
        self.engine_pid = engine.pid if engine else None
        # No counters yet: the engine core has not stepped for a second since it started (its first run).
        self.probe_before = probe_counters(args.probe_dir, self.engine_pid) or {"at": time.time()}
        self.metrics_url = args.worker_metrics if label.startswith("llm-fleet") else None
        self.latency_before = latency_sums(self.metrics_url)
        self.profiles: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        if args.profile_s:
            tag = f"{label}-{str(run.shape).replace('/', 'x')}-c{run.concurrency}"
            for role, process in roles.items():
                if role != "valkey":
                    path = work / "profiles" / f"{tag}-{role}.txt"
                    path.parent.mkdir(exist_ok=True)
                    self.profiles[role] = (profile(process.pid, args.profile_s, path), path)

    def finish(self, duration_s: float, args: argparse.Namespace) -> dict:
        time.sleep(1.1)  # the probe writes once a second
        steps = engine_steps(self.probe_before, probe_counters(args.probe_dir, self.engine_pid))
        profiles = {}
        for role, (spy, path) in self.profiles.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
            profiles[role] = top_frames(path)
        return {"cpu_percent": self.cpu.percent(duration_s), "engine_running_mean": self.running.mean(),
                "engine_steps": steps, "fleet_latency": fleet_latencies(self.latency_before,
                                                                        latency_sums(self.metrics_url)),
                "profile": profiles}


def measure(label: str, base_url: str, root_pid: int, args: argparse.Namespace, work: Path) -> list[dict]:
    """Every shape at every concurrency, back to back through one benchmark client process."""
    if args.pin_engine_core:
        log(pin_engine_core(root_pid))
    runs = [Run(shape, c, work / f"{label}-{str(shape).replace('/', 'x')}-c{c}.json")
            for shape in args.shapes for c in args.concurrency]
    argvs = [["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
              "--model", args.model, "--tokenizer", args.tokenizer, "--dataset-name", "random",
              *run.shape.client_args(), "--num-prompts", str(args.num_prompts),
              "--max-concurrency", str(run.concurrency), "--ignore-eos", "--seed", "0",
              "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
              "--save-result", "--result-dir", str(run.result_file.parent),
              "--result-filename", run.result_file.name] for run in runs]
    runs_file = work / f"{label}-runs.json"
    runs_file.write_text(json.dumps(argvs))
    client = subprocess.Popen([*BENCH_CLIENT, str(runs_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    assert client.stdout is not None
    rows, output, watch, index = [], [], None, 0
    for line in client.stdout:
        output.append(line)
        if "Starting main benchmark run" in line:
            watch = RunWatch(label, runs[index], process_tree(root_pid), base_url, args, work)
        elif line.startswith("RUN DONE") and watch is not None:
            run = runs[index]
            result = json.loads(run.result_file.read_text())
            row = {"server": label, "shape": str(run.shape), "concurrency": run.concurrency,
                   **{k: result.get(k) for k, _, _ in METRICS}, "completed": result.get("completed"),
                   "failed": result.get("failed", 0), "duration_s": result.get("duration"),
                   "total_input_tokens": result.get("total_input_tokens"),
                   **watch.finish(result["duration"], args)}
            log(f"{label} {run.shape} c={run.concurrency}: " + ", ".join(
                f"{name} {row[k]:.{d}f}" for k, name, d in METRICS if row[k] is not None)
                + f"; running in the engine (mean) {row['engine_running_mean']}; engine steps {row['engine_steps']}"
                + (f"; fleet latency {row['fleet_latency']}" if row["fleet_latency"] else "")
                + f"; CPU % of a core: {row['cpu_percent']}")
            rows.append(row)
            watch, index = None, index + 1
    if client.wait() != 0 or index != len(runs):
        raise RuntimeError(f"the benchmark client failed ({client.returncode}):\n{''.join(output)[-4000:]}")
    return rows


def table(model: str, rows: list[dict]) -> str:
    lines = [f"### {model}", "", "| server | shape | c | " + " | ".join(name for _, name, _ in METRICS)
             + " | completed |", "|---|---|---|" + "---|" * (len(METRICS) + 1)]
    for row in rows:
        lines.append(f"| {row['server']} | {row['shape']} | {row['concurrency']} | "
                     + " | ".join(f"{row[k]:,.{d}f}" if row[k] is not None else "-" for k, _, d in METRICS)
                     + f" | {row['completed']} |")
    by_key = {(r["server"], r["shape"], r["concurrency"]): r for r in rows}
    fleets = sorted({r["server"] for r in rows if r["server"].startswith("llm-fleet")})
    vllm_label = next((r["server"] for r in rows if r["server"].startswith("vllm-serve")), None)
    for fleet_label in fleets:
        for shape, concurrency in dict.fromkeys((r["shape"], r["concurrency"]) for r in rows):
            fleet, vllm = by_key.get((fleet_label, shape, concurrency)), by_key.get((vllm_label, shape, concurrency))
            if fleet and vllm:
                lines.append(f"| {fleet_label}/vllm | {shape} | {concurrency} | " + " | ".join(
                    f"{fleet[k] / vllm[k]:.2f}" if fleet[k] and vllm[k] else "-" for k, _, _ in METRICS) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="served name, e.g. smollm2-135m or llama-8b-shape")
    parser.add_argument("--model-dir", help="default /tmp/models/<model>")
    parser.add_argument("--tokenizer", help="default: the model directory if it has one, else SmolLM2's")
    parser.add_argument("--load-format", default="dummy", help="dummy (random weights, same speed) or auto")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--range-ratio", type=float, default=0.0,
                        help="mixed lengths: each request's lengths drawn from [len*(1-r), len*(1+r)]")
    parser.add_argument("--shape", action="append", type=Shape.parse, dest="shapes",
                        help="IN/OUT[/RATIO], repeatable: several shapes on one server start")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--only", choices=["vllm-serve", "llm-fleet"], help="run one side only")
    parser.add_argument("--profile-s", type=int, default=8, help="py-spy seconds of every process per run (0: off)")
    parser.add_argument("--engine-probe", action="store_true", help="count the engine core's batches (engine_probe/)")
    parser.add_argument("--flush-interval-ms", type=float, help="the worker's chunk coalescing interval")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="vLLM's stream_interval (tokens per output), the same on both sides")
    parser.add_argument("--frontends", type=int, default=2, help="the fleet's front-end processes for the engine")
    parser.add_argument("--gateways", type=int, default=2, help="the fleet's gateway processes (one port)")
    parser.add_argument("--kv-oversubscription", type=float, default=1.0,
                        help="the fleet's admission: worst cases up to this many times the KV capacity")
    parser.add_argument("--engine-option", action="append", default=[], metavar="KEY=JSON",
                        help="a vLLM engine argument for both sides, e.g. async_scheduling=true")
    parser.add_argument("--fleet-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the fleet's processes (a variant to compare)")
    parser.add_argument("--label", default="", help="suffix of the fleet's label (a variant)")
    parser.add_argument("--fleet-port", type=int, default=8200, help="the fleet's gateway port (two fleets at once)")
    parser.add_argument("--pin-engine-core", action="store_true",
                        help="run vLLM's engine core alone on CPU 0 (and its SMT siblings), the rest elsewhere")
    parser.add_argument("--api-server-count", type=int,
                        help="`vllm serve`'s API server processes (default: the fleet's front-ends + gateways)")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print the table of results written earlier (e.g. each side run on its own GPU)")
    args = parser.parse_args()
    if args.table:
        rows = [row for path in args.table for row in json.loads(Path(path).read_text())["rows"]]
        print(table(args.model, rows))
        return
    args.shapes = args.shapes or [Shape(args.input_len, args.output_len, args.range_ratio)]
    args.api_server_count = args.api_server_count or args.frontends + args.gateways
    args.model_dir = args.model_dir or f"/tmp/models/{args.model}"
    # llama-8b-shape is a config alone (dummy weights) that uses SmolLM2's tokenizer.
    args.tokenizer = args.tokenizer or (args.model_dir if Path(args.model_dir, "tokenizer.json").exists()
                                        else "/tmp/models/smollm2-135m")
    options = {"load_format": args.load_format, "tokenizer": args.tokenizer, "stream_interval": args.stream_interval,
               **{k: json.loads(v) for k, v in (o.split("=", 1) for o in args.engine_option)}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args.probe_dir, args.worker_metrics = None, None
    if args.engine_probe:
        args.probe_dir = work / "probe"
        args.probe_dir.mkdir()
        env.update(LLM_FLEET_ENGINE_PROBE=str(args.probe_dir),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ENGINE_PROBE), env.get("PYTHONPATH")])))
    rows: list[dict] = []
    name = f"{args.model}-{args.only or 'both'}" + (f"-{args.label}" if args.label else "")

    def save() -> None:  # after each side: a run cut short keeps what it measured
        (out / f"{name}.json").write_text(json.dumps({"model": args.model, "options": options, "rows": rows,
                                                      "table": table(args.model, rows)}, indent=1))
        if (work / "profiles").exists():  # raw py-spy stacks, for a closer look later
            subprocess.run(["tar", "czf", str(out / f"{name}-profiles.tgz"), "-C", str(work), "profiles"],
                           check=False)

    vllm_label = f"vllm-serve-x{args.api_server_count}"
    fleet_label = f"llm-fleet-fe{args.frontends}-gw{args.gateways}" + (f"-{args.label}" if args.label else "")
    if args.only in (None, "vllm-serve"):
        port = 8100
        argv = [*VLLM_CLI, "serve", args.model_dir, "--served-model-name", args.model, "--port", str(port),
                "--api-server-count", str(args.api_server_count)]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            argv += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
        log_path = out / f"{args.model}-{vllm_label}.log"
        with server(argv, f"http://127.0.0.1:{port}/v1/models", log_path, env, 600) as pid:
            rows += measure(vllm_label, f"http://127.0.0.1:{port}", pid, args, work)
        save()

    if args.only in (None, "llm-fleet"):
        port = args.fleet_port
        catalogue = work / "catalogue.json"
        catalogue.write_text(json.dumps({args.model: {"engine": "vllm", "source": args.model_dir,
                                                      "frontends": args.frontends, "options": options,
                                                      "kv_oversubscription": args.kv_oversubscription}}))
        fleet_env = {**env, "LLM_FLEET_MAX_OUTSTANDING": str(4 * max(args.concurrency)),
                     **dict(e.split("=", 1) for e in args.fleet_env)}
        if args.flush_interval_ms is not None:
            fleet_env["LLM_FLEET_FLUSH_INTERVAL_MS"] = str(args.flush_interval_ms)
        argv = [*FLEET_CLI, "up", "--port", str(port), "--gateways", str(args.gateways),
                "--worker-http-port", "0", "--model", args.model, "--catalogue", str(catalogue)]
        # Ready once every front-end serves: the gateway's gauge of workers with the model ready.
        gauge = f'llm_fleet_model_ready_workers{{model="{args.model}"}} '

        def all_frontends(metrics: str) -> bool:
            return any(line.startswith(gauge) and float(line.split()[-1]) >= args.frontends
                       for line in metrics.splitlines())

        log_path = out / f"{args.model}-{fleet_label}.log"
        with server(argv, f"http://127.0.0.1:{port}/metrics", log_path, fleet_env, 600, ready=all_frontends) as pid:
            args.worker_metrics = worker_metrics_url(log_path)
            rows += measure(fleet_label, f"http://127.0.0.1:{port}", pid, args, work)
        save()
    print(table(args.model, rows), flush=True)


if __name__ == "__main__":
    main()
