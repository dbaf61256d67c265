"""The single background job runner: one job at a time, in submission order, with progress and interrupt.

Generation and training both run here, so they never use the model at once: a generation submitted during
training waits in the queue behind it (and the UI/API say so through `queue_position`).
"""

from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.errors import QueueFullError

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Raised inside a job when the user asked it to stop; the job decides what to keep."""


@dataclass
class Progress:
    """What a job reports while it runs; read by the UI and `/sdapi/v1/progress`."""

    job_no: int = 0  # which of `job_count` parts (e.g. batch count) is running
    job_count: int = 1
    sampling_step: int = 0
    sampling_steps: int = 0
    text: str = ""
    preview: Callable[[], Any] | None = None  # builds a PIL preview on demand, so nobody pays unless polled
    preview_id: int = 0
    # every image of the latest preview with its caption (a training run's sample prompts: several), on demand too
    previews: Callable[[], list[tuple[Any, str]]] | None = None
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) for live plots
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        if self.job_count <= 0:
            return 0.0
        step = self.sampling_step / self.sampling_steps if self.sampling_steps else 0.0
        return min(1.0, (self.job_no + step) / self.job_count)


_ids = itertools.count(1)


@dataclass
class Job:
    kind: str
    fn: Callable[[Job], Any]
    description: str = ""
    id: str = field(default_factory=lambda: f"job-{next(_ids)}")
    status: str = "queued"  # queued | running | done | failed | interrupted
    progress: Progress = field(default_factory=Progress)
    result: Any = None
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    _interrupt: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def interrupt(self) -> None:
        self._interrupt.set()

    def check_interrupt(self) -> None:
        if self._interrupt.is_set():
            raise Interrupted()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until the job ends; return its result or raise its error."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.kind} job {self.id} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def eta_seconds(self) -> float | None:
        if not self.started_at:
            return None
        fraction = self.progress.fraction
        elapsed = time.time() - self.started_at
        return elapsed / fraction - elapsed if fraction > 0 else None


class JobRunner:
    """Runs submitted jobs one by one on a daemon thread. At most `max_waiting` jobs wait behind the running one;
    one more is refused (QueueFullError) instead of growing a backlog nobody may still be waiting for."""

    def __init__(self, name: str = "jobs", max_waiting: int = 64):
        self.max_waiting = max_waiting
        self._closed = False
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending: list[Job] = []
        self._lock = threading.Lock()
        self._current: Job | None = None
        self._last: Job | None = None
        self._by_id: weakref.WeakValueDictionary[str, Job] = weakref.WeakValueDictionary()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, kind: str, fn: Callable[[Job], Any], description: str = "") -> Job:
        job = Job(kind=kind, fn=fn, description=description)
        with self._lock:
            if self._closed:
                raise QueueFullError("The server is shutting down; no new jobs are taken.", retry_after=30)
            if len(self._pending) >= self.max_waiting:
                eta = self._current.eta_seconds() if self._current is not None else None
                raise QueueFullError(
                    f"{len(self._pending)} jobs are already waiting (the limit is {self.max_waiting}, "
                    "--queue-limit); try again later.",
                    retry_after=max(1, min(600, math.ceil(eta))) if eta else 10,
                )
            self._pending.append(job)
            self._by_id[job.id] = job
        self._queue.put(job)
        return job

    @property
    def closed(self) -> bool:
        """True once `shutdown` began: no new jobs are taken."""
        return self._closed

    @property
    def current(self) -> Job | None:
        return self._current

    @property
    def last(self) -> Job | None:
        """The running job, else the one that finished last."""
        return self._current or self._last

    def pending(self) -> list[Job]:
        with self._lock:
            return list(self._pending)

    def queue_position(self, job: Job) -> int:
        """0 when running, n when n jobs run or wait before it, -1 when finished."""
        if job.finished:
            return -1
        if job is self._current:
            return 0
        with self._lock:
            waiting = self._pending.index(job) if job in self._pending else 0
        return waiting + (1 if self._current else 0)

    def find(self, job_id: str | None) -> Job | None:
        """A job submitted here that is still referenced somewhere (running, queued, or held by a caller)."""
        with self._lock:
            return self._by_id.get(job_id) if job_id else None

    def interrupt(self, job: Job | None = None) -> bool:
        """Interrupt `job` (default: the running one). A queued job is dropped before it starts."""
        target = job or self._current
        if target is None:
            return False
        target.interrupt()
        return True

    def wait_for(self, job: Job, abandoned: Callable[[], bool], poll: float = 0.25) -> Any:
        """`job.wait()`, but if `abandoned()` turns true (the HTTP client went away) the job is interrupted: dropped
        before it starts, stopped after its current step if running. Returns/raises as `job.wait()`."""
        while not job._done.wait(poll):
            if not job.interrupted and abandoned():
                log.info("Client gone: interrupting %s job %s", job.kind, job.id)
                job.interrupt()
        return job.wait()

    def shutdown(self, timeout: float = 8.0) -> bool:
        """Stop taking jobs, drop the queued ones, interrupt the running one (a training run then saves its
        checkpoint), and wait up to `timeout` s for it to end. True when the runner is idle."""
        with self._lock:
            self._closed = True
            waiting = list(self._pending)
        for job in waiting:
            job.interrupt()
        current = self._current
        if current is not None:
            current.interrupt()
        self._queue.put(None)  # after the dropped jobs: the worker exits once it has passed them
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job in self._pending:
                    self._pending.remove(job)
            self._current = job
            job.started_at = time.time()
            try:
                if job.interrupted:
                    raise Interrupted()
                job.status = "running"
                job.result = job.fn(job)
                job.status = "interrupted" if job.interrupted else "done"
            except Interrupted:
                job.status = "interrupted"
            except BaseException as e:  # the runner must survive any job failure
                if not isinstance(e, Exception):
                    log.error("Job %s ended by %r", job.id, e)
                elif not getattr(e, "status_code", None):
                    log.exception("Job %s (%s) failed", job.id, job.kind)
                job.error = e
                job.status = "failed"
            finally:
                job.finished_at = time.time()
                self._last = job
                self._current = None
                job._done.set()
