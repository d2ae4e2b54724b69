"""Prefix affinity and many GPUs, on the lent nvidia-h200-x2 machine (two GPUs; bench/gpu_setup.sh first).

One `llm-fleet up --gpus ...` per part, on a Valkey of this script's own, measured with vLLM's own
benchmark client (bench/vllm_bench_client.py, `vllm bench serve`):

- affinity: two vLLM workers, one per GPU, each with its KV cache shrunk (`num_gpu_blocks_override`) so
  that the dataset's prefixes fit in the two caches together but not in one; vLLM's `prefix_repetition`
  dataset through the fleet's gateway (prefix affinity on) and through a second gateway on the same
  Redis with affinity off, each with its own seed (its own prefixes: the other run's cache is no help).
  Hit rate from the workers' /metrics (cached over prompt tokens), routed jobs from the gateways'.
- scale: random IN/OUT at high concurrency on two GPUs (two workers) and on one.
- tp: one worker with tensor_parallel_size 2 over both GPUs, the same run as scale's one-GPU worker.

    python bench/gpu_affinity.py affinity|scale|tp [--model llama-8b-shape] [--out DIR]
Writes DIR/<part>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.vllm_vs_fleet import BENCH_CLIENT, FLEET_CLI, CpuSampler, log, process_tree, server
from common.embedded_redis import EmbeddedValkey

METRICS = [("output_throughput", "output tok/s", 0), ("request_throughput", "req/s", 1),
           ("median_ttft_ms", "TTFT p50 ms", 0), ("p99_ttft_ms", "TTFT p99 ms", 0),
           ("median_tpot_ms", "TPOT p50 ms", 1), ("median_itl_ms", "ITL p50 ms", 1), ("p99_itl_ms", "ITL p99 ms", 1)]


def models_ready(count: int) -> object:
    """A `server` readiness check: the gateway lists `count` workers with the model ready."""
    def ready(body: str) -> bool:
        data = json.loads(body).get("data", [])
        return bool(data) and sum(w["state"] == "ready" for w in data[0].get("workers", [])) >= count
    return ready


@contextlib.contextmanager
def fleet(args: argparse.Namespace, redis_url: str, label: str, gpus: str, workers: int, entry: dict,
          gateways: int = 1) -> Iterator[tuple[str, int]]:
    """`llm-fleet up` on `gpus` with the model's catalogue `entry`; yields the gateway's base URL and the
    fleet's pid once every worker process (each worker's front-ends count) has the model ready."""
    catalogue = Path(tempfile.mkdtemp()) / "catalogue.json"
    catalogue.write_text(json.dumps({args.model: entry}))
    port = 8400
    argv = [*FLEET_CLI, "up", "--redis-url", redis_url, "--port", str(port), "--gateways", str(gateways),
            "--gpus", gpus, "--worker-http-port", str(args.worker_port), "--model", args.model,
            "--catalogue", str(catalogue)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LLM_FLEET_MAX_OUTSTANDING": "100000"}
    with server(argv, f"http://127.0.0.1:{port}/v1/models", args.out / f"{label}.log", env, 900,
                ready=models_ready(workers * entry["frontends"])) as pid:
        yield f"http://127.0.0.1:{port}", pid


def bench(args: argparse.Namespace, base_url: str, label: str, dataset: list[str], concurrency: int,
          prompts: int, seed: int, clients: int = 1) -> dict:
    """`vllm bench serve` against base_url from `clients` client processes that split the concurrency
    and the prompts and start their timed parts at one instant; their per-request records merged into
    one row (vLLM's own metric definitions)."""
    processes = []
    start_at = time.time() + 60  # after every client has loaded its tokenizer and sampled its prompts
    for index in range(clients):
        name = f"{label}.{index}" if clients > 1 else label
        result = args.out / f"{name}.result.json"
        argv = ["--backend", "openai", "--base-url", base_url, "--endpoint", "/v1/completions",
                "--model", args.model, "--tokenizer", args.tokenizer, *dataset,
                "--num-prompts", str(prompts // clients), "--max-concurrency", str(concurrency // clients),
                "--ignore-eos", "--seed", str(seed * 100 + index), "--save-result", "--save-detailed",
                "--result-dir", str(args.out), "--result-filename", result.name]
        runs = args.out / f"{name}.runs.json"
        runs.write_text(json.dumps([argv]))
        env = {**os.environ, "BENCH_START_AT": str(start_at)} if clients > 1 else os.environ
        processes.append((subprocess.Popen([*BENCH_CLIENT, str(runs)], stdout=subprocess.DEVNULL, env=env), result))
    for process, _ in processes:
        if process.wait():
            raise RuntimeError(f"{label}: a benchmark client exited {process.returncode}")
    row = {"label": label, "concurrency": concurrency, "prompts": prompts, "clients": clients,
           **merged([json.loads(result.read_text()) for _, result in processes])}
    for _, result in processes:  # the per-request lists are large; the row keeps what they add up to
        result.write_text(json.dumps({k: v for k, v in json.loads(result.read_text()).items()
                                      if k not in ("input_lens", "output_lens", "ttfts", "itls", "start_times",
                                                   "generated_texts", "errors")}))
    log(f"{label}: " + ", ".join(f"{name} {row[k]:.{d}f}" for k, name, d in METRICS if row[k] is not None))
    return row


def merged(results: list[dict]) -> dict:
    """Several clients' detailed results as one run: tokens over the longest duration (their timed parts
    started together), percentiles over every request, each metric as `vllm bench serve` defines it."""
    done = [(ttft, itl, n) for result in results
            for ttft, itl, n, error in zip(result["ttfts"], result["itls"], result["output_lens"], result["errors"],
                                           strict=True) if not error]
    duration = max(result["duration"] for result in results)
    ttfts = [ttft * 1000 for ttft, _, _ in done]
    tpots = [sum(itl) * 1000 / (n - 1) for _, itl, n in done if n > 1]
    itls = [gap * 1000 for _, itl, _ in done for gap in itl]
    return {"output_throughput": sum(n for _, _, n in done) / duration, "request_throughput": len(done) / duration,
            "median_ttft_ms": percentile(ttfts, 50), "p99_ttft_ms": percentile(ttfts, 99),
            "median_tpot_ms": percentile(tpots, 50), "median_itl_ms": percentile(itls, 50),
            "p99_itl_ms": percentile(itls, 99), "completed": len(done),
            "failed": sum(result["failed"] for result in results), "duration_s": duration}


def percentile(values: list[float], q: float) -> float | None:
    return float(numpy.percentile(values, q)) if values else None


def scrape(urls: list[str]) -> dict[str, float]:
    """Counter families summed over these /metrics endpoints, by name and labels."""
    totals: dict[str, float] = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=10) as response:
            for line in response.read().decode().splitlines():
                match = re.match(r"^(llm_fleet_(?:prompt_tokens|prompt_tokens_cached|jobs_taken|jobs_routed)_total"
                                 r"(?:\{[^}]*\})?) (\S+)$", line)
                if match:
                    totals[match[1]] = totals.get(match[1], 0.0) + float(match[2])
    return totals


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def hit_rate(counts: dict[str, float], model: str) -> float | None:
    prompt = counts.get(f'llm_fleet_prompt_tokens_total{{model="{model}"}}')
    cached = counts.get(f'llm_fleet_prompt_tokens_cached_total{{model="{model}"}}', 0.0)
    return cached / prompt if prompt else None


def affinity(args: argparse.Namespace, redis_url: str) -> list[dict]:
    entry = {"engine": "vllm", "source": args.model_dir, "frontends": 1, "kv_oversubscription": 3.0,
             "options": {"load_format": args.load_format, "tokenizer": args.tokenizer, "max_model_len": 4096,
                         "num_gpu_blocks_override": args.gpu_blocks}}
    dataset = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len", str(args.prefix_len),
               "--prefix-repetition-suffix-len", str(args.suffix_len), "--prefix-repetition-num-prefixes",
               str(args.num_prefixes), "--prefix-repetition-output-len", str(args.output_len)]
    metrics = [f"http://127.0.0.1:{args.worker_port + i}/metrics" for i in range(2)]
    rows = []
    with fleet(args, redis_url, "affinity-fleet", "0,1", 2, entry) as (on_url, _):
        off_argv = [*FLEET_CLI, "gateway", "--redis-url", redis_url, "--port", "8401"]
        off_env = {**os.environ, "LLM_FLEET_PREFIX_AFFINITY": "0", "LLM_FLEET_MAX_OUTSTANDING": "100000"}
        with server(off_argv, "http://127.0.0.1:8401/v1/models", args.out / "affinity-off-gateway.log", off_env,
                    120, ready=models_ready(2)):
            for label, url, seed in (("affinity off", "http://127.0.0.1:8401", 1), ("affinity on", on_url, 2),
                                     ("affinity off (again)", "http://127.0.0.1:8401", 3),
                                     ("affinity on (again)", on_url, 4)):
                before = scrape([*metrics, f"{url}/metrics"])
                row = bench(args, url, label.replace(" ", "-").replace("(", "").replace(")", ""), dataset,
                            args.concurrency, args.num_prefixes * args.prompts_per_prefix, seed)
                counts = delta(scrape([*metrics, f"{url}/metrics"]), before)
                row.update(hit_rate=hit_rate(counts, args.model), counters=counts)
                log(f"{label}: hit rate {row['hit_rate']}, {counts}")
                rows.append(row)
        record = subprocess.run([sys.executable, "-c", (
            "import redis,sys; r=redis.Redis.from_url(sys.argv[1]); "
            "print({k.decode(): r.zcard(k) for k in r.scan_iter('prefix:*')})"), redis_url],
            capture_output=True, text=True)
        log(f"prefix records (blocks per engine, from vLLM's KV events): {record.stdout.strip()}")
        rows.append({"label": "prefix records", "records": record.stdout.strip()})
    return rows


