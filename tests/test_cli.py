"""`llm-fleet up`: embedded Valkey, gateway, N worker processes; ready message; clean Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from common.embedded_redis import free_port


def _children_with(pattern: str, parent: int) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()[1:]
            if pattern in line and int(line.split()[1]) == parent]


def test_up_starts_the_fleet_prints_where_to_point_a_client_and_stops_on_ctrl_c() -> None:
    port = free_port()
    fleet = subprocess.Popen(
        [sys.executable, "-c", "from common.cli import main; main()",
         "up", "--port", str(port), "--workers", "2", "--model", "test-echo"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        lines = []
        while time.monotonic() < deadline:
            line = fleet.stdout.readline()
            lines.append(line)
            if "ready in" in line:
                break
        assert re.search(rf"Point a client at http://127.0.0.1:{port}", "".join(lines)), lines
        assert len(_children_with("llm-fleet worker", fleet.pid)) == 2

        body = json.dumps({"prompt": "cli", "max_tokens": 3}).encode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/generate", data=body, timeout=5) as response:
            request_id = json.load(response)["request_id"]
        for _ in range(100):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/requests/{request_id}", timeout=5) as response:
                reply = json.load(response)
            if reply["status"] == "completed":
                break
            time.sleep(0.05)
        assert reply["text"] == "cli"

        children = _children_with("", fleet.pid)
        fleet.send_signal(signal.SIGINT)
        assert fleet.wait(60) == 0
        time.sleep(0.2)
        alive = [pid for pid in children if os.path.exists(f"/proc/{pid}") and
                 "Z" not in open(f"/proc/{pid}/stat").read().split()[2]]
        assert alive == [], "every part of the fleet stopped"
    finally:
        if fleet.poll() is None:
            fleet.kill()
