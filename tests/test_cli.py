"""`llm-fleet up`: embedded Valkey, gateway, N worker processes; ready message; clean Ctrl-C."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from common.embedded_redis import free_port
from common.fleet import gpu_groups


def _children_with(pattern: str, parent: int) -> list[int]:
    """Children of `parent` whose full command line contains `pattern` (read from /proc: `ps` truncates
    its output to $COLUMNS when that is set, as it is on some CI machines)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and pattern in cmdline:
            found.append(int(entry.name))
    return found


def test_up_starts_the_fleet_prints_where_to_point_a_client_and_stops_on_ctrl_c() -> None:
    port = free_port()
    fleet = subprocess.Popen(
        [sys.executable, "-c", "from common.cli import main; main()",
         "up", "--port", str(port), "--worker-http-port", "0", "--gpus", "0,1", "--model", "test-echo"],
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
        playground = re.search(rf"playground: (http://127.0.0.1:{port}/) ", fleet.stdout.readline())
        assert playground, "the ready message names the playground's URL"
        with urllib.request.urlopen(playground.group(1), timeout=5) as response:
            assert b"llm-fleet playground" in response.read()
        workers = _children_with("llm-fleet worker", fleet.pid)
        assert len(workers) == 2, "--gpus 0,1: one worker per GPU"
        environments = [dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
                        for pid in workers]
        assert sorted(e["CUDA_VISIBLE_DEVICES"] for e in environments) == ["0", "1"]
        assert all(e["NCCL_NVLS_ENABLE"] == "0" for e in environments), "NVLink multicast stays off"

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


def test_up_with_two_gateways_spreads_connections_and_survives_one_gateway_dying() -> None:
    """`--gateways 2`: both processes listen on one port (SO_REUSEPORT) and take connections; one killed,
    the other keeps serving while the supervisor restarts it."""
    import http.client

    import psutil

    port = free_port()
    fleet = subprocess.Popen(
        [sys.executable, "-c", "from common.cli import main; main()", "up", "--port", str(port),
         "--worker-http-port", "0", "--gateways", "2", "--model", "test-echo"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "ready in" not in fleet.stdout.readline():
            pass
        gateways = _children_with("llm-fleet gateway", fleet.pid)
        assert len(gateways) == 2

        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=5) for _ in range(24)]
        for connection in connections:  # kept alive: each stays with the process that accepted it
            connection.request("GET", "/health")
            assert connection.getresponse().read() == b'{"status": "ok"}'
        held = {pid: sum(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
                         for c in psutil.Process(pid).net_connections("tcp")) for pid in gateways}
        assert sum(held.values()) == 24 and all(held.values()), held
        for connection in connections:
            connection.close()

        os.kill(gateways[0], signal.SIGKILL)
        while psutil.pid_exists(gateways[0]) and psutil.Process(gateways[0]).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        # A connection that reached the killed process's listener in the moment it died is reset (as with
        # any killed server); from then on the survivor, and soon the restarted one, serve every request.
        time.sleep(0.1)
        for i in range(20):
            body = json.dumps({"prompt": f"still here {i}", "max_tokens": 4}).encode()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/generate", data=body, timeout=5) as response:
                assert response.status == 202
            time.sleep(0.05)
        deadline = time.monotonic() + 20
        while len(_children_with("llm-fleet gateway", fleet.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_children_with("llm-fleet gateway", fleet.pid)) == 2, "the supervisor restarted it"
        fleet.send_signal(signal.SIGINT)
        assert fleet.wait(60) == 0
    finally:
        if fleet.poll() is None:
            fleet.kill()


def _worker_logging_to(valkey_url: str, stderr: int, *flags: str) -> subprocess.Popen:
    """A worker process whose log goes to `stderr`."""
    worker = subprocess.Popen([sys.executable, "-m", "common.cli", "worker", "--redis-url", valkey_url,
                               "--model", "test-echo", *flags], stdout=subprocess.DEVNULL, stderr=stderr,
                              cwd=Path(__file__).parent.parent)
    return worker


def test_logs_are_text_on_a_terminal_and_json_otherwise(valkey) -> None:
    import pty
    import select

    controller, terminal = pty.openpty()
    worker = _worker_logging_to(valkey.url, terminal)
    os.close(terminal)
    try:
        ready, _, _ = select.select([controller], [], [], 30)
        assert ready, "the worker logged nothing"
        line = os.read(controller, 4096).decode().splitlines()[0]
        assert re.match(r"^\d\d:\d\d:\d\d\.\d{3} INFO worker  \S", line), line
    finally:
        worker.kill()
        worker.wait()
        os.close(controller)

    for flags in ([], ["--log-format", "json"]):  # a pipe (compose, Kubernetes): JSON, as when asked
        worker = _worker_logging_to(valkey.url, subprocess.PIPE, *flags)
        try:
            line = json.loads(worker.stderr.readline())
            assert line["component"] == "worker" and line["level"] == "info" and line["msg"], line
        finally:
            worker.kill()
            worker.wait()


def test_gpus_split_into_one_group_per_worker_of_the_models_tensor_parallel_size(tmp_path: Path) -> None:
    catalogue = tmp_path / "catalogue.json"
    catalogue.write_text(json.dumps({"big": {"engine": "vllm", "source": "/m",
                                             "options": {"tensor_parallel_size": 2}}}))

    def groups(**args: object) -> list[str]:
        return gpu_groups(argparse.Namespace(**{"gpus": None, "gpus_per_worker": None, "workers": None,
                                                "catalogue": str(catalogue), **args}), ["big"])

    assert groups() == []
    assert groups(gpus="0,1,2,3") == ["0,1", "2,3"], "tensor_parallel_size 2: two GPUs per worker"
    assert groups(gpus="0,1,2,3", gpus_per_worker=1) == ["0", "1", "2", "3"]
    assert groups(gpus="4,5", workers=1) == ["4,5"]
    for bad, words in (({"gpus": "0,1,2"}, "do not split"), ({"gpus": "0,1", "workers": 2}, "does not match")):
        with pytest.raises(SystemExit, match=words):
            groups(**bad)