def random_entry(args: argparse.Namespace, tensor_parallel: int = 1) -> dict:
    return {"engine": "vllm", "source": args.model_dir, "frontends": 2,
            "options": {"load_format": args.load_format, "tokenizer": args.tokenizer,
                        "tensor_parallel_size": tensor_parallel}}


def random_dataset(args: argparse.Namespace) -> list[str]:
    return ["--dataset-name", "random", "--random-input-len", str(args.input_len), "--random-output-len",
            str(args.random_output_len)]


def valkey_processes() -> dict[str, psutil.Process]:
    """This script's Valkey (started beside the fleet, not by it)."""
    mine = [p for p in psutil.Process().children(recursive=True) if "valkey" in " ".join(p.cmdline())]
    return {"valkey": mine[0]} if mine else {}


def scale(args: argparse.Namespace, redis_url: str) -> list[dict]:
    rows = []
    for workers in args.gpu_counts:
        gpus = ",".join(str(i) for i in range(workers))
        label = f"{workers}-gpu-gw{args.gateways}"
        with fleet(args, redis_url, f"scale-{label}", gpus, workers, random_entry(args),
                   gateways=args.gateways) as (url, pid):
            for clients in args.clients:
                # Where the CPU goes (% of a core per process): is a fleet part (Valkey is one thread) the cap?
                cpu = CpuSampler({**process_tree(pid), **valkey_processes()})
                row = bench(args, url, f"random-{label}-clients{clients}", random_dataset(args),
                            args.random_concurrency, args.random_prompts, 0, clients)
                rows.append({**row, "cpu_percent": cpu.percent(row["duration_s"])})
                log(f"CPU % of a core: {rows[-1]['cpu_percent']}")
    return rows


