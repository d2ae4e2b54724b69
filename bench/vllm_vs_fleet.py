"""llm-fleet side by side with `vllm serve`, on one GPU, with vLLM's own benchmark client.

For one model: start `vllm serve`, run `vllm bench serve --backend openai` (random dataset,
256 in / 256 out, --ignore-eos) at each concurrency, stop it; then the same against
`llm-fleet up` (embedded Valkey + gateway + one vLLM worker) with the same engine settings.
While each run goes, it samples every process's CPU use (what saturates?) and, at the highest
concurrency, profiles the Python front ends with py-spy (where does their time go?).

Run on the GPU machine (bench/GPU.md): python bench/vllm_vs_fleet.py --model smollm2-135m
Prints a markdown table; writes everything as JSON to --out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

VLLM_CLI = [sys.executable, "-m", "vllm.entrypoints.cli.main"]
FLEET_CLI = [sys.executable, "-m", "common.cli"]
METRICS = [("output_throughput", "output tok/s", 0), ("request_throughput", "req/s", 1),
           ("median_ttft_ms", "TTFT p50 ms", 0), ("p99_ttft_ms", "TTFT p99 ms", 0),
           ("median_itl_ms", "ITL p50 ms", 1), ("p99_itl_ms", "ITL p99 ms", 1)]


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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # vLLM's engine core runs in its own process; leave the GPU free for the next server.
        for leftover in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if leftover.pid != os.getpid() and "EngineCore" in " ".join(leftover.info["cmdline"] or []):
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
                    "vllm-api-server" if ("serve" in cmd and process.pid == root_pid) or "ApiServer" in name
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
    """py-spy's collapsed stacks (a low rate: each sample pauses the target for a moment)."""
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "50",
                             "--format", "raw", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_frames(collapsed: Path, n: int = 12) -> list[tuple[str, float]]:
    """The functions that were on top of the stack most often (self time), as % of samples."""
    if not collapsed.exists():
        return []
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frame = stack.split(";")[-1]
        self_time[frame] += int(count)
        total += int(count)
    return [(frame, round(100 * c / total, 1)) for frame, c in self_time.most_common(n)] if total else []


def bench_serve(base_url: str, model: str, tokenizer: str, concurrency: int, prompts: int, result: Path,
                on_start: Callable[[], None]) -> dict:
    """`vllm bench serve`; `on_start` runs when its main run begins (after its start-up and test prompt)."""
    argv = [*VLLM_CLI, "bench", "serve", "--backend", "openai", "--base-url", base_url, "--endpoint",
            "/v1/completions", "--model", model, "--tokenizer", tokenizer, "--dataset-name", "random",
            "--random-input-len", "256", "--random-output-len", "256", "--num-prompts", str(prompts),
            "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0",
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
            "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name]
    client = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert client.stdout is not None
    output = []
    for line in client.stdout:
        output.append(line)
        if "Starting main benchmark run" in line:
            on_start()
    if client.wait() != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed ({client.returncode}):\n{''.join(output)[-4000:]}")
    return json.loads(result.read_text())


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


def measure(label: str, base_url: str, root_pid: int, args: argparse.Namespace, work: Path) -> list[dict]:
    rows = []
    if args.pin_engine_core:
        log(pin_engine_core(root_pid))
    for concurrency in args.concurrency:
        roles = process_tree(root_pid)
        sampler: list[CpuSampler] = []
        profilers: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}

        running = RunningSampler(base_url, fleet=label.startswith("llm-fleet"))

        def on_start(roles: dict[str, psutil.Process] = roles, concurrency: int = concurrency,
                     running: RunningSampler = running,
                     sampler: list[CpuSampler] = sampler,
                     profilers: dict[str, tuple[subprocess.Popen[bytes], Path]] = profilers) -> None:
            sampler.append(CpuSampler(roles))
            running.start()
            if concurrency == max(args.concurrency) and args.profile_s:
                for role in ("gateway", "worker", "vllm-api-server"):
                    if role in roles:
                        path = work / f"{label}-{role}.txt"
                        profilers[role] = (profile(roles[role].pid, args.profile_s, path), path)

        result = bench_serve(base_url, args.model, args.tokenizer, concurrency, args.num_prompts,
                             work / f"{label}-c{concurrency}.json", on_start)
        cpu = sampler[0].percent(result["duration"]) if sampler else {}
        mean_running = running.mean()
        profiles = {}
        for role, (spy, path) in profilers.items():
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
            profiles[role] = top_frames(path)
        row = {"server": label, "concurrency": concurrency, **{k: result.get(k) for k, _, _ in METRICS},
               "completed": result.get("completed"), "failed": result.get("failed", 0),
               "duration_s": result.get("duration"), "cpu_percent": cpu, "profile_top_self": profiles,
               "engine_running_mean": mean_running}
        log(f"{label} c={concurrency}: " + ", ".join(f"{name} {row[k]:.{d}f}" for k, name, d in METRICS
                                                       if row[k] is not None)
            + f"; running in the engine (mean) {mean_running}; CPU % of a core: {cpu}")
        rows.append(row)
    return rows


