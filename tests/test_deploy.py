"""Deployment files: the Helm chart rendered by Helm's own engine (helm-python-sdk) for the default
values and each ci/ values file, every manifest validated against the Kubernetes schemas
(kubernetes-validate) or, for CRDs, against their schema (tests/schemas); compose.yaml validated
with compose-spec, and its healthcheck commands run against a live gateway and worker."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from common import keys
from common.redis_conn import SentinelUrl
from common.settings import ENV_PREFIX, GatewaySettings, ModelSpec, WorkerSettings
from tests.conftest import StartFleet

ROOT = Path(__file__).parent.parent
CHART = ROOT / "helm" / "llm-fleet"
KUBE_VERSION = "1.33.0"
CRD_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
               ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.json",
               ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json"}
VALUES_FILES = ["default", *sorted(p.name for p in (CHART / "ci").glob("*.yaml"))]
SETTINGS_FIELDS = {f.name for cls in (GatewaySettings, WorkerSettings) for f in dataclasses.fields(cls)}


def assert_catalogue_loads(catalogue: dict[str, Any]) -> None:
    for name, entry in catalogue.items():
        ModelSpec(name=name, **entry)  # raises on an unknown field or a bad value


def render(values_file: str) -> list[dict[str, Any]]:
    values = {} if values_file == "default" else yaml.safe_load((CHART / "ci" / values_file).read_text())
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    manifests = chart.render(values, name="fleet", namespace="llm", is_install=True)
    return [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml")
            for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def assert_settings_exist(env: dict[str, Any]) -> None:
    """Every LLM_FLEET_* variable a deployment sets names a real setting (a typo would be ignored)."""
    for name in env:
        if name.startswith(ENV_PREFIX):
            assert name[len(ENV_PREFIX):].lower() in SETTINGS_FIELDS, name


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_chart_renders_and_every_manifest_validates(values_file: str) -> None:
    docs = render(values_file)
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= {d["kind"] for d in docs}
    for doc in docs:
        crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        if crd is None:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)  # raises on any schema error
        else:
            jsonschema.Draft202012Validator(json.loads((ROOT / "tests" / "schemas" / crd).read_text())).validate(doc)
    for deployment in by_kind(docs, "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert_settings_exist(env_of(container))
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    # The catalogue the workers read is one load_catalogue accepts (frontends, engines, ...).
    (config,) = [d for d in by_kind(docs, "ConfigMap") if "catalogue.json" in d.get("data", {})]
    assert_catalogue_loads(json.loads(config["data"]["catalogue.json"]))


def test_keda_scales_each_worker_group_on_its_models_waiting_jobs() -> None:
    docs = render("gpu-keda-external-redis.yaml")
    scaled = {d["metadata"]["name"]: d for d in by_kind(docs, "ScaledObject")}
    assert set(scaled) == {"fleet-llm-fleet-worker-small", "fleet-llm-fleet-worker-large"}
    small = scaled["fleet-llm-fleet-worker-small"]["spec"]
    assert small["minReplicaCount"] == 0 and small["scaleTargetRef"]["name"] == "fleet-llm-fleet-worker-small"
    waiting, shared, batch = small["triggers"]  # interactive and batch work both scale the group
    # Every waiting job, read from a gateway (tests/test_affinity.py reads this path from a real one).
    assert waiting == {"type": "metrics-api", "metadata": {
        "url": "http://fleet-llm-fleet-gateway.llm.svc:80/queue/smollm2-135m", "valueLocation": "waiting",
        "targetValue": "32", "activationTargetValue": "1"}}
    for trigger, stream in ((shared, keys.job_stream("smollm2-135m")), (batch, keys.batch_stream("smollm2-135m"))):
        assert trigger["type"] == "redis-streams"
        assert trigger["authenticationRef"]["name"] == "fleet-llm-fleet-redis"
        assert trigger["metadata"] == {"address": "redis.example.com:6380", "stream": stream,
                                       "consumerGroup": keys.CONSUMER_GROUP, "lagCount": "32",
                                       "activationLagCount": "1", "enableTLS": "true"}
    (auth,) = by_kind(docs, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "password", "name": "fleet-redis",
                                                "key": "redis-password"}]
    assert not by_kind(docs, "StatefulSet")  # external Redis: none bundled
    # A group scales to zero, so the gateway must queue requests for a model no live worker serves.
    gateway = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-gateway"))
    env = env_of(gateway["spec"]["template"]["spec"]["containers"][0])
    assert env["LLM_FLEET_QUEUE_UNSERVED_MODELS"] == "true"
    assert env["LLM_FLEET_REDIS_URL"] == "rediss://:$(REDIS_PASSWORD)@redis.example.com:6380/0"
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "fleet-redis", "key": "redis-password"}}

    large = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-large"))
    pod = large["spec"]["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 2 == worker["resources"]["requests"]["nvidia.com/gpu"]
    assert worker["args"][:3] == ["worker", "--model", "llama-8b"]
    # SIGTERM drain: the pod's grace period covers the drain (300 s) plus the hand-back margin.
    assert pod["terminationGracePeriodSeconds"] == 330 and env_of(worker)["LLM_FLEET_DRAIN_TIMEOUT_S"] == "300"
    assert env_of(worker)["LLM_FLEET_MAX_ATTEMPTS"] == "5"
    assert {"name": "models", "hostPath": {"path": "/mnt/nvme/models", "type": "DirectoryOrCreate"}} in pod["volumes"]
    assert by_kind(docs, "ServiceMonitor") and not by_kind(docs, "HorizontalPodAutoscaler")[1:]  # gateway HPA only
    catalogue = json.loads(by_kind(docs, "ConfigMap")[0]["data"]["catalogue.json"])
    assert catalogue["llama-8b"]["options"]["tensor_parallel_size"] == 2


def test_ha_values_run_valkey_with_replicas_and_sentinels_and_every_part_goes_through_them(tmp_path) -> None:
    docs = render("ha-sentinel.yaml")
    (valkey,) = by_kind(docs, "StatefulSet")
    assert valkey["spec"]["replicas"] == 3
    pod = valkey["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["valkey", "sentinel"]
    assert all(env_of(c)["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "fleet-redis", "key": "redis-password"}}
               for c in pod["containers"])
    scripts = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-redis-scripts"))
    for name, script in scripts["data"].items():  # each parses as a shell script
        path = tmp_path / name
        path.write_text(script)
        assert subprocess.run(["sh", "-n", str(path)], capture_output=True).returncode == 0, name
    assert "--masterauth" in scripts["data"]["valkey.sh"] and "auth-pass fleet" in scripts["data"]["sentinel.sh"]

    sentinels = [f"fleet-llm-fleet-redis-{i}.fleet-llm-fleet-redis-headless.llm.svc:26379" for i in range(3)]
    for deployment in by_kind(docs, "Deployment"):
        env = env_of(deployment["spec"]["template"]["spec"]["containers"][0])
        url = env["LLM_FLEET_REDIS_URL"]
        assert url == f"redis+sentinel://:$(REDIS_PASSWORD)@{','.join(sentinels)}/fleet/0"
        parsed = SentinelUrl.parse(url.replace("$(REDIS_PASSWORD)", "pw"))
        assert parsed is not None and len(parsed.sentinels) == 3 and parsed.service == "fleet"
    for scaled in by_kind(docs, "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            if trigger["type"] == "metrics-api":  # read from a gateway, which finds the primary itself
                continue
            assert trigger["type"] == "redis-sentinel-streams"
            assert trigger["metadata"]["addresses"] == ",".join(sentinels)
            assert trigger["metadata"]["sentinelMaster"] == "fleet"
    headless = next(d for d in by_kind(docs, "Service") if d["metadata"]["name"].endswith("-redis-headless"))
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]


def test_without_keda_workers_get_cpu_hpas_and_the_bundled_valkey_keeps_an_aof() -> None:
    docs = render("cpu-bundled-hpa.yaml")
    assert not by_kind(docs, "ScaledObject")
    (hpa,) = [d for d in by_kind(docs, "HorizontalPodAutoscaler") if "worker" in d["metadata"]["name"]]
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["scaleTargetRef"]["name"] == "fleet-llm-fleet-worker-cpu"
    (redis,) = by_kind(docs, "StatefulSet")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert "--appendonly yes" in container["args"][0] and '--requirepass "$REDIS_PASSWORD"' in container["args"][0]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "5Gi"
    worker = next(d for d in by_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-cpu"))
    assert "nvidia.com/gpu" not in json.dumps(worker)
    assert env_of(worker["spec"]["template"]["spec"]["containers"][0])["LLM_FLEET_REDIS_URL"] == (
        "redis://:$(REDIS_PASSWORD)@fleet-llm-fleet-redis:6379/0")


@pytest.mark.parametrize(("change", "words"), [
    ({"autoscaling": {"mode": "magic"}}, "mode"),
    ({"workerGroups": [{"name": "Bad_Name", "models": ["m"], "gpu": True, "resources": {},
                        "modelCache": {"type": "pvc"}, "drainTimeoutSeconds": 10, "httpPort": 8081,
                        "autoscaling": {"minReplicas": 0, "maxReplicas": 2, "lagCount": 4}}]}, "name"),
    ({"gatway": {"replicas": 2}}, "gatway"),
    ({"catalogue": {"m": {"engine": "llamacpp"}}}, "engine"),
    ({"catalogue": {"m": {"engine": "vllm", "frontends": 0}}}, "frontends"),
])
def test_values_schema_rejects_bad_values(change: dict[str, Any], words: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=words):
        helm.Chart.load(CHART).validate_schema(change)


def test_chart_lints_clean() -> None:
    report = helm.lint(CHART, strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report


def compose() -> dict[str, Any]:
    # YAML merge keys (<<) are resolved the way Docker Compose's loader resolves them.
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_file_is_a_valid_compose_spec() -> None:
    data = compose()
    spec = PyCompose.from_json(json.dumps(data)).to_spec()  # raises on anything the spec does not allow
    services = spec.services or {}
    assert set(services) == {"redis", "gateway", "lb", "worker-gpu", "worker-cpu", "redis-replica", "sentinel-1",
                             "sentinel-2", "sentinel-3"}
    for name, service in services.items():
        for dependency in service.depends_on or {}:
            assert dependency in services, (name, dependency)
        for config in service.configs or []:
            assert config.source in (spec.configs or {}), (name, config)
        assert_settings_exist(service.environment or {})
        if name != "redis":
            assert service.healthcheck is not None, name
    assert "--appendonly" in services["redis"].command and services["redis"].healthcheck.test[-1] == "ping"
    assert services["gateway"].deploy.replicas == 2
    assert services["worker-gpu"].profiles == {"gpu"} and services["worker-cpu"].profiles == {"cpu"}
    (device,) = services["worker-gpu"].deploy.resources.reservations.devices
    assert device.driver == "nvidia" and device.capabilities == {"gpu"}
    assert "/ready" in " ".join(services["worker-gpu"].healthcheck.test)
    catalogue = json.loads(data["configs"]["catalogue"]["content"])
    assert catalogue[data["services"]["worker-gpu"]["command"][2]]["engine"] == "vllm"
    assert_catalogue_loads(catalogue)
    # The `ha` profile: a replica of `redis` and three Sentinels; the URL is chosen at `up` (see the header).
    assert all(services[name].profiles == {"ha"} for name in ("redis-replica", "sentinel-1", "sentinel-2",
                                                                "sentinel-3"))
    assert services["redis-replica"].command[-4:] == ["redis", "6379", "--replica-announce-ip", "redis-replica"]
    assert data["services"]["gateway"]["environment"]["LLM_FLEET_REDIS_URL"] == (
        "${LLM_FLEET_REDIS_URL:-redis://redis:6379/0}") == data["services"]["worker-cpu"]["environment"][
        "LLM_FLEET_REDIS_URL"]
    ha_url = re.search(r"LLM_FLEET_REDIS_URL=(\S+)", (ROOT / "compose.yaml").read_text()).group(1)
    parsed = SentinelUrl.parse(ha_url)
    assert parsed is not None and [h for h, _ in parsed.sentinels] == ["sentinel-1", "sentinel-2", "sentinel-3"]
    assert f"sentinel monitor {parsed.service} redis 6379 2" in data["configs"]["sentinel"]["content"]


def test_the_compose_sentinel_config_runs_on_the_real_server(valkey, tmp_path) -> None:
    """The `ha` profile's Sentinel config, with `redis` pointed at a local Valkey, on the same server binary."""
    from common.embedded_redis import EmbeddedSentinel

    config = compose()["configs"]["sentinel"]["content"].replace("redis 6379", f"127.0.0.1 {valkey.port}")
    sentinel = EmbeddedSentinel(valkey.port, "unused", tmp_path, down_after_ms=5000, failover_timeout_ms=60000)
    sentinel.config.write_text(f"port {sentinel.port}\ndir {tmp_path}\n{config}")
    sentinel.start()
    try:
        import redis

        client = redis.Redis(port=sentinel.port, socket_connect_timeout=1)
        for _ in range(50):
            try:
                host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "fleet")
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        assert (host, int(port)) == (b"127.0.0.1", valkey.port)
        client.close()
    finally:
        sentinel.stop()


