"""`llm-fleet`: up (the whole fleet on one machine), gateway, worker.

The subcommands' modules are imported only when chosen, so `common` does not depend on
`gateway` or `worker`, and a gateway process never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

_PARTS = {
    "up": ("common.fleet", "start the whole fleet here: embedded Valkey, gateway, CPU worker(s)"),
    "gateway": ("gateway.main", "run one gateway against a Redis"),
    "worker": ("worker.main", "run one worker against a Redis"),
    "keys": ("common.keys_cli", "create, list or revoke API keys"),
    "status": ("common.status_cli", "workers, models, KV use, queues and tokens/s, from Redis"),
    "models": ("common.models_cli", "load or unload a model on running workers (control plane)"),
    "batch": ("common.batch_cli", "submit a JSONL batch, follow it, fetch its results (Batch API)"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="llm-fleet", description="A queue-based LLM inference fleet.")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = argv[0] if argv and argv[0] in _PARTS else None
    for name, (module, help_text) in _PARTS.items():
        part = sub.add_parser(name, help=help_text)
        if name == chosen:
            importlib.import_module(module).add_arguments(part)
    args = parser.parse_args(argv)
    importlib.import_module(_PARTS[args.command][0]).run(args)


if __name__ == "__main__":
    main()
