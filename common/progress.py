"""Progress bars for the CLI (tqdm; shown only on a terminal): model loads, from worker heartbeats."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from common.protocol import ModelState, WorkerStatus


def load_bar(description: str) -> tqdm:
    """A 0..100 % bar; off when stderr is not a terminal (CI logs, pipes)."""
    return tqdm(total=100, desc=description, unit="%", bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}",
                disable=None if sys.stderr.isatty() else True, leave=False)


def load_fraction(workers: list[WorkerStatus], model: str | None = None,
                  worker_ids: set[str] | None = None) -> float:
    """Mean load progress of `model` (all models when None) on the given workers (all when None):
    ready counts as done; a worker that does not list the model yet counts as 0."""
    fractions: list[float] = []
    for worker in workers:
        if worker_ids is not None and worker.worker_id not in worker_ids:
            continue
        models: dict[str, Any] = worker.models if model is None else {model: worker.models.get(model)}
        for status in models.values():
            if status is None or status["state"] in (ModelState.FAILED, ModelState.UNLOADING):
                fractions.append(0.0)
            else:
                fractions.append(1.0 if status["state"] == ModelState.READY else float(status["progress"]))
    return sum(fractions) / len(fractions) if fractions else 0.0


def advance(bar: tqdm, fraction: float) -> None:
    target = round(fraction * 100)
    if target > bar.n:
        bar.update(target - bar.n)
