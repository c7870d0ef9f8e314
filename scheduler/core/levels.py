"""The priority structure: levels (MLFQ queues), each with jobs kept in key
order (FCFS = entry sequence; srpt = remaining tokens). Never-run jobs sit in a
heap (O(log n) per arrival, popped in order as they are admitted, lazily
deleted); jobs that hold or held KV sit in a sorted list, whose size memory
bounds. Batch formation reads both in merged key order and stops as soon as
the batch is full, so its cost does not grow with the number of waiting jobs."""
from __future__ import annotations

import bisect
import heapq

from fastserve.scheduler.core.job import Job, Loc


class Level:
    __slots__ = ("fresh", "num_fresh", "keys", "jobs", "charge_sum")

    def __init__(self) -> None:
        self.fresh: list[tuple[tuple[int, ...], str, Job]] = []  # heap, lazily deleted
        self.num_fresh = 0
        self.keys: list[tuple[int, ...]] = []  # sorted keys of started jobs
        self.jobs: list[Job] = []  # started jobs, parallel to keys
        self.charge_sum = 0.0

    def __len__(self) -> int:
        return self.num_fresh + len(self.jobs)

    def add(self, job: Job) -> None:
        if job.started:
            i = bisect.bisect_left(self.keys, job.key)
            self.keys.insert(i, job.key)
            self.jobs.insert(i, job)
        else:
            heapq.heappush(self.fresh, (job.key, job.id, job))
            self.num_fresh += 1
        self.charge_sum += job.charge

    def remove(self, job: Job) -> None:
        if job.started:
            i = bisect.bisect_left(self.keys, job.key)
            assert self.jobs[i] is job, (job, self.jobs[i])
            del self.keys[i]
            del self.jobs[i]
        else:
            self.num_fresh -= 1  # its heap entry goes stale; see valid_fresh
        self.charge_sum -= job.charge

    def valid_fresh(self, entry: tuple[tuple[int, ...], str, Job], level: int) -> bool:
        key, _, job = entry
        # Stale entries: the job started, was cancelled or promoted (level or key changed).
        return not job.started and not job.cancelled and job.level == level and job.key == key \
            and job.loc is Loc.NONE

    def peek_fresh(self, level: int) -> Job | None:
        """The first never-run job, dropping stale heap entries on the way."""
        heap = self.fresh
        while heap:
            if self.valid_fresh(heap[0], level):
                return heap[0][2]
            heapq.heappop(heap)
        return None

    def pop_fresh(self) -> Job:
        return heapq.heappop(self.fresh)[2]

    def start(self, job: Job) -> None:
        """A never-run job popped by pop_fresh got its first blocks."""
        assert not job.started
        self.num_fresh -= 1
        job.started = True
        i = bisect.bisect_left(self.keys, job.key)
        self.keys.insert(i, job.key)
        self.jobs.insert(i, job)

    def position(self, job: Job) -> int:
        """Started jobs of this level ahead of `job`."""
        return bisect.bisect_left(self.keys, job.key)

    def push_back(self, job: Job) -> None:
        heapq.heappush(self.fresh, (job.key, job.id, job))



class PrioritySet:
    """Jobs sorted by priority (level, key): lets the KV placement find the
    lowest-priority resident jobs and the highest-priority swapped ones in
    O(answer) instead of scanning. Memory bounds its size."""

    def __init__(self) -> None:
        self._keys: list[tuple] = []
        self._jobs: list[Job] = []
        self._key_of: dict[str, tuple] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def add(self, job: Job) -> None:
        k = (job.level, job.key)
        i = bisect.bisect_left(self._keys, k)
        self._keys.insert(i, k)
        self._jobs.insert(i, job)
        self._key_of[job.id] = k

    def discard(self, job: Job) -> None:
        k = self._key_of.pop(job.id, None)
        if k is None:
            return
        i = bisect.bisect_left(self._keys, k)
        assert self._jobs[i] is job, (job, self._jobs[i])
        del self._keys[i]
        del self._jobs[i]

    def lowest_first(self):
        return reversed(self._jobs)

    def highest_first(self):
        return iter(self._jobs)
