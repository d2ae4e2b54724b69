"""The fleet answers as `vllm serve` does, on one GPU (bench/gpu_openai_parity.py, run as a test): the same
greedy text, tokens, logprobs (within 1e-3) and top tokens on completions (with echo) and chat, and only
valid JSON under json_schema. Skipped where there is no vLLM or no GPU (run with `pytest -m gpu`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_gpu_vllm import _why_skip

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_why_skip() is not None, reason=str(_why_skip()))]


def test_the_fleet_answers_as_vllm_serve_does(tmp_path: Path) -> None:
    from bench.gpu_openai_parity import measure

    rows, fleet_only = measure(tmp_path)
    assert len(rows) == 15
    for row in rows:
        assert row["same_text"] and row["same_tokens"] and row["same_top"], row
        assert row["max_logprob_diff"] < 1e-3, row
    assert fleet_only["json_schema_valid"] == "50/50" and fleet_only["tool_arguments_parse"]
    assert fleet_only["n3_same_seed_same_texts"] and fleet_only["n3_distinct"] == 3
