"""Log lines: readable text on a terminal, one JSON object per line otherwise (or when asked).

`request_id` (and any other `extra`) appears on the line when a line concerns one. The format is
`--log-format` / LLM_FLEET_LOG_FORMAT: `auto` (text when stderr is a terminal, as under `make run`;
JSON under Kubernetes, compose or a pipe), `text` or `json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
LOG_FORMATS = ("auto", "text", "json")


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": round(time.time(), 3),
            "level": record.levelname.lower(),
            "component": self.component,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(_extras(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """`12:00:01.234 WARN  gateway  message  request_id=... model=...` (colour on a terminal)."""

    _COLOURS = {"WARNING": "\x1b[33m", "ERROR": "\x1b[31m", "CRITICAL": "\x1b[31;1m"}

    def __init__(self, component: str, colour: bool) -> None:
        super().__init__()
        self.component = component
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        level = record.levelname[:4]
        if self.colour and record.levelname in self._COLOURS:
            level = f"{self._COLOURS[record.levelname]}{level}\x1b[0m"
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{clock} {level:<4} {self.component:<7} {record.getMessage()}" + (f"  {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=os.environ.get("LLM_FLEET_LOG_FORMAT", "auto"),
                        help="text on a terminal, JSON otherwise (auto, the default); env LLM_FLEET_LOG_FORMAT")


def setup_logging(component: str, level: str = "INFO", log_format: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    terminal = sys.stderr.isatty()
    if log_format == "text" or (log_format == "auto" and terminal):
        handler.setFormatter(TextFormatter(component, colour=terminal))
    else:
        handler.setFormatter(JsonFormatter(component))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # arq logs every job, cron ticks included (housekeeping every 10 s); our own lines say what matters.
    for noisy in ("aiohttp.access", "transformers", "httpx", "arq.worker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