def tensor_parallel(args: argparse.Namespace, redis_url: str) -> list[dict]:
    with fleet(args, redis_url, "tp2", "0,1", 1, random_entry(args, tensor_parallel=2),
               gateways=args.gateways) as (url, _):
        return [bench(args, url, "random-tp2", random_dataset(args), args.random_concurrency, args.random_prompts, 0,
                      args.clients[0])]


def table(rows: list[dict]) -> str:
    lines = ["| run | c | " + " | ".join(name for _, name, _ in METRICS) + " | hit rate | failed |",
             "|---|---|" + "---|" * len(METRICS) + "---|---|"]
    for row in rows:
        if "concurrency" not in row:
            continue
        cells = [f"{row[k]:,.{d}f}" if row.get(k) is not None else "-" for k, _, d in METRICS]
        hit = f"{row['hit_rate']:.3f}" if row.get("hit_rate") is not None else "-"
        lines.append(f"| {row['label']} | {row['concurrency']} | " + " | ".join(cells) + f" | {hit} | "
                     f"{row['failed']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["affinity", "scale", "tp"])
    parser.add_argument("--model", default="llama-8b-shape")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    parser.add_argument("--worker-port", type=int, default=9100)
    # affinity: 32 prefixes x 2048 tokens (65k tokens) against 3072 blocks (49k tokens) per worker
    parser.add_argument("--gpu-blocks", type=int, default=3072)
    parser.add_argument("--prefix-len", type=int, default=2048)
    parser.add_argument("--suffix-len", type=int, default=128)
    parser.add_argument("--num-prefixes", type=int, default=32)
    parser.add_argument("--prompts-per-prefix", type=int, default=24)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=64)
    # scale and tp
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--random-output-len", type=int, default=256)
    parser.add_argument("--random-concurrency", type=int, default=2000)
    parser.add_argument("--random-prompts", type=int, default=4000)
    parser.add_argument("--gpu-counts", type=lambda text: [int(n) for n in text.split(",")], default=[2, 1],
                        help="scale: the fleets to measure, by GPUs (one worker each)")
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--clients", type=lambda text: [int(n) for n in text.split(",")], default=[1],
                        help="scale: benchmark client processes sharing the concurrency and the prompts, "
                             "one run per count (tp: the first)")
    args = parser.parse_args()
    args.out = Path(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    args.model_dir = f"/tmp/models/{args.model}"
    args.tokenizer = args.model_dir if Path(args.model_dir, "tokenizer.json").exists() else "/tmp/models/smollm2-135m"
    valkey = EmbeddedValkey()
    valkey.start()
    started = time.monotonic()
    try:
        rows = {"affinity": affinity, "scale": scale, "tp": tensor_parallel}[args.part](args, valkey.url)
    finally:
        valkey.stop()
    (args.out / f"{args.part}.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "rows": rows, "table": table(rows)}, indent=1))
    print(table(rows), flush=True)
    log(f"{args.part} done in {time.monotonic() - started:.0f}s")


if __name__ == "__main__":
    main()
