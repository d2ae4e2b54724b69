"""The whole OpenAI request on a GPU: the fleet (a vLLM worker) and `vllm serve` on one H200, the same model
(SmolLM2-135M-Instruct, real weights), the same requests, one at a time (greedy, so batching cannot change a
sum): the same text, logprobs within 1e-3, the same top tokens. Then what only the fleet is asked: 50
json_schema answers sampled at temperature 1 validate, a named tool call parses, n=3 with a seed repeats.

    python bench/gpu_openai_parity.py          # after bench/gpu_setup.sh; prints a table, JSON in $OUT
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common.embedded_redis import EmbeddedValkey

MODEL = "smollm2-135m"
MODEL_DIR = f"/tmp/models/{MODEL}"
FLEET, VLLM = "http://127.0.0.1:8500", "http://127.0.0.1:8000"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colours are", "List the planets of the solar system:", "Water boils at",
           "A haiku about the sea:", "The quick brown fox", "In 1969, the first person to walk on the Moon",
           "To make a cup of tea, first"]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}}}


def post(base: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def wait_ready(base: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, _ = (0, None)
        try:
            status, _ = post(base, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1})
        except OSError:
            pass
        if status == 200:
            return
        time.sleep(2)
    raise RuntimeError(f"{base} not ready after {timeout_s} s")


def compare(requests: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for path, body in requests:
        (fleet_status, fleet), (vllm_status, vllm) = post(FLEET, path, body), post(VLLM, path, body)
        assert fleet_status == vllm_status == 200, (fleet, vllm)
        f, v = fleet["choices"][0], vllm["choices"][0]
        if path == "/v1/completions":
            text = (f["text"], v["text"])
            pairs = zip(f["logprobs"]["token_logprobs"], v["logprobs"]["token_logprobs"], strict=False)
            diffs = [abs(a - b) for a, b in pairs if a is not None and b is not None]
            tops = list(zip(f["logprobs"]["top_logprobs"], v["logprobs"]["top_logprobs"], strict=False))
            same_top = all((a or {}).keys() == (b or {}).keys() for a, b in tops)
            differ = next(((a, b) for a, b in tops if (a or {}).keys() != (b or {}).keys()), None)
            tokens = f["logprobs"]["tokens"] == v["logprobs"]["tokens"]
            count = (len(f["logprobs"]["tokens"]), len(v["logprobs"]["tokens"]))
        else:
            text = (f["message"]["content"], v["message"]["content"])
            fc, vc = f["logprobs"]["content"], v["logprobs"]["content"]
            diffs = [abs(a["logprob"] - b["logprob"]) for a, b in zip(fc, vc, strict=False)]
            pairs_top = [([(t["token"], t["logprob"]) for t in a["top_logprobs"]],
                          [(t["token"], t["logprob"]) for t in b["top_logprobs"]])
                         for a, b in zip(fc, vc, strict=False)]
            same_top = all([t for t, _ in a] == [t for t, _ in b] for a, b in pairs_top)
            differ = next(((a, b) for a, b in pairs_top if [t for t, _ in a] != [t for t, _ in b]), None)
            tokens = [t["token"] for t in fc] == [t["token"] for t in vc]
            count = (len(fc), len(vc))
        rows.append({"path": path, "prompt": str(body.get("prompt") or body["messages"][0]["content"])[:28],
                     "echo": bool(body.get("echo")), "same_text": text[0] == text[1], "same_tokens": tokens,
                     "tokens": count, "max_logprob_diff": max(diffs, default=0.0), "same_top": same_top,
                     "first_top_difference": differ})
    return rows


def fleet_only() -> dict[str, Any]:
    import jsonschema

    messages = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    valid = 0
    for seed in range(5):
        status, reply = post(FLEET, "/v1/chat/completions", {"model": MODEL, "messages": messages, "n": 10,
                                                             "seed": seed, "temperature": 1.0, "max_tokens": 80,
                                                             "response_format": fmt})
        for choice in reply["choices"] if status == 200 else []:
            try:
                jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city"], "properties": {"city": {"type": "string", "maxLength": 20}}}}}]
    _, called = post(FLEET, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}, "max_tokens": 40, "temperature": 0})
    call = called["choices"][0]["message"]["tool_calls"][0]["function"]
    sampled = [post(FLEET, "/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "n": 3, "seed": seed,
                                               "temperature": 1.0, "max_tokens": 16})[1] for seed in (5, 5)]
    texts = [[c["text"] for c in s["choices"]] for s in sampled]
    return {"json_schema_valid": f"{valid}/50", "tool_call": call, "tool_arguments_parse": bool(json.loads(
        call["arguments"])), "n3_same_seed_same_texts": texts[0] == texts[1], "n3_distinct": len(set(texts[0]))}


def measure(out: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start both servers, compare them, stop them: (a row per request, what only the fleet was asked)."""
    valkey = EmbeddedValkey()
    valkey.start()
    catalogue = Path(tempfile.mkdtemp()) / "catalogue.json"
    catalogue.write_text(json.dumps({MODEL: {"engine": "vllm", "source": MODEL_DIR, "options": {
        "max_model_len": 2048, "gpu_memory_utilization": 0.3}}}))
    logs = out / "parity-logs"
    logs.mkdir(exist_ok=True)
    vllm = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", MODEL_DIR,
                             "--served-model-name", MODEL, "--port", "8000", "--max-model-len", "2048",
                             "--gpu-memory-utilization", "0.3"],
                            stdout=open(logs / "vllm.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    fleet = subprocess.Popen([sys.executable, "-m", "common.cli", "up", "--redis-url", valkey.url, "--port", "8500",
                              "--worker-http-port", "0", "--model", MODEL, "--catalogue", str(catalogue)],
                             stdout=open(logs / "fleet.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(VLLM, 400)
        wait_ready(FLEET, 400)
        requests = [("/v1/completions", {"model": MODEL, "prompt": p, "max_tokens": 32, "temperature": 0,
                                         "logprobs": 5, "echo": i % 3 == 0}) for i, p in enumerate(PROMPTS)]
        requests += [("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": p}],
                                               "max_tokens": 32, "temperature": 0, "logprobs": True,
                                               "top_logprobs": 5}) for p in PROMPTS[:5]]
        rows = compare(requests)
        extra = fleet_only()
    finally:
        for process in (fleet, vllm):
            os.killpg(process.pid, 2)
        for process in (fleet, vllm):
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
        valkey.stop()
    return rows, extra


def main() -> None:
    out = Path(os.environ.get("OUT", "bench/out"))
    out.mkdir(parents=True, exist_ok=True)
    rows, extra = measure(out)
    print("| route | prompt | echo | same text | same tokens | tokens fleet/vllm | max |logprob diff| | same top-5 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['prompt']} | {r['echo']} | {r['same_text']} | {r['same_tokens']} | "
              f"{r['tokens'][0]}/{r['tokens'][1]} | {r['max_logprob_diff']:.2e} | {r['same_top']} |")
    print(json.dumps(extra))
    for r in rows:
        if r["first_top_difference"]:
            print("top differs (fleet, vllm):", json.dumps(r["first_top_difference"]))
    (out / "openai_parity.json").write_text(json.dumps({"rows": rows, "fleet_only": extra}, indent=1))


if __name__ == "__main__":
    main()
