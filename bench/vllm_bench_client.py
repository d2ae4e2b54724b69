"""Several `vllm bench serve` runs back to back in one process: vLLM's own benchmark client, its
parser and its metrics, with one start-up (imports, tokenizer) for all of them instead of ~20 s each.

Usage: python bench/vllm_bench_client.py RUNS.json, where RUNS.json is a list of argv lists, each
what `vllm bench serve` would take. Each run prints vLLM's "Starting main benchmark run..." when
its timed part begins (bench/vllm_vs_fleet.py starts its samplers there) and "RUN DONE" after.
"""

from __future__ import annotations

import json
import sys

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser


def run_all(runs: list[list[str]]) -> None:
    for argv in runs:
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        main(parser.parse_args(argv))
        print("RUN DONE", flush=True)


if __name__ == "__main__":
    with open(sys.argv[1]) as runs:
        run_all(json.load(runs))
