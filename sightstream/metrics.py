"""Prometheus metrics, all prefixed `sightstream_`. One registry per daemon, so several
daemons can live in one process (tests) without clashing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Capture to result: a backlog makes latency minutes (a percentile past the last bucket reads as it)
E2E_BUCKETS = (*LATENCY_BUCKETS, 120, 300, 600, 1800, 3600)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Every value a counter's label takes (docs/contract.md has the dead-letter reasons). Each is
# created at 0 when the daemon starts: Prometheus' rate() and increase() count a series' first
# sample as its start, so an event that created its series (the first dead-letter, the first
# abandoned batch, the first lost lease) was never seen by an alert or a graph.
DEAD_LETTER_REASONS = ("empty_entry", "missing_image", "bad_fields", "source_gone", "unsupported_format",
                       "bad_image", "bad_raw", "too_large", "model_error", "publish_error", "model_timeout",
                       "max_deliveries")
ACKED_REASONS = ("sampled_out", "stale")
RETRY_REASONS = ("oom", "model_error", "timeout")
LEASE_KINDS = ("consumer", "source", "job")
JOB_END_STATUSES = ("completed", "failed", "cancelled")
UNLOAD_REASONS = ("requested", "evicted", "idle", "reloaded")
JOBS_LABEL = "jobs"  # the pipeline label of jobs' frames (a pipeline's video input has its own)


class Children:
    """Label children looked up once and kept: `labels()` hashes and locks on every call, and
    the hot path would call it per frame."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, tuple[str, ...]], Any] = {}

    def __call__(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), labels)
        if (child := self._cache.get(key)) is None:
            child = self._cache[key] = metric.labels(*labels)
        return child


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, pipelines: Sequence[str] = ()) -> None:
        r = self.registry = registry or CollectorRegistry()
        self._redis_oom_at = float("-inf")  # when Redis last refused a write for want of memory
        self.frames_in = Counter(
            "sightstream_frames_in", "Frames read from input streams", ["pipeline"], registry=r
        )
        self.frames_sampled = Counter(
            "sightstream_frames_sampled", "Frames kept by the FPS sampler", ["pipeline"], registry=r
        )
        self.frames_acked = Counter(
            "sightstream_frames_acked_without_result",
            "Frames acknowledged with no result: skipped by the sampler, or dropped as stale",
            ["pipeline", "reason"],
            registry=r,
        )
        self.frames_published = Counter(
            "sightstream_frames_published", "Results published", ["pipeline"], registry=r
        )
        self.frames_dead_lettered = Counter(
            "sightstream_frames_dead_lettered",
            "Frames sent to the dead-letter stream",
            ["pipeline", "reason"],
            registry=r,
        )
        self.publish_duplicates = Counter(
            "sightstream_publish_not_acked",
            "Outcomes not published: the entry was no longer pending (acknowledged by another daemon, "
            "or its stream deleted)",
            ["pipeline"],
            registry=r,
        )
        self.publish_failures = Counter(
            "sightstream_publish_failures",
            "Writes of a result or dead-letter entry that Redis refused (WRONGTYPE, OOM); the "
            "frame stays pending, is tried again, then dead-lettered (publish_error)",
            ["pipeline"],
            registry=r,
        )
        self.batch_size = Histogram(
            "sightstream_batch_size", "Frames per inference batch", ["pipeline"],
            buckets=BATCH_BUCKETS, registry=r,
        )
        self.decode_seconds = Histogram(
            "sightstream_decode_seconds", "Time to decode one frame", ["pipeline"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inference_seconds = Histogram(
            "sightstream_inference_seconds", "Time of one model call on a batch",
            ["pipeline", "model", "device"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.e2e_latency_seconds = Histogram(
            "sightstream_e2e_latency_seconds", "From a frame's capture ts to its result's publication",
            ["pipeline"], buckets=E2E_BUCKETS, registry=r,
        )
        self.frames_reclaimed = Counter(
            "sightstream_frames_reclaimed", "Pending frames taken over from idle consumers",
            ["pipeline"], registry=r,
        )
        self.heartbeats = Counter(
            "sightstream_heartbeat_claims", "In-flight frames whose idle time was reset (XCLAIM JUSTID)",
            ["pipeline"], registry=r,
        )
        self.model_retries = Counter(
            "sightstream_model_retries", "Batches retried after a model failure (split or abandoned)",
            ["pipeline", "reason"], registry=r,
        )
        self.frames_abandoned = Counter(
            "sightstream_frames_abandoned",
            "Frames of stuck batches left pending for a retry (past the model's timeout)",
            ["pipeline"], registry=r,
        )
        self.predict_requests = Counter(
            "sightstream_predict_requests", "POST /predict requests, by answer", ["model", "status"],
            registry=r,
        )
        self.jobs_running = Gauge("sightstream_jobs_running", "Jobs this daemon runs now", registry=r)
        self.jobs_active = Gauge(
            "sightstream_jobs_active", "Jobs pending or running, group-wide (every daemon reports it)",
            registry=r,
        )
        self.jobs_finished = Counter(
            "sightstream_jobs_finished", "Jobs this daemon ended, by status", ["status"], registry=r
        )
        self.leases_lost = Counter(
            "sightstream_leases_lost", "Leases found lost while held (the work stopped here)", ["kind"],
            registry=r,
        )
        self.redis_errors = Counter(
            "sightstream_redis_errors", "Redis calls that failed (then retried)", ["op"], registry=r
        )
        self.redis_reconnects = Counter(
            "sightstream_redis_reconnects", "Times a Redis call succeeded again after failures", ["op"],
            registry=r,
        )
        self.in_flight = Gauge(
            "sightstream_frames_in_flight", "Frames read and not yet acknowledged", ["pipeline"],
            registry=r,
        )
        self.pipeline_paused = Gauge(
            "sightstream_pipeline_paused",
            "1 while a pipeline reads nothing because its model cannot be loaded (its frames wait in Redis)",
            ["pipeline"], registry=r,
        )
        self.sources = Gauge(
            "sightstream_sources", "Input streams a pipeline reads", ["pipeline"], registry=r
        )
        self.source_pending = Gauge(
            "sightstream_source_pending",
            "Entries of a source read by the group and not yet acknowledged (group-wide: XINFO)",
            ["pipeline", "source"], registry=r,
        )
        self.source_lag = Gauge(
            "sightstream_source_lag", "Entries of a source not yet read by the group (group-wide: XINFO)",
            ["pipeline", "source"], registry=r,
        )
        self.model_loads = Counter(
            "sightstream_model_loads", "Models loaded onto a device", ["device"], registry=r
        )
        self.model_unloads = Counter(
            "sightstream_model_unloads",
            "Models unloaded from a device, by why (requested, evicted, idle, reloaded)",
            ["device", "reason"], registry=r,
        )
        self.model_memory_mb = Gauge(
            "sightstream_model_memory_mb", "Memory the loaded models take on a device (as they report it)",
            ["device"], registry=r,
        )
        self.gpu_utilization = Gauge(
            "sightstream_gpu_utilization_percent", "GPU busy time over the last sample period (NVML)",
            ["device"], registry=r,
        )
        self.gpu_memory_used_mb = Gauge(
            "sightstream_gpu_memory_used_mb", "GPU memory in use by every process (NVML)", ["device"],
            registry=r,
        )
        self._start_at_zero([*pipelines, JOBS_LABEL])

    def _start_at_zero(self, pipelines: list[str]) -> None:
        """Create every counter series whose label values are known (see DEAD_LETTER_REASONS)."""
        for kind in LEASE_KINDS:
            self.leases_lost.labels(kind)
        for status in JOB_END_STATUSES:
            self.jobs_finished.labels(status)
        for name in pipelines:
            for counter in (self.frames_in, self.frames_sampled, self.frames_published,
                            self.publish_duplicates, self.publish_failures, self.frames_reclaimed,
                            self.heartbeats, self.frames_abandoned):
                counter.labels(name)
            for counter, reasons in ((self.frames_acked, ACKED_REASONS),
                                     (self.frames_dead_lettered, DEAD_LETTER_REASONS),
                                     (self.model_retries, RETRY_REASONS)):
                for reason in reasons:
                    counter.labels(name, reason)

    def redis_out_of_memory(self) -> None:
        """Redis refused a write for want of memory (OOM), now: readiness says so a while."""
        self._redis_oom_at = time.monotonic()

    def redis_out_of_memory_within(self, seconds: float) -> bool:
        return time.monotonic() - self._redis_oom_at < seconds

    def start_devices(self, devices: Sequence[str]) -> None:
        """The per-device counters at 0, once the devices are known."""
        for device in devices:
            self.model_loads.labels(device)
            for reason in UNLOAD_REASONS:
                self.model_unloads.labels(device, reason)
