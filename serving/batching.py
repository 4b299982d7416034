"""Dynamic batching: coalesce concurrent requests into one runtime call. No gRPC here.

One worker thread per model version owns the runtime, so inference never runs on the event
loop. Requests queue with their deadline; the worker takes what is queued (up to
`max_batch_size` images, waiting at most `max_delay_s` for more), drops expired and
cancelled requests before computing, runs one batch and hands each request its rows.
The queue is bounded in images: a full queue refuses at once (Overloaded).

Background work (shadow copies of other versions' traffic) waits in a lane of its own: it runs
only when no request is queued, never shares a batch with one, counts against no queue bound
(its sender bounds it) and, when the batcher closes, is refused rather than drained. It runs on
a thread of its own, started at the first background work, at the lowest CPU priority (nice 19),
through `background_run` where one is given (serving.repository gives a single-threaded session
that does not spin-wait), so that the kernel gives it what the answering versions leave idle
rather than a share of their cores: on 2 cores, shadow copies run at normal priority beside a
saturated primary cost its callers 1.3-1.5x their p50 (bench/NOTES.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from serving.errors import DeadlineExpired, InferenceFailed, Overloaded, ShuttingDown

log = logging.getLogger(__name__)


# What a run gives for a batch: arrays of one row per image (e.g. probabilities, unsure scores).
Rows = tuple[np.ndarray, ...]


@dataclass(frozen=True)
class BatchResult:
    rows: Rows  # this request's rows of each array the run gave
    queue_wait_s: float
    inference_s: float
    batch_size: int  # images in the runtime call that served it

    @property
    def probabilities(self) -> np.ndarray:
        return self.rows[0]


class BatchObserver(Protocol):
    def batch_ran(self, size: int, inference_s: float) -> None: ...
    def queue_depth(self, images: int) -> None: ...
    def dropped(self, reason: str, requests: int) -> None: ...


class _NullObserver:
    def batch_ran(self, size: int, inference_s: float) -> None:
        pass

    def queue_depth(self, images: int) -> None:
        pass

    def dropped(self, reason: str, requests: int) -> None:
        pass


@dataclass(eq=False)
class _Pending:
    images: np.ndarray
    future: Future
    deadline: float | None  # time.monotonic() seconds
    enqueued: float
    background: bool = False


def lower_priority_of_this_thread() -> None:
    """nice 19 for the calling thread only (on Linux a thread is a task with a nice value of its
    own); where that is refused or unknown, the thread keeps the process's priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError) as exc:
        log.info("background work runs at normal priority: %s", exc)