def test_images_pin_what_the_project_pins() -> None:
    """The GPU image's vLLM is the version pyproject's `gpu` extra pins; the CPU image installs with the
    Makefile's `runtime` target, the one CI's install runs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (vllm_pin,) = pyproject["project"]["optional-dependencies"]["gpu"]
    version = vllm_pin.split("==")[1]
    assert f"FROM vllm/vllm-openai:v{version}\n" in (ROOT / "Dockerfile.gpu").read_text()
    assert "RUN make runtime VENV=/opt/venv" in (ROOT / "Dockerfile").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^\$\(STAMP\):.*\n\t\$\(MAKE\) runtime ", makefile, re.MULTILINE)


async def test_compose_healthchecks_pass_against_a_live_gateway_and_worker(start_fleet: StartFleet) -> None:
    """The healthcheck commands from compose.yaml, run as written (only the port changes)."""
    fleet = await start_fleet(workers=0)
    worker = await fleet.start_worker(settings={"http_port": 0})
    await fleet.wait_ready()
    services = compose()["services"]
    port = fleet.base_url.rsplit(":", 1)[1]
    checks = {"gateway": services["gateway"]["healthcheck"]["test"],
              "worker-cpu": services["worker-cpu"]["healthcheck"]["test"]}

    async def run(test: list[str], ports: tuple[str, str]) -> int:
        assert test[0] == "CMD" and test[1] in ("python", "python3")
        argv = [sys.executable, *(arg.replace(*ports) for arg in test[2:])]
        process = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.DEVNULL)
        return await asyncio.wait_for(process.wait(), 30)

    assert await run(checks["gateway"], ("8000", port)) == 0
    assert await run(checks["worker-cpu"], ("8081", str(worker.http_port))) == 0
    await worker.unload("test-echo")  # not ready any more: the worker's check must fail
    assert await run(checks["worker-cpu"], ("8081", str(worker.http_port))) != 0


def test_a_worker_pod_gets_the_gpus_its_models_tensor_parallelism_needs() -> None:
    values = yaml.safe_load((CHART / "ci" / "gpu-keda-external-redis.yaml").read_text())
    large = next(group for group in values["workerGroups"] if group["name"] == "large")
    assert values["catalogue"][large["models"][0]]["options"]["tensor_parallel_size"] == 2
    large["gpusPerWorker"] = 1
    with pytest.raises(Exception, match="tensor_parallel_size 2, more than gpusPerWorker 1"):
        helm.Chart.load(CHART).render(values, name="fleet", namespace="llm", is_install=True)
