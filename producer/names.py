"""Every Redis key, stream, group and channel name Pravāha uses, built in this one module.

All names of one request carry the hash tag `{<request_id>}`, so they share a Redis Cluster
slot. Request ids may not contain `{` or `}` (they would break the hash tag).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_STREAM = "pravaha:requests"
DEFAULT_GROUP = "pravaha-workers"
DEFAULT_PREFIX = "pravaha"


@dataclass(frozen=True)
class Names:
    """Names for one deployment: the request stream, its group, and per-request keys."""

    stream: str = DEFAULT_STREAM
    group: str = DEFAULT_GROUP
    prefix: str = DEFAULT_PREFIX

    @property
    def dead_letter(self) -> str:
        """Entries that failed their maximum deliveries or could not be decoded, with the reason."""
        return f"{self.stream}:dead"

    @property
    def cancel_channel(self) -> str:
        """Workers subscribe here; a message is a request id to stop."""
        return f"{self.prefix}:cancel"

    @property
    def models(self) -> str:
        """Sorted set: model name -> UNIX time its announcement expires (workers refresh it)."""
        return f"{self.prefix}:models"

    @property
    def batches(self) -> str:
        """Sorted set of every batch id by creation time (GET /v1/batches)."""
        return f"{self.prefix}:batches"

    @property
    def active_batches(self) -> str:
        """Set of batch ids not yet in a final state; gateways adopt those whose lease is free."""
        return f"{self.prefix}:batches:active"

    def batch(self, batch_id: str) -> str:
        """Hash: the state of one batch (its OpenAI object's fields, JSON-encoded)."""
        return f"{self.prefix}:batch:{{{batch_id}}}"

    def batch_lease(self, batch_id: str) -> str:
        """The gateway running the batch now (with a TTL it refreshes)."""
        return f"{self.prefix}:batch:{{{batch_id}}}:lease"

    def file(self, file_id: str) -> str:
        """Hash: one uploaded or produced file's metadata (the bytes live on the filesystem)."""
        return f"{self.prefix}:file:{{{file_id}}}"

    def channel(self, request_id: str) -> str:
        """Pub/sub channel carrying the request's token events, live."""
        return f"{self.prefix}:{{{request_id}}}:tokens"

    def events(self, request_id: str) -> str:
        """Stream replaying every token event of the request from the first."""
        return f"{self.prefix}:{{{request_id}}}:events"

    def result(self, request_id: str) -> str:
        """The final result (msgpack), kept for a TTL."""
        return f"{self.prefix}:{{{request_id}}}:result"

    def lease(self, request_id: str) -> str:
        """The consumer running the request now (with a TTL); a duplicate entry for a request
        that another live worker runs is dropped instead of run twice."""
        return f"{self.prefix}:{{{request_id}}}:lease"

    def cancelled(self, request_id: str) -> str:
        """Set by Client.cancel; a worker that picks the job up later aborts it at once."""
        return f"{self.prefix}:{{{request_id}}}:cancel"


def check_request_id(request_id: object) -> str:
    if not isinstance(request_id, str) or not request_id or len(request_id) > 256:
        raise ValueError("request_id: must be a non-empty string of at most 256 characters")
    if "{" in request_id or "}" in request_id:
        raise ValueError("request_id: may not contain '{' or '}' (they delimit the cluster hash tag)")
    return request_id
