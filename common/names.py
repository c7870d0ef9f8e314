"""Every exchange, queue and routing-key name on the bus, in one place.

Routing model (the same on RabbitMQ and on the in-memory bus):
- Point-to-point messages go through the default exchange ("") with the queue
  name as routing key: `bus.publish(names.JOB_QUEUE, body)`.
- Broadcasts go to a topic exchange; each listener binds its own exclusive
  queue: heartbeats, scheduler stats and snapshots on EVENTS_EXCHANGE, job cancels on
  CONTROL_EXCHANGE (the gateway does not know which replica holds a job).
- Every queue we declare dead-letters into DLX_EXCHANGE -> DEAD_LETTER_QUEUE.
"""
from __future__ import annotations

PREFIX = "fastserve"

# Dead letters: a message a handler could not process (bad schema, crash).
DLX_EXCHANGE = f"{PREFIX}.dlx"
DEAD_LETTER_QUEUE = f"{PREFIX}.dead_letter"

# Jobs: one durable queue shared by all scheduler replicas of a model.
JOB_QUEUE = f"{PREFIX}.jobs"

# The public submission interface (docs/queue.md): anyone may publish a
# SubmitRequest here (durable; every gateway consumes it). Results go to the
# reply queue the submitter names.
SUBMIT_QUEUE = f"{PREFIX}.submit"
# Results of the Batch API's requests (durable; every gateway consumes it and
# records them in the database).
BATCH_RESULTS_QUEUE = f"{PREFIX}.batch_results"

# Broadcast exchanges (topic).
EVENTS_EXCHANGE = f"{PREFIX}.events"
CONTROL_EXCHANGE = f"{PREFIX}.control"
# KV copy reports: the worker publishes each once; the replica's scheduler and
# KV store both hear it (a move costs one KVCopy and one KVCopyDone).
KV_EXCHANGE = f"{PREFIX}.kv"

# Routing keys on EVENTS_EXCHANGE.
HEARTBEAT_KEY_PREFIX = "heartbeat"  # heartbeat.<service>.<instance_id>
STATS_KEY_PREFIX = "stats"  # stats.<instance_id>
SNAPSHOT_KEY_PREFIX = "snapshot"  # snapshot.<instance_id>: the dashboard's SchedulerSnapshot
HEARTBEAT_PATTERN = "heartbeat.#"
STATS_PATTERN = "stats.#"
SNAPSHOT_PATTERN = "snapshot.#"

# Routing keys on CONTROL_EXCHANGE.
CANCEL_KEY = "cancel"


def heartbeat_key(service: str, instance_id: str) -> str:
    return f"{HEARTBEAT_KEY_PREFIX}.{service}.{instance_id}"


def stats_key(instance_id: str) -> str:
    return f"{STATS_KEY_PREFIX}.{instance_id}"


def snapshot_key(instance_id: str) -> str:
    return f"{SNAPSHOT_KEY_PREFIX}.{instance_id}"


def reply_queue(gateway_id: str) -> str:
    """Exclusive per-gateway queue that token events for its jobs come back on."""
    return f"{PREFIX}.reply.{gateway_id}"


def events_queue(instance_id: str) -> str:
    """Exclusive per-instance queue bound to EVENTS_EXCHANGE (heartbeats, stats)."""
    return f"{PREFIX}.events.{instance_id}"


def dashboard_queue(gateway_id: str) -> str:
    """Exclusive per-gateway queue bound to EVENTS_EXCHANGE for SchedulerSnapshots."""
    return f"{PREFIX}.dashboard.{gateway_id}"


def control_queue(instance_id: str) -> str:
    """Exclusive per-scheduler queue bound to CONTROL_EXCHANGE (cancels)."""
    return f"{PREFIX}.control.{instance_id}"


# Per-replica plumbing between scheduler, workers and KV store. A worker's and
# a KV store's command queues belong to the instance (exclusive): when the
# process dies its queue goes with it, stale commands included, a publish to
# it fails at once, and a restarted instance starts from an empty queue.
def worker_queue(replica: str, instance_id: str) -> str:
    return f"{PREFIX}.worker.{replica}.{instance_id}"


def kvstore_queue(replica: str, instance_id: str) -> str:
    return f"{PREFIX}.kvstore.{replica}.{instance_id}"


def scheduler_queue(replica: str) -> str:
    """Batch results and copy reports back to one replica's scheduler."""
    return f"{PREFIX}.scheduler.{replica}"


def kv_done_key(replica: str) -> str:
    """Routing key of a replica's KVCopyDone on KV_EXCHANGE."""
    return f"done.{replica}"
