"""The stages of a run: their names and what a user is shown for each (:data:`STAGES`), and
:class:`Stages`, which times, logs, reports and lets a user cancel each of them."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

from ..core.errors import CancelledError
from ..core.limits import is_out_of_memory, out_of_memory

log = logging.getLogger(__name__)

#: ``progress(stage, done, total)``: a stage of :data:`STAGES`, and how far it is.
Progress = Callable[[str, int, int], None]
#: Stages of a run in order (the keys of ``Explanation.timings`` and of progress reports) and
#: what a user is shown for each.
STAGES = {
    "load": "loading the CT",
    "load_model": "loading the model",
    "lung_mask": "finding the lungs",
    "resample": "resampling to the model's grid",
    "cam": "computing the heat map",
    "resample_back": "resampling the heat map to the CT",
    "segment": "finding hot regions",
    "second_opinion": "asking the region model about each hot region",
    "outline": "outlining the nodule at each explained region",
    "write": "writing the outputs",
}


class Stages:
    """Times each stage of a run into ``timings`` (seconds), logs its time, checks ``cancel()``
    before it starts (raising :class:`CancelledError`) and reports it to ``progress(stage, done,
    total)``: 0 of 1 as it starts, the counts the stage itself reports (:meth:`report`: files
    read, patches explained) meanwhile, and all done as it ends. An allocator's failure in a
    stage (``ulimit -v``, a full GPU) raises :class:`ResourceError` naming the stage."""

    def __init__(
        self,
        timings: Dict[str, float],
        progress: Optional[Progress] = None,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> None:
        self.timings, self.progress, self.cancel = timings, progress, cancel
        self.total = 1

    def report(self, name: str, done: int, total: int) -> None:
        self.total = total
        if self.progress is not None:
            self.progress(name, done, total)

    def counter(self, name: str) -> Optional[Callable[[int, int], None]]:
        """A ``progress(done, total)`` for the engine's functions, reporting as stage ``name``."""
        return None if self.progress is None else (lambda done, total: self.report(name, done, total))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.cancel is not None and self.cancel():
            raise CancelledError(f"cancelled before {STAGES[name]}")
        self.report(name, 0, 1)
        t0 = time.perf_counter()
        try:
            yield
        except (RuntimeError, MemoryError) as exc:  # an allocator's failure: say so, as one message
            if not is_out_of_memory(exc):
                raise
            raise out_of_memory(STAGES[name], exc) from None
        seconds = time.perf_counter() - t0
        self.timings[name] = self.timings.get(name, 0.0) + seconds
        log.info("%s: %.2f s", STAGES[name], seconds)
        self.report(name, self.total, self.total)
