"""Prometheus metrics, named after vLLM's (`vllm:` -> `fastserve:`).

One `Metrics` per app, each with its own CollectorRegistry, so that several
apps (tests, the one-process mode) never clash in the global registry.
Request-level metrics are observed by the gateway, once per HTTP request
(a request with n choices is one request: one TTFT, one latency, its prompt
tokens once); scheduler-state gauges are
fed from the SchedulerStats each scheduler broadcasts, labelled by scheduler
instance so that several replicas show side by side.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from fastserve.common.schemas import SchedulerStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0)
_BATCH_BUCKETS = (0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        r, m = self.registry, ["model_name"]
        s = ["model_name", "scheduler"]
        self.time_to_first_token = Histogram(
            "fastserve:time_to_first_token_seconds", "Time from request arrival to the first token.", m,
            buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "fastserve:inter_token_latency_seconds", "Time between consecutive output tokens.", m,
            buckets=_ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram(
            "fastserve:e2e_request_latency_seconds", "Time from request arrival to its last token.", m,
            buckets=_LATENCY_BUCKETS, registry=r)
        self.request_queue_time = Histogram(
            "fastserve:request_queue_time_seconds", "Time a request waited before it was first scheduled.", m,
            buckets=_LATENCY_BUCKETS, registry=r)
        # The latency histograms above describe interactive requests (REST, and queue requests
        # with priority 0). Batch-class work from the submission queue waits behind them by
        # design; mixed in, its hours-long latencies would hide what interactive users see.
        self.batch_request_latency = Histogram(
            "fastserve:batch_request_latency_seconds", "Batch-class requests from the submission queue: from "
            "the message's timestamp (or its taking) to the last token.", m, buckets=_BATCH_BUCKETS, registry=r)
        self.prompt_tokens = Counter("fastserve:prompt_tokens", "Prompt tokens processed.", m, registry=r)
        self.generation_tokens = Counter("fastserve:generation_tokens", "Tokens generated.", m, registry=r)
        self.request_success = Counter(
            "fastserve:request_success", "Requests finished, by finish reason.", [*m, "finished_reason"], registry=r)
        self.request_errors = Counter(
            "fastserve:request_errors", "Requests refused or failed, by HTTP status.", [*m, "status"], registry=r)
        self.num_requests_running = Gauge(
            "fastserve:num_requests_running", "Jobs in the running batch.", s, registry=r)
        self.num_requests_waiting = Gauge(
            "fastserve:num_requests_waiting", "Jobs waiting to be scheduled.", s, registry=r)
        self.num_requests_swapped = Gauge(
            "fastserve:num_requests_swapped", "Jobs whose KV cache is offloaded to host memory.", s, registry=r)
        self.kv_cache_usage = Gauge(
            "fastserve:kv_cache_usage_perc", "GPU KV-cache usage (1 = full).", s, registry=r)
        self.cpu_cache_usage = Gauge(
            "fastserve:cpu_cache_usage_perc", "Host KV-cache usage (1 = full).", s, registry=r)
        self.num_preemptions = Counter(
            "fastserve:num_preemptions", "Cumulative preemptions.", s, registry=r)
        self.iterations = Counter(
            "fastserve:iterations", "Iterations (batches) the scheduler's worker ran.", s, registry=r)
        self.worker_step_seconds = Counter(
            "fastserve:worker_step_seconds", "Seconds the worker spent in engine steps: over the wall time of a "
            "busy period, the worker's busy fraction.", s, registry=r)
        self.mlfq_queue_jobs = Gauge(
            "fastserve:mlfq_queue_jobs", "Jobs in each MLFQ priority queue (0 = highest).", [*s, "queue"], registry=r)
        self._last_totals: dict[tuple[str, str], float] = {}
        self._queues_seen: dict[str, int] = {}

    # ------------------------------------------------------------ requests (gateway side)
    def observe_first_token(self, seconds: float) -> None:
        self.time_to_first_token.labels(self.model_name).observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.inter_token_latency.labels(self.model_name).observe(seconds)

    def observe_queue_time(self, seconds: float) -> None:
        self.request_queue_time.labels(self.model_name).observe(seconds)

    def observe_request(self, seconds: float, finish_reason: str, prompt_tokens: int, generated_tokens: int) -> None:
        """Once per request (not per choice): its latency, its prompt tokens
        (each prompt once) and the tokens of every choice it returns."""
        self.e2e_request_latency.labels(self.model_name).observe(seconds)
        self.request_success.labels(self.model_name, finish_reason).inc()
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(generated_tokens)

    def observe_batch_request(self, seconds: float, finish_reason: str, prompt_tokens: int,
                              generated_tokens: int) -> None:
        """A batch-class request finished: its own latency histogram; counted in
        request_success and the token counters like any request."""
        self.batch_request_latency.labels(self.model_name).observe(seconds)
        self.request_success.labels(self.model_name, finish_reason).inc()
        self.prompt_tokens.labels(self.model_name).inc(prompt_tokens)
        self.generation_tokens.labels(self.model_name).inc(generated_tokens)

    def observe_error(self, status: int) -> None:
        self.request_errors.labels(self.model_name, str(status)).inc()

    # ------------------------------------------------------------ scheduler state
    def observe_scheduler_stats(self, stats: SchedulerStats) -> None:
        labels = (self.model_name, stats.instance_id)
        self.num_requests_running.labels(*labels).set(stats.num_running)
        self.num_requests_waiting.labels(*labels).set(stats.num_waiting)
        self.num_requests_swapped.labels(*labels).set(stats.num_swapped)
        self.kv_cache_usage.labels(*labels).set(stats.gpu_kv_usage)
        self.cpu_cache_usage.labels(*labels).set(stats.cpu_kv_usage)
        for counter, total in ((self.num_preemptions, stats.num_preemptions), (self.iterations, stats.iterations),
                               (self.worker_step_seconds, stats.step_seconds)):
            self._add_total(counter, labels, total)
        for q, n in enumerate(stats.queue_lengths):
            self.mlfq_queue_jobs.labels(*labels, str(q)).set(n)
        for q in range(len(stats.queue_lengths), self._queues_seen.get(stats.instance_id, 0)):
            self.mlfq_queue_jobs.remove(*labels, str(q))
        self._queues_seen[stats.instance_id] = len(stats.queue_lengths)

    def _add_total(self, counter: Counter, labels: tuple[str, str], total: float) -> None:
        """Schedulers report running totals; the counter gets what is new."""
        key = (counter._name, labels[1])
        last = self._last_totals.get(key, 0)
        # A restarted scheduler counts from zero again: then the whole value is new.
        counter.labels(*labels).inc(total - last if total >= last else total)
        self._last_totals[key] = total

    def forget_scheduler(self, instance_id: str) -> None:
        """Drop the gauges of a scheduler that stopped sending stats."""
        labels = (self.model_name, instance_id)
        for g in (self.num_requests_running, self.num_requests_waiting, self.num_requests_swapped,
                  self.kv_cache_usage, self.cpu_cache_usage):
            try:
                g.remove(*labels)
            except KeyError:
                pass
        for q in range(self._queues_seen.pop(instance_id, 0)):
            self.mlfq_queue_jobs.remove(*labels, str(q))

    def render(self) -> tuple[bytes, str]:
        """(body, content type) for GET /metrics."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
