"""The worker's Prometheus metrics (served at /metrics by worker/http_server.py).

Counters and histograms are updated once per job (at its end), never per token; gauges (running,
KV, GPU, model state) are set from a status snapshot when Prometheus scrapes. Latencies that start at
`enqueued_at` compare the gateway's clock with this worker's: hosts are expected to run NTP.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from common.protocol import ModelState, WorkerStatus

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)


class WorkerMetrics:
    def __init__(self, worker_id: str) -> None:
        self.registry = CollectorRegistry()  # per worker: tests run several in one process
        r, model = self.registry, ["model"]
        self.info = Gauge("llm_fleet_worker_info", "This worker (value 1)", ["worker_id"], registry=r)
        self.info.labels(worker_id).set(1)
        self.queue_wait = Histogram("llm_fleet_queue_wait_seconds", "Enqueued until a worker started the job",
                                    model, buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("llm_fleet_time_to_first_token_seconds", "Enqueued until the first output token",
                              model, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("llm_fleet_inter_token_latency_seconds",
                             "Mean time between output tokens, one observation per request", model,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("llm_fleet_e2e_request_latency_seconds", "Enqueued until the request finished",
                             model, buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("llm_fleet_prompt_tokens", "Prompt tokens of jobs started", model, registry=r)
        self.cached_tokens = Counter("llm_fleet_prompt_tokens_cached", "Prompt tokens of jobs started that the "
                                     "engine's prefix cache held (hit rate: this over llm_fleet_prompt_tokens)",
                                     model, registry=r)
        self.generation_tokens = Counter("llm_fleet_generation_tokens", "Output tokens generated", model, registry=r)
        self.finished = Counter("llm_fleet_requests_finished", "Jobs that ended here, by finish reason",
                                ["model", "finish_reason"], registry=r)
        self.jobs_taken = Counter("llm_fleet_jobs_taken", "Jobs read from the engine's own stream (routed here by "
                                  "prefix affinity), the shared stream, or another engine's (it waited too long "
                                  "there)", ["model", "source"], registry=r)
        self.jobs_done = Counter("llm_fleet_jobs_done", "Jobs that ended here, by priority class",
                                 ["model", "priority"], registry=r)
        self.preempted = Counter("llm_fleet_jobs_preempted", "Running batch jobs stopped to make way for interactive "
                                 "ones (parked, continued later from their output so far)", model, registry=r)
        self.reclaimed = Counter("llm_fleet_jobs_reclaimed", "Jobs claimed from dead workers", model, registry=r)
        self.handed_back = Counter("llm_fleet_jobs_handed_back", "Jobs re-queued on drain or unload", model,
                                   registry=r)
        self.dead_lettered = Counter("llm_fleet_jobs_dead_lettered", "Jobs moved to the dead-letter stream", model,
                                     registry=r)
        self.task_crashes = Counter("llm_fleet_task_crashes", "Long-lived tasks (publisher, reader, heartbeat, "
                                    "...) that raised and were restarted", ["task"], registry=r)
        self.running = Gauge("llm_fleet_running_requests", "Jobs admitted by the KV budget", model, registry=r)
        self.running_batch = Gauge("llm_fleet_running_batch_requests", "Of those, batch-class jobs", model,
                                   registry=r)
        self.engine_running = Gauge("llm_fleet_engine_running_requests", "Running, as the engine reports it",
                                    model, registry=r)
        self.engine_waiting = Gauge("llm_fleet_engine_waiting_requests", "Waiting inside the engine", model,
                                    registry=r)
        self.kv_used = Gauge("llm_fleet_kv_cache_used_tokens", "KV tokens reserved by admitted jobs", model,
                             registry=r)
        self.kv_capacity = Gauge("llm_fleet_kv_cache_capacity_tokens", "The engine's KV capacity", model, registry=r)
        self.kv_usage = Gauge("llm_fleet_kv_cache_usage_ratio", "KV usage as the engine reports it (0..1)", model,
                              registry=r)
        self.model_state = Gauge("llm_fleet_model_state", "1 for the model's current state on this worker",
                                 ["model", "state"], registry=r)
        self.load_progress = Gauge("llm_fleet_model_load_progress_ratio", "Load progress (0..1)", model, registry=r)
        self.gpu_available = Gauge("llm_fleet_gpu_available", "1 when NVML sees a GPU", registry=r)
        self.gpu_utilization = Gauge("llm_fleet_gpu_utilization_ratio", "GPU utilization (0..1), NVML", ["gpu"],
                                     registry=r)
        self.gpu_memory_used = Gauge("llm_fleet_gpu_memory_used_bytes", "GPU memory used, NVML", ["gpu"], registry=r)
        self.gpu_memory_total = Gauge("llm_fleet_gpu_memory_total_bytes", "GPU memory, NVML", ["gpu"], registry=r)
        # What each process counts for itself (jobs, tokens, latencies, its KV budget): a worker's /metrics adds
        # its front-end processes' series of these families (worker/frontend_metrics.py); engine and GPU
        # series come from the worker alone.
        self.per_process_families = frozenset(family.name for metric in (
            self.queue_wait, self.ttft, self.itl, self.e2e, self.prompt_tokens, self.cached_tokens,
            self.generation_tokens, self.finished, self.jobs_taken, self.reclaimed, self.handed_back,
            self.dead_lettered, self.running, self.kv_used, self.kv_capacity, self.task_crashes, self.jobs_done,
            self.preempted, self.running_batch)
            for family in metric.describe())

    def job_done(self, model: str, *, enqueued_at: float, started_at: float, first_output_at: float | None,
                 finished_at: float, prompt_tokens: int, cached_tokens: int, new_tokens: int,
                 finish_reason: str, priority: str) -> None:
        """One finished run of a job on this worker (a continuation counts only what it generated)."""
        self.queue_wait.labels(model).observe(max(0.0, started_at - enqueued_at))
        if first_output_at is not None:
            self.ttft.labels(model).observe(max(0.0, first_output_at - enqueued_at))
            if new_tokens > 1:
                self.itl.labels(model).observe((finished_at - first_output_at) / (new_tokens - 1))
        self.e2e.labels(model).observe(max(0.0, finished_at - enqueued_at))
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.cached_tokens.labels(model).inc(min(cached_tokens, prompt_tokens))
        self.generation_tokens.labels(model).inc(new_tokens)
        self.finished.labels(model, finish_reason).inc()
        self.jobs_done.labels(model, priority).inc()

    def render(self, status: WorkerStatus) -> bytes:
        """The exposition text, gauges set from `status` first."""
        self.model_state.clear()
        for gauge in (self.running, self.running_batch, self.engine_running, self.engine_waiting, self.kv_used,
                      self.kv_capacity, self.kv_usage, self.load_progress):
            gauge.clear()  # an unloaded model's series disappear
        for name, model in status.models.items():
            for state in ModelState:
                self.model_state.labels(name, state.value).set(1 if model["state"] == state else 0)
            self.load_progress.labels(name).set(model["progress"])
            self.running.labels(name).set(model["running"])
            self.running_batch.labels(name).set(model.get("running_batch", 0))
            self.kv_used.labels(name).set(model["kv_used_tokens"])
            self.kv_capacity.labels(name).set(model["kv_capacity_tokens"])
            for gauge, key in ((self.engine_running, "engine_running"), (self.engine_waiting, "engine_waiting"),
                               (self.kv_usage, "engine_kv_usage")):
                if model.get(key) is not None:
                    gauge.labels(name).set(model[key])
        self.gpu_available.set(1 if status.gpu.get("available") else 0)
        for device in status.gpu.get("devices", []):
            gpu = str(device["index"])
            self.gpu_utilization.labels(gpu).set(device["utilization"])
            self.gpu_memory_used.labels(gpu).set(device["memory_used_bytes"])
            self.gpu_memory_total.labels(gpu).set(device["memory_total_bytes"])
        return generate_latest(self.registry)
