"""The one thread that owns the model: it admits queued jobs into the inference engine, runs engine steps while
anything is unfinished, runs scoring calls (prompt log-probabilities for `echo`) between steps, and hands each
step's events to the asyncio side without ever blocking on it (one `call_soon_threadsafe` per step).

Admission: a job enters the engine when the engine has no prompt left to prefill and has rows for all its n
samples, so a job waits here, where its queue time is visible: past `max_queue_time` seconds it is answered 503;
past `max_queue` waiting jobs a new one is refused (429) at submit. A job whose client went away is aborted at the
next step (its rows freed). Leaves out: priorities and preemption (a running request is never paused).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque

from ..infer import Engine


class Job:
    """One engine Request of an HTTP request; its events go to the HTTP request's asyncio queue as
    (tag, kind, value) with kind "token" (an Event), "done" (a Result), "error" ((status, message))."""

    def __init__(self, request, events: asyncio.Queue, tag: int = 0):
        self.request, self.events, self.tag = request, events, tag
        self.rid, self.remaining = None, request.n
        self.cancelled, self.t_submit, self.t_first = False, time.monotonic(), None


class Scheduler(threading.Thread):
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, max_queue: int, max_queue_time: float,
                 metrics: dict, continuous: bool = True):
        super().__init__(daemon=True, name="scheduler")
        self.engine, self.loop, self.max_queue, self.max_queue_time = engine, loop, max_queue, max_queue_time
        self.metrics, self.continuous = metrics, continuous
        self.waiting: deque[Job] = deque()
        self.jobs: dict[int, Job] = {}
        self.calls: deque[tuple] = deque()
        self.cond = threading.Condition()
        self.stopping = False

    # ---- called from the asyncio side (never blocks on the engine) ------------------------------------------------
    def submit(self, jobs: list[Job]) -> bool:
        """Queue all of an HTTP request's jobs, or none (False: the queue is full)."""
        with self.cond:
            if self.stopping or len(self.waiting) + len(jobs) > self.max_queue:
                return False
            self.waiting.extend(jobs)
            self.cond.notify()
        return True

    def cancel(self, jobs: list[Job]) -> None:
        with self.cond:
            for j in jobs:
                j.cancelled = True
            self.cond.notify()

    def call(self, fn) -> asyncio.Future:
        """Run fn() on the scheduler thread between two engine steps; await the returned future for its value."""
        fut = concurrent.futures.Future()
        with self.cond:
            self.calls.append((fn, fut))
            self.cond.notify()
        return asyncio.wrap_future(fut)

    def stop(self) -> None:
        """Abort everything (graceful shutdown ran out of time, or the server is closing) and end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def queue_depth(self) -> int:
        return len(self.waiting)

    # ---- the scheduler thread -----------------------------------------------------------------------------------
    def run(self):
        e = self.engine
        while True:
            out: list = []
            with self.cond:
                while not (self.waiting or self.calls or self.jobs or self.stopping or e.has_unfinished()):
                    self.cond.wait()
                if self.stopping:
                    self._abort_all(out, (503, "the server is shutting down; retry on another replica or later."))
                    self._deliver(out)
                    for _, fut in self.calls:
                        fut.cancel()
                    return
                calls, self.calls = list(self.calls), deque()
                admit = self._admit(out)
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except Exception as exc:             # noqa: BLE001  returned to the caller, not raised here
                        fut.set_exception(exc)
            for job in admit:
                job.rid = e.add_request(job.request)
                self.jobs[job.rid] = job
            for rid, job in list(self.jobs.items()):
                if job.cancelled:
                    e.abort(rid)
                    del self.jobs[rid]
                    self.metrics["cancelled"] += 1
            if e.has_unfinished():
                try:
                    self._dispatch(e.step(), out)
                except Exception as exc:                  # noqa: BLE001  a bug must not kill the server
                    for rid in list(self.jobs):
                        e.abort(rid)
                    self._abort_all(out, (500, f"generation failed: {type(exc).__name__}: {exc}"))
            self._deliver(out)

    def _admit(self, out) -> list[Job]:
        """Jobs that enter the engine now; expired and cancelled ones leave the queue (caller holds cond)."""
        e, now, admit, keep = self.engine, time.monotonic(), [], deque()
        rows = e.num_running()
        busy = e.num_waiting() > 0 or (not self.continuous and rows > 0)
        limit = e.max_batch
        for job in self.waiting:
            if job.cancelled:
                self.metrics["cancelled"] += 1
            elif now - job.t_submit > self.max_queue_time:
                self.metrics["expired"] += 1
                out.append((job, "error", (503, f"the request waited {now - job.t_submit:.1f} s for a free slot, "
                                                f"longer than the server's --max-queue-time; retry later.")))
            elif not busy and rows + job.request.n <= limit:
                admit.append(job)
                rows += job.request.n
                busy = self.continuous            # continuous: one prompt at a time enters the engine's prefill
            else:
                keep.append(job)
        self.waiting = keep
        return admit

    def _abort_all(self, out, error) -> None:
        for job in list(self.jobs.values()) + list(self.waiting):
            out.append((job, "error", error))
        self.jobs.clear()
        self.waiting.clear()

    def _dispatch(self, events, out) -> None:
        for ev in events:
            job = self.jobs.get(ev.request_id)
            if job is None:
                continue
            if ev.token_id is not None:
                if job.t_first is None:
                    job.t_first = time.monotonic()
                    self.metrics["ttft_sum"] += job.t_first - job.t_submit
                    self.metrics["ttft_count"] += 1
                self.metrics["completion_tokens"] += 1
                out.append((job, "token", ev))
            if ev.result is not None:
                out.append((job, "done", ev.result))
                job.remaining -= 1
                if job.remaining == 0:
                    del self.jobs[ev.request_id]

    def _deliver(self, out) -> None:
        if out:
            self.loop.call_soon_threadsafe(_put_all, out)


def _put_all(out):
    for job, kind, val in out:
        job.events.put_nowait((job.tag, kind, val))