def table(model: str, rows: list[dict]) -> str:
    lines = [f"### {model}", "", "| server | c | " + " | ".join(name for _, name, _ in METRICS) + " | completed |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    by_key = {(r["server"], r["concurrency"]): r for r in rows}
    for row in rows:
        lines.append(f"| {row['server']} | {row['concurrency']} | "
                     + " | ".join(f"{row[k]:,.{d}f}" if row[k] is not None else "-" for k, _, d in METRICS)
                     + f" | {row['completed']} |")
    servers = {r["server"] for r in rows}
    fleet_label = next((s for s in servers if s.startswith("llm-fleet")), None)
    vllm_label = next((s for s in servers if s.startswith("vllm-serve")), None)
    for concurrency in sorted({r["concurrency"] for r in rows}):
        fleet, vllm = by_key.get((fleet_label, concurrency)), by_key.get((vllm_label, concurrency))
        if fleet and vllm:
            lines.append(f"| fleet/vllm | {concurrency} | " + " | ".join(
                f"{fleet[k] / vllm[k]:.2f}" if fleet[k] and vllm[k] else "-" for k, _, _ in METRICS) + " | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="served name, e.g. smollm2-135m or llama-8b-shape")
    parser.add_argument("--model-dir", help="default /tmp/models/<model>")
    parser.add_argument("--tokenizer", help="default: the model directory if it has one, else SmolLM2's")
    parser.add_argument("--load-format", default="dummy", help="dummy (random weights, same speed) or auto")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--only", choices=["vllm-serve", "llm-fleet"], help="run one side only")
    parser.add_argument("--profile-s", type=int, default=15, help="py-spy seconds at the top concurrency (0: off)")
    parser.add_argument("--flush-interval-ms", type=float, help="the worker's chunk coalescing interval")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="vLLM's stream_interval (tokens per output), the same on both sides")
    parser.add_argument("--frontends", type=int, default=1, help="the fleet's front-end processes for the engine")
    parser.add_argument("--gateways", type=int, default=1, help="the fleet's gateway processes (one port)")
    parser.add_argument("--pin-engine-core", action="store_true",
                        help="run vLLM's engine core alone on CPU 0 (and its SMT siblings), the rest elsewhere")
    parser.add_argument("--api-server-count", type=int, default=1, help="`vllm serve`'s API server processes")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()
    args.model_dir = args.model_dir or f"/tmp/models/{args.model}"
    # llama-8b-shape is a config alone (dummy weights) that uses SmolLM2's tokenizer.
    args.tokenizer = args.tokenizer or (args.model_dir if Path(args.model_dir, "tokenizer.json").exists()
                                        else "/tmp/models/smollm2-135m")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rows: list[dict] = []

    vllm_label = "vllm-serve" if args.api_server_count == 1 else f"vllm-serve-x{args.api_server_count}"
    fleet_label = "llm-fleet" + (f"-fe{args.frontends}" if args.frontends > 1 else "") + (
        f"-gw{args.gateways}" if args.gateways > 1 else "")
    if args.only in (None, "vllm-serve"):
        port = 8100
        argv = [*VLLM_CLI, "serve", args.model_dir, "--served-model-name", args.model, "--port", str(port),
                "--load-format", args.load_format, "--tokenizer", args.tokenizer,
                "--stream-interval", str(args.stream_interval), "--api-server-count", str(args.api_server_count)]
        with server(argv, f"http://127.0.0.1:{port}/v1/models", out / f"{args.model}-vllm-serve.log", env, 600) as pid:
            rows += measure(vllm_label, f"http://127.0.0.1:{port}", pid, args, work)

    if args.only in (None, "llm-fleet"):
        port = 8200
        catalogue = work / "catalogue.json"
        catalogue.write_text(json.dumps({args.model: {"engine": "vllm", "source": args.model_dir,
                                                      "frontends": args.frontends,
                                                      "options": {"load_format": args.load_format,
                                                                  "tokenizer": args.tokenizer,
                                                                  "stream_interval": args.stream_interval}}}))
        fleet_env = {**env, "LLM_FLEET_MAX_OUTSTANDING": str(4 * max(args.concurrency))}
        if args.flush_interval_ms is not None:
            fleet_env["LLM_FLEET_FLUSH_INTERVAL_MS"] = str(args.flush_interval_ms)
        argv = [*FLEET_CLI, "up", "--port", str(port), "--gateways", str(args.gateways),
                "--worker-http-port", "0", "--model", args.model, "--catalogue", str(catalogue)]
        # Ready once every front-end serves: the gateway's gauge of workers with the model ready.
        gauge = f'llm_fleet_model_ready_workers{{model="{args.model}"}} '

        def all_frontends(metrics: str) -> bool:
            return any(line.startswith(gauge) and float(line.split()[-1]) >= args.frontends
                       for line in metrics.splitlines())

        with server(argv, f"http://127.0.0.1:{port}/metrics", out / f"{args.model}-{fleet_label}.log", fleet_env,
                    600, ready=all_frontends) as pid:
            rows += measure(fleet_label, f"http://127.0.0.1:{port}", pid, args, work)

    report = table(args.model, rows)
    print(report, flush=True)
    suffix = "".join(f"-{tag}{value}" for tag, value in (
        ("si", args.stream_interval), ("fe", args.frontends), ("gw", args.gateways), ("api", args.api_server_count))
        if value != 1) + ("-pinned" if args.pin_engine_core else "")
    (out / f"{args.model}{suffix}.json").write_text(json.dumps({"model": args.model, "rows": rows, "table": report},
                                                       indent=1))


if __name__ == "__main__":
    main()
