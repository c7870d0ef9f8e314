"""HostTable: the KV store's record of its host pool (pure, no I/O): which
host blocks each job's KV occupies, and the moves waiting for or using the
link. The scheduler decides which jobs move (it owns the GPU blocks); this
table owns the host block ids and the copy schedule:

- offloads are started first-come, uploads in the order the scheduler wants
  them (most urgent first), at most `max_in_flight` per direction (the link);
- a job's host blocks are taken when its offload starts and given back when
  its upload finishes, when a move fails, or when the scheduler frees it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Move:
    move_id: int
    job_id: str
    direction: str  # "offload" | "upload"
    gpu_blocks: list[int]
    host_blocks: list[int] = field(default_factory=list)
    started_at: float | None = None


class HostTable:
    def __init__(self, num_blocks: int, max_in_flight: int) -> None:
        self.num_blocks = num_blocks
        self.max_in_flight = max_in_flight
        self._free = list(range(num_blocks - 1, -1, -1))
        self.holding: dict[str, list[int]] = {}  # job -> its host blocks (copy complete or in flight)
        self.queued: dict[str, deque[Move]] = {"offload": deque(), "upload": deque()}
        self.in_flight: dict[int, Move] = {}  # move_id -> move
        self.freed_while_moving: set[str] = set()
        self.last_move_id = -1  # the highest move id planned so far (ids count per scheduler)
        self.duplicates = 0

    @property
    def blocks_used(self) -> int:
        return self.num_blocks - len(self._free)

    def jobs_on_host(self) -> int:
        return len(self.holding)

    def add_plan(self, moves: list[Move]) -> list[tuple[Move, str]]:
        """Queue one plan's moves; those refused, with the reason. Move ids
        grow from plan to plan, so a move whose id is not above every earlier
        plan's is a plan published twice (its confirm was lost in a broker
        restart): it is already queued, running or done, and is skipped."""
        seen, refused = self.last_move_id, []
        for move in moves:
            self.last_move_id = max(self.last_move_id, move.move_id)
            if move.move_id <= seen:
                self.duplicates += 1
                continue
            problem = self.add(move)
            if problem is not None:
                refused.append((move, problem))
        return refused

    def add(self, move: Move) -> str | None:
        """Queue a move; an error (for a report back) if it can never run."""
        if move.direction == "offload":
            if move.job_id in self.holding or self._moving(move.job_id):
                return f"job {move.job_id} already has a host copy or a move in flight"
            if len(move.gpu_blocks) > self.num_blocks:
                return f"{len(move.gpu_blocks)} blocks exceed the host pool of {self.num_blocks}"
        elif move.job_id not in self.holding:
            return f"no host copy of job {move.job_id} (lost with an earlier KV store?)"
        elif len(self.holding[move.job_id]) != len(move.gpu_blocks):
            return f"host copy of job {move.job_id} has {len(self.holding[move.job_id])} blocks, " \
                   f"the upload {len(move.gpu_blocks)}"
        self.queued[move.direction].append(move)
        return None

    def start(self, now: float) -> tuple[list[Move], list[tuple[Move, str]]]:
        """Moves to start now (host blocks assigned), and moves refused now
        (host full) with the reason."""
        started, refused = [], []
        for direction in ("offload", "upload"):
            q = self.queued[direction]
            while q and self._count(direction) < self.max_in_flight:
                m = q[0]
                if direction == "offload":
                    if len(m.gpu_blocks) > len(self._free):
                        q.popleft()
                        refused.append((m, f"host pool full ({len(self._free)} of {self.num_blocks} blocks free)"))
                        continue
                    m.host_blocks = [self._free.pop() for _ in m.gpu_blocks]
                    self.holding[m.job_id] = m.host_blocks
                else:
                    m.host_blocks = list(self.holding[m.job_id])
                q.popleft()
                m.started_at = now
                self.in_flight[m.move_id] = m
                started.append(m)
        return started, refused

    def finish(self, move_id: int, ok: bool) -> Move | None:
        """A move ended. Host blocks are given back after an upload (the KV
        is on the GPU again) and after a failed offload."""
        m = self.in_flight.pop(move_id, None)
        if m is None:
            return None
        if m.job_id in self.freed_while_moving and not self._moving(m.job_id):
            self.freed_while_moving.discard(m.job_id)
            self._release(m.job_id)
        elif m.direction == "upload" or not ok:
            self._release(m.job_id)
        return m

    def free(self, job_id: str) -> None:
        """The scheduler no longer needs the job's host copy."""
        for q in self.queued.values():
            for m in [m for m in q if m.job_id == job_id]:
                q.remove(m)
        if self._moving(job_id):
            self.freed_while_moving.add(job_id)  # a copy still writes or reads those blocks
        else:
            self._release(job_id)

    def overdue(self, now: float, timeout: float) -> list[Move]:
        return [m for m in self.in_flight.values() if now - m.started_at > timeout]

    def _moving(self, job_id: str) -> bool:
        return any(m.job_id == job_id for m in self.in_flight.values())

    def _count(self, direction: str) -> int:
        return sum(1 for m in self.in_flight.values() if m.direction == direction)

    def _release(self, job_id: str) -> None:
        blocks = self.holding.pop(job_id, None)
        if blocks:
            self._free.extend(reversed(blocks))
            assert len(self._free) <= self.num_blocks, "host block freed twice"
