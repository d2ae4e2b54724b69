"""Several `vllm bench serve` runs back to back in one process: vLLM's own benchmark client, its
parser and its metrics, with one start-up (imports, tokenizer) for all of them instead of ~20 s each.

Usage: python bench/vllm_bench_client.py RUNS.json, where RUNS.json is a list of argv lists, each
what `vllm bench serve` would take. Each run prints vLLM's "Starting main benchmark run..." when
its timed part begins (bench/vllm_vs_fleet.py starts its samplers there) and "RUN DONE" after.

With BENCH_START_AT (a Unix time) in the environment, the timed part waits for that instant, so that
several clients started together (each with its own tokenizer load and dataset) load the server at
once: one Python client reading thousands of streams is itself a bottleneck (bench/gpu_affinity.py).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import sys
import time

from vllm.benchmarks import serve
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser


def start_together(start_at: float) -> None:
    """Make serve's `benchmark` coroutine (what main calls after preparing) wait until `start_at`."""
    benchmark = serve.benchmark

    @functools.wraps(benchmark)
    async def at_start(*args, **kwargs):
        await asyncio.sleep(max(0.0, start_at - time.time()))
        return await benchmark(*args, **kwargs)

    serve.benchmark = at_start


def run_all(runs: list[list[str]]) -> None:
    for argv in runs:
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        main(parser.parse_args(argv))
        print("RUN DONE", flush=True)


if __name__ == "__main__":
    if os.environ.get("BENCH_START_AT"):
        start_together(float(os.environ["BENCH_START_AT"]))
    with open(sys.argv[1]) as runs:
        run_all(json.load(runs))
