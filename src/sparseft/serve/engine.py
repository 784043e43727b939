"""The switching strategy: one base model in memory, one worker, diffs merged on switch and restored exactly.

Why this strategy (see docs/serving.md for the measurements):

- A single worker thread owns the weights. Only it merges, restores or runs the model, and it does
  each of those under ``weights_lock``, so no request can observe another diff's entries or a
  half-merged diff: a request starts only after its diff is fully merged.
- Merging writes W + S into the targeted entries and keeps the overwritten originals; switching
  restores them before merging the next diff. Both are ``delta.MergedEntries``, the primitive
  ``SparseModel.merge`` uses too (same rounding, rollback if a merge fails part-way), so a served
  diff's weights are bitwise those of the model path. Restoring saved entries is exact in every
  dtype; subtracting would not be.
- The worker takes everything queued as one round and runs it grouped by diff, the diff already
  merged first, so a burst of mixed requests costs at most one swap per distinct diff in it.
  Requests that arrive meanwhile wait for the next round, which keeps the order fair.
- After a successful request the diff stays merged (the next request for it needs no swap). If a
  request fails for any reason the base is restored before the error is reported, so a crash never
  leaves modified weights behind.
- Over a quantized base (``sparseft.quantize``) nothing can be merged into the codes: this engine is
  refused there, and the batching engines (``batching.py``) run every diff unmerged.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..delta import MergedEntries, compact_indices, delta_values
from ..base_match import fingerprint
from ..diffio import SparseDiff, check_against_model, target_weights
from ..errors import ConfigError, ServerBusyError
from ..quantize import is_quantized
from .decoding import Completion, SamplingParams, generate
from .metrics import ServeMetrics
from .registry import DiffVersion, Entries

log = logging.getLogger(__name__)

MERGED_OVER_QUANTIZED = (
    "strategy 'merged' writes each diff's entries into the base weights, and a quantized base's codes cannot take "
    "them; serve it with strategy 'auto' or 'mixed' (--strategy), which run every diff unmerged over a quantized base"
)

# A job reports through one callback: ("text", str), then ("done", Completion) or ("error", Exception).
EventSink = Callable[[str, Any], None]


@dataclass(eq=False)
class Job:
    """One generation request waiting for, or running on, the worker."""

    diff: DiffVersion | None  # None: the base model
    prompt_ids: list[int]
    params: SamplingParams
    on_event: EventSink
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating for this job (e.g. its client went away); a finished job ignores this."""
        self.cancelled.set()


def order_by_diff(jobs: list[Job], merged: DiffVersion | None) -> list[Job]:
    """Jobs grouped by diff (groups in order of first arrival), the group of the merged diff first."""
    groups: dict[int, list[Job]] = {}
    for job in jobs:
        groups.setdefault(id(job.diff), []).append(job)
    ordered = sorted(groups.values(), key=lambda group: group[0].diff is not merged)  # stable sort
    return [job for group in ordered for job in group]