class DynamicBatcher:
    def __init__(
        self,
        run: Callable[[np.ndarray], Rows],
        max_batch_size: int,
        max_delay_s: float,
        max_queue_images: int,
        observer: BatchObserver | None = None,
        name: str = "model",
        background_run: Callable[[np.ndarray], Rows] | None = None,
    ):
        self._run = run
        self._background_run = background_run or run
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_images = max_queue_images
        self._observer = observer or _NullObserver()
        self._queue: deque[_Pending] = deque()
        self._queued_images = 0
        self._background: deque[_Pending] = deque()
        self._running = False  # a batch is in onnxruntime now
        self._cond = threading.Condition()
        self._closing = False
        self._name = name
        self._workers = [threading.Thread(target=self._loop, args=(self._take_batch, run), name=f"batcher-{name}",
                                          daemon=True)]
        self._workers[0].start()

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def busy(self) -> bool:
        """Running a batch, or requests waiting: the version is working for its callers."""
        return self._running or self._queued_images > 0

    def submit(self, images: np.ndarray, deadline: float | None = None, background: bool = False) -> Future:
        """Queue uint8 [k, 32, 32, 3]; the future gives a BatchResult or a ServingError.
        `background`: run only when no request waits (see the module docstring)."""
        count = len(images)
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise ShuttingDown("the model version is being unloaded or the server is shutting down; retry")
            if background:
                if len(self._workers) == 1:
                    self._start_background_thread()
                self._background.append(_Pending(images, future, deadline, time.monotonic(), background=True))
                self._cond.notify_all()  # the background thread may be the one waiting
                return future
            if self._queued_images + count > self.max_queue_images:
                raise Overloaded(
                    f"the queue of this model is full ({self._queued_images} of {self.max_queue_images} images "
                    "waiting, --max-queue-size); retry after a short back-off"
                )
            item = _Pending(images, future, deadline, time.monotonic())
            self._queue.append(item)
            self._queued_images += count
            depth = self._queued_images
            self._cond.notify_all()  # not only the background thread
        self._observer.queue_depth(depth)
        future.add_done_callback(lambda f, item=item: self._forget_if_cancelled(f, item))
        return future

    def _forget_if_cancelled(self, future: Future, item: _Pending) -> None:
        """A client that gives up frees its queue slot at once, not when the worker reaches it."""
        if not future.cancelled():
            return
        with self._cond:
            try:
                self._queue.remove(item)
            except ValueError:
                return  # already taken by the worker
            self._queued_images -= len(item.images)
            depth = self._queued_images
            if not self._queue and self._background:
                self._cond.notify_all()  # the background thread waits for an empty queue
        self._observer.queue_depth(depth)
        self._observer.dropped("cancelled", 1)

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work and queued background work, finish the queued requests, stop the worker."""
        with self._cond:
            self._closing = True
            refused, self._background = self._background, deque()
            self._cond.notify_all()
        for item in refused:
            item.future.set_exception(ShuttingDown("the model version is being unloaded"))
        with self._cond:
            workers = list(self._workers)
        for worker in workers:
            worker.join(timeout)

    def _take_batch(self) -> list[_Pending] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            if self.max_delay_s > 0 and self._queued_images < self.max_batch_size and not self._closing:
                flush_at = self._queue[0].enqueued + self.max_delay_s
                while self._queued_images < self.max_batch_size and not self._closing:
                    remaining = flush_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                if not self._queue:  # all cancelled while we waited
                    return []
            batch, size = self._pop_batch(self._queue)
            self._queued_images -= size
            depth = self._queued_images
            if not self._queue and self._background:
                self._cond.notify_all()  # the background thread waits for an empty queue
        self._observer.queue_depth(depth)
        return batch

    def _pop_batch(self, queue: deque[_Pending]) -> tuple[list[_Pending], int]:
        """The oldest items of `queue` that fit in one batch (at least one), and their images
        (the caller holds the lock)."""
        batch = [queue.popleft()]
        size = len(batch[0].images)
        while queue and size + len(queue[0].images) <= self.max_batch_size:
            item = queue.popleft()
            batch.append(item)
            size += len(item.images)
        return batch, size

    def _start_background_thread(self) -> None:
        """At the first background work (the caller holds the lock): most versions are never a shadow."""
        worker = threading.Thread(target=self._background_loop, args=(self._background_run,),
                                  name=f"batcher-{self._name}-background", daemon=True)
        self._workers.append(worker)
        worker.start()

    def _take_background(self) -> list[_Pending] | None:
        """For the background thread: up to a batch of background work, once no request waits."""
        with self._cond:
            while not self._background or self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            return self._pop_batch(self._background)[0]

    def _background_loop(self, run: Callable[[np.ndarray], Rows]) -> None:
        lower_priority_of_this_thread()
        self._loop(self._take_background, run)

    def _loop(self, take: Callable[[], list[_Pending] | None], run: Callable[[np.ndarray], Rows]) -> None:
        while True:
            batch = take()
            if batch is None:
                return
            now = time.monotonic()
            live = []
            for item in batch:
                if not item.future.set_running_or_notify_cancel():
                    self._observer.dropped("cancelled", 1)
                elif item.deadline is not None and item.deadline <= now:
                    item.future.set_exception(
                        DeadlineExpired("the request's deadline passed while it waited in the queue; it was not computed")
                    )
                    if not item.background:  # its sender counts its own drops
                        self._observer.dropped("deadline_exceeded", 1)
                else:
                    live.append(item)
            if live:
                self._execute(live, now, run)

    def _compute(self, images: np.ndarray, run: Callable[[np.ndarray], Rows], foreground: bool) -> Rows:
        """The runtime call(s); `busy` meanwhile (for the callers' work: the background thread's
        runs leave it alone), and no longer by the time the callers get answers."""
        if foreground:
            self._running = True
        try:
            if len(images) <= self.max_batch_size:
                return run(images)
            # one oversized request: run it in max-size chunks
            chunks = [run(images[i:i + self.max_batch_size]) for i in range(0, len(images), self.max_batch_size)]
            return tuple(np.concatenate(parts) for parts in zip(*chunks))
        finally:
            if foreground:
                self._running = False

    def _execute(self, batch: list[_Pending], started: float, run: Callable[[np.ndarray], Rows]) -> None:
        images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
        try:
            t0 = time.perf_counter()
            rows = self._compute(images, run, foreground=not batch[0].background)
            inference_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - every waiting client must get an answer
            error = exc if isinstance(exc, InferenceFailed) else InferenceFailed("inference failed; see the server log")
            if not isinstance(exc, InferenceFailed):
                log.exception("batch of %d images failed", len(images))
            for item in batch:
                item.future.set_exception(error)
            return
        self._observer.batch_ran(len(images), inference_s)
        offset = 0
        for item in batch:
            count = len(item.images)
            item.future.set_result(BatchResult(
                tuple(r[offset:offset + count] for r in rows), started - item.enqueued, inference_s, len(images)))
            offset += count
