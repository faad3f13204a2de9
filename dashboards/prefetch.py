"""Warm a run's caches in the background while its Run page is read.

When the Run page of a complete run is shown, one daemon thread computes the layer summaries and
PCA previews of its first `MAX_LAYERS` hidden layers and its CKA matrix, through the same cached
functions the pages call, so the Layer explorer and Compare usually open warm. A page that asks for a
layer being prefetched waits for that computation instead of repeating it (`data.LRU` computes each
key once); the thread therefore runs at normal priority (a niced one, starved on a busy machine,
would hold such a page up). It is one thread with one BLAS thread, so it takes at most one core.
Results also land in the run's disk cache.
"""

from __future__ import annotations

import logging
import queue
import threading

log = logging.getLogger(__name__)
MAX_LAYERS = 12


class Prefetcher:
    """`schedule(run_id)` queues a run once per manifest version; `wait()` blocks until the queue is done."""

    def __init__(self, repository, max_layers: int = MAX_LAYERS):
        self.repository = repository
        self.max_layers = max_layers
        self._queue: queue.Queue = queue.Queue()
        self._seen: set = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def schedule(self, run_id: str) -> bool:
        """Queue `run_id` (complete runs only; each manifest version once). True when queued."""
        try:
            run = self.repository.run(run_id)
        except Exception:  # an unreadable run has nothing to warm
            return False
        key = (run_id, run.manifest.updated)
        with self._lock:
            if run.manifest.status != "complete" or key in self._seen:
                return False
            self._seen.add(key)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="dashboard-prefetch", daemon=True)
                self._thread.start()
        self._queue.put(run_id)
        return True

    def wait(self) -> None:
        self._queue.join()

    def _work(self) -> None:
        while True:
            run_id = self._queue.get()
            try:
                self.warm(run_id)
            except Exception as error:  # a background helper never takes the app down
                log.info("prefetch of %s stopped: %s", run_id, error)
            finally:
                self._queue.task_done()

    def warm(self, run_id: str) -> None:
        from . import layerview
        from .pages import compare

        repo = self.repository
        run = repo.run(run_id)
        hidden = [name for name in run.layers if run.layer_info(name).kind == "hidden"]
        for layer in hidden[: self.max_layers]:
            layerview.summary(repo, run_id, layer)
            layerview.projection(repo, run_id, layer)  # the artifact's, or the sample's PCA
        if len(hidden) >= 2:
            compare.cka_matrix(repo, run_id, None)