class Engine:
    """Runs requests for the base or any loaded diff on one shared model.

    Example:
        >>> engine = Engine(model, tokenizer)  # doctest: +SKIP
        >>> registry = DiffRegistry(engine.validated_entries)  # doctest: +SKIP
        >>> engine.start()  # doctest: +SKIP
        >>> engine.complete(registry.load("support", "diffs/support"), ids, SamplingParams(max_tokens=8))  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, tokenizer, metrics: ServeMetrics | None = None, max_queue: int = 256,
                 allow_unverified_base: bool = False):
        self.model = model.eval()
        self.allow_unverified_base = allow_unverified_base  # serve diffs that record no base fingerprint
        for param in model.parameters():
            param.requires_grad_(False)
        self.tokenizer = tokenizer
        self.metrics = metrics or ServeMetrics()
        self.max_queue = max_queue
        self.weights_lock = threading.Lock()  # held while the weights change or the model runs
        self._weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        # Codes and scales cannot take entries: over a quantized base every diff runs unmerged.
        self.can_merge = not any(is_quantized(w) for w in self._weights.values())
        self._check_base_fits_strategy()
        self._merged: DiffVersion | None = None
        self._merged_entries = MergedEntries.merge(self._weights, {})  # nothing merged: the base
        self._fingerprints: dict[tuple, str] = {}
        self._queue: list[Job] = []
        self._wakeup = threading.Condition()
        self._stopping = False
        self._worker: threading.Thread | None = None
        self.swaps = 0

    def _check_base_fits_strategy(self) -> None:
        """Merge on switch writes every diff into the weights: refused up front over a quantized base."""
        if not self.can_merge:
            raise ConfigError(MERGED_OVER_QUANTIZED)

    # ------------------------------------------------------------ diff validation (for the registry)

    def validated_entries(self, diff: SparseDiff, where: str) -> Entries:
        """Check ``diff`` fits the served base (modules, shapes, fingerprint) and return its entries
        on the model's device in the weights' dtype. Raises the diffio errors for a wrong diff."""
        weights = target_weights(self.model, diff.config)
        check_against_model(diff, weights, where, fingerprint_of=self.base_fingerprint,
                            allow_unverified_base=self.allow_unverified_base)
        entries = {}
        for name, indices in diff.masks.items():
            w = weights[name]
            # Rounded once here, by the rule every merge uses, so switching does no conversions (fp32 over codes).
            entries[name] = (compact_indices(indices, w), delta_values(diff.values[name], w))
        return entries

    def base_fingerprint(self, weights: dict[str, torch.Tensor]) -> str:
        """``base_match.fingerprint`` of the base's own entries, even while a diff is merged; cached per module set."""
        key = tuple(sorted((name, tuple(w.shape), str(w.dtype)) for name, w in weights.items()))
        if key not in self._fingerprints:
            with self.weights_lock:
                # The base's entries, not the live ones: a merged diff is restored in copies.
                self._fingerprints[key] = fingerprint(self._merged_entries.base_weights(weights))
        return self._fingerprints[key]

    # ------------------------------------------------------------ switching

    @property
    def merged(self) -> DiffVersion | None:
        """The diff whose entries are in the weights now (None: the base)."""
        return self._merged

    def switch_to(self, diff: DiffVersion | None) -> None:
        """Make the weights W + S of ``diff`` (or the base). Caller holds ``weights_lock``."""
        if diff is self._merged:
            return
        start = time.perf_counter()
        self._restore_base()
        if diff is not None:
            self._merge(diff)
        self.swaps += 1
        self.metrics.swaps.inc()
        self.metrics.swap_seconds.observe(time.perf_counter() - start)

    def _merge(self, diff: DiffVersion) -> None:
        self._merged_entries = MergedEntries.merge(self._weights, diff.entries)  # all or nothing
        self._merged = diff

    def _restore_base(self) -> None:
        self._merged_entries.restore()
        self._merged = None

    def forget(self, diff: DiffVersion) -> None:
        """Restore the base now if ``diff`` (being unloaded) is the one merged."""
        with self.weights_lock:
            if self._merged is diff:
                self._restore_base()

    # ------------------------------------------------------------ the worker

    def start(self) -> None:
        if self._worker is not None and self._worker.is_alive():
            return
        self._stopping = False
        self._worker = threading.Thread(target=self._serve_forever, name="sparseft-engine", daemon=True)
        self._worker.start()

    def stop(self) -> None:
        """Finish the running request, fail the queued ones, restore the base weights."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._worker is not None:
            self._worker.join()
        with self._wakeup:
            leftover, self._queue = self._queue, []
        for job in leftover:
            job.on_event("error", ServerBusyError("the server is shutting down"))
        with self.weights_lock:
            self._restore_base()

    @property
    def alive(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(self, diff: DiffVersion | None, prompt_ids: list[int], params: SamplingParams, on_event: EventSink) -> Job:
        """Queue a request; events arrive on ``on_event`` from the worker thread."""
        job = Job(diff, prompt_ids, params, on_event)
        with self._wakeup:
            if self._stopping:
                raise ServerBusyError("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise ServerBusyError(f"{len(self._queue)} requests are queued (limit {self.max_queue}); retry later")
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._wakeup.notify()
        return job

    def complete(self, diff: DiffVersion | None, prompt_ids: list[int], params: SamplingParams) -> Completion:
        """Blocking convenience: submit and wait for the result (raises the job's error)."""
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def on_event(kind: str, payload: Any) -> None:
            if kind in ("done", "error"):
                outcome[kind] = payload
                done.set()

        self.submit(diff, prompt_ids, params, on_event)
        done.wait()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["done"]

    def _next_round(self) -> list[Job] | None:
        with self._wakeup:
            while not self._queue and not self._stopping:
                self._wakeup.wait()
            if self._stopping:
                return None
            jobs, self._queue = self._queue, []
            self.metrics.queue_depth.set(0)
            return jobs

    def _serve_forever(self) -> None:
        while (jobs := self._next_round()) is not None:
            for job in order_by_diff(jobs, self._merged):
                self._run(job)

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            job.on_event("error", ServerBusyError("cancelled before it started"))
            return
        self.metrics.queue_wait.observe(time.perf_counter() - job.enqueued_at)
        try:
            with self.weights_lock:
                try:
                    self.switch_to(job.diff)
                    result = generate(
                        self.model, self.tokenizer, job.prompt_ids, job.params,
                        on_text=lambda piece: job.on_event("text", piece), cancelled=job.cancelled,
                    )
                except BaseException:
                    self._restore_base()  # a failed request leaves the base weights, never a diff
                    raise
        except Exception as e:  # reported to the client; the worker keeps serving
            log.exception("request for %s failed", job.diff.key if job.diff else "the base model")
            job.on_event("error", e)
            return
        job.on_event("done", result)
