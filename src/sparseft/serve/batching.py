"""The batching strategies: requests join and leave one running batch at every decoding step.

One worker thread runs a loop of steps. Each step it (1) ends rows whose client cancelled, (2) admits
queued requests in arrival order while the batch has room (``max_batch_size`` rows and, optionally,
``max_batch_tokens`` of prompt + max_tokens summed over the rows), (3) prefills each admitted prompt
alone (batch of one: its first token is computed exactly as offline), adds its KV cache to the
batch's, and (4) decodes one token for every row in one forward. A finished row leaves at once.

The batch's KV cache is one ``DynamicCache`` whose rows are right-aligned (left padding masked out
by the attention mask); a joining row is padded on the left to the batch's length (or the batch to
the row's), a leaving row is dropped with ``index_select`` and columns no row uses any more are
trimmed. Position ids are each row's own token count, so padding never shifts a row's positions.

Which weights a row computes with:
- ``mixed``: the base weights never change; every targeted linear adds each row's own diff through
  ``serve.mixed`` (one gather-multiply-index_add over the entries of the diffs in the batch).
- ``auto``: when every row of the step uses the same diff, that diff is merged (merge-on-switch,
  exact restore, as ``Engine``) and the hooks are idle; with two or more distinct diffs the base is
  restored and the rows run unmerged as in ``mixed``. The rule is taken anew every step. Over a
  quantized base (codes cannot take entries) ``auto`` never merges: it runs as ``mixed``.

Greedy outputs equal the offline ``base + diff`` merged output token for token on fp32 models in
practice; the two computations round differently (see docs/serving.md for the measured gap).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from ..errors import ServerBusyError
from .decoding import Completion, SamplingParams, TextStream, finish_reason, generation_config
from .engine import Engine, Job
from .metrics import ServeMetrics
from .mixed import MixedDiffs
from .registry import DiffVersion

log = logging.getLogger(__name__)

BATCHING_STRATEGIES = ("auto", "mixed")


def token_picker(params: SamplingParams, device: torch.device) -> Callable[[torch.Tensor], int] | None:
    """Samples one token from a row's (1, vocab) fp32 logits; None for greedy (the batch takes the argmax).

    A seeded request gets its own generator, so its draws do not depend on the other rows' requests.
    """
    if params.temperature == 0:
        return None
    warpers = LogitsProcessorList([TemperatureLogitsWarper(params.temperature), TopPLogitsWarper(params.top_p)])
    generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None

    def pick(logits: torch.Tensor) -> int:
        probs = torch.softmax(warpers(None, logits), dim=-1)
        return int(torch.multinomial(probs, 1, generator=generator))

    return pick


@dataclass(eq=False)
class Row:
    """One request in the running batch."""

    job: Job
    stream: TextStream
    pick: Callable[[torch.Tensor], int] | None
    eos: set[int]
    new_ids: list[int]
    cached: int  # tokens of this row in the KV cache (prompt + generated - the pending one)

    @property
    def diff(self) -> DiffVersion | None:
        return self.job.diff

    @property
    def pending(self) -> int:
        """The newest token: generated, not yet in the cache."""
        return self.new_ids[-1]

    def finished(self) -> bool:
        return (self.job.cancelled.is_set() or self.stream.stopped or self.new_ids[-1] in self.eos
                or len(self.new_ids) >= self.job.params.max_tokens)


def left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``t`` padded with zeros at the start of ``dim`` to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, pad)


class BatchCache:
    """The running batch's KV cache (one ``DynamicCache``, rows right-aligned) and its attention mask."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, columns) long, 0 where a row has padding

    @property
    def columns(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, row_cache: DynamicCache, length: int) -> None:
        """Append one prefilled row (its cache holds ``length`` tokens) as the last row."""
        row_mask = torch.ones(1, length, dtype=torch.long, device=row_cache.layers[0].keys.device)
        if self.cache is None:
            self.cache, self.mask = row_cache, row_mask
            return
        width = max(self.columns, length)
        for mine, theirs in zip(self.cache.layers, row_cache.layers):
            mine.keys = torch.cat([left_pad(mine.keys, width, -2), left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([left_pad(mine.values, width, -2), left_pad(theirs.values, width, -2)])
        self.mask = torch.cat([left_pad(self.mask, width, 1), left_pad(row_mask, width, 1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); drop columns that are padding in every kept row."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        unused = int((self.mask.index_select(0, index).cumsum(1) == 0).sum(1).min())
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., unused:, :]
            layer.values = layer.values.index_select(0, index)[..., unused:, :]
        self.mask = self.mask.index_select(0, index)[:, unused:]


class BatchingEngine(Engine):
    """Continuous batching over one base model: rows of different diffs decode together.

    Same interface as ``Engine`` (``submit``, ``complete``, ``start``, ``stop``, ``forget``, ...);
    ``stop`` ends the running requests with a "shutting down" error instead of finishing them.

    Example:
        >>> engine = BatchingEngine(model, tokenizer, strategy="mixed", max_batch_size=32)  # doctest: +SKIP
        >>> registry = DiffRegistry(engine.validated_entries)  # doctest: +SKIP
        >>> engine.start()  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, tokenizer, metrics: ServeMetrics | None = None, max_queue: int = 256,
                 strategy: str = "mixed", max_batch_size: int = 16, max_batch_tokens: int | None = None,
                 allow_unverified_base: bool = False):
        if strategy not in BATCHING_STRATEGIES:
            raise ValueError(f"strategy must be one of {BATCHING_STRATEGIES}, got {strategy!r}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        super().__init__(model, tokenizer, metrics, max_queue, allow_unverified_base)
        self.strategy, self.max_batch_size, self.max_batch_tokens = strategy, max_batch_size, max_batch_tokens
        self.mixed = MixedDiffs(model)
        self.device = next(model.parameters()).device
        self._rows: list[Row] = []
        self._batch = BatchCache()
        self._rows_key: tuple | None = None  # (merged?, diff of each row) the hooks were last told
        self._forgotten: list[DiffVersion] = []
        self.steps = 0
        self.largest_batch = 0  # most rows decoded in one forward so far

    # ------------------------------------------------------------ the loop

    def _serve_forever(self) -> None:
        while (admitted := self._admit()) is not None:
            with self.weights_lock:
                try:
                    self._step(admitted)
                except Exception as e:  # a failed forward fails the rows in it; the worker keeps serving
                    log.exception("a decoding step failed")
                    self._fail_all(e)
                    for job in admitted:  # admitted but not prefilled yet (e.g. merging their diff failed)
                        job.on_event("error", e)
        with self.weights_lock:
            self._fail_all(ServerBusyError("the server is shutting down"))

    def _admit(self) -> list[Job] | None:
        """Queued jobs that fit in the batch now, oldest first; waits while there is nothing to do."""
        with self._wakeup:
            while not self._queue and not self._rows and not self._stopping:
                self._wakeup.wait()
            if self._stopping:
                return None
            taken, tokens = [], sum(need(r.job) for r in self._rows)
            while self._queue and len(self._rows) + len(taken) < self.max_batch_size:
                job = self._queue[0]
                if self.max_batch_tokens is not None and tokens + need(job) > self.max_batch_tokens and (
                        self._rows or taken):
                    break
                taken.append(self._queue.pop(0))
                tokens += need(job)
            self.metrics.queue_depth.set(len(self._queue))
            return taken

    @torch.inference_mode()
    def _step(self, admitted: list[Job]) -> None:
        self._drop(lambda row: row.job.cancelled.is_set())
        admitted[:] = [job for job in admitted if self._started(job)]  # in place: the caller fails what is left
        self._choose_weights([row.diff for row in self._rows] + [job.diff for job in admitted])
        while admitted:
            self._prefill(admitted.pop(0))
        if self._rows:
            self._choose_weights([row.diff for row in self._rows])  # again: a failed prefill restores the base
            self._decode()
        self._drop(Row.finished)
        self.metrics.batch_rows.set(len(self._rows))
        self._evict_forgotten()
        self.steps += 1

    def _started(self, job: Job) -> bool:
        if job.cancelled.is_set():
            job.on_event("error", ServerBusyError("cancelled before it started"))
            return False
        self.metrics.queue_wait.observe(time.perf_counter() - job.enqueued_at)
        return True

    # ------------------------------------------------------------ weights: merged or mixed

    def _check_base_fits_strategy(self) -> None:
        pass  # both strategies can leave the weights alone: over a quantized base ``auto`` never merges

    def _choose_weights(self, diffs: list[DiffVersion | None]) -> None:
        """``auto`` merges the one diff when all rows share it (and the base can take it); otherwise the base
        with per-row deltas."""
        distinct = {id(d): d for d in diffs}
        if self.strategy == "auto" and self.can_merge and len(distinct) == 1:
            self.switch_to(diffs[0])
        elif distinct:
            self.switch_to(None)

    def _tell_hooks(self, diffs: list[DiffVersion | None]) -> None:
        key = (self._merged is not None, *map(id, diffs))
        if key == self._rows_key:
            return
        if self._merged is not None:  # the merged diff is in the weights: rows need no delta
            self.mixed.clear_rows()
        else:
            self.mixed.set_rows(diffs)
        self._rows_key = key

    # ------------------------------------------------------------ prefill and decode

    def _prefill(self, job: Job) -> None:
        """Run the prompt alone, pick the first token, and add the row to the batch unless it is done."""
        params = job.params
        row = Row(job, TextStream(self.tokenizer, params.stop), token_picker(params, self.device),
                  eos_ids(self.model, params), [], len(job.prompt_ids))
        try:
            self._tell_hooks([job.diff])
            ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
            self._append(row, out.logits[:, -1, :].float())
        except Exception as e:  # this prompt failed alone: only its request gets the error
            log.exception("prefill for %s failed", job.diff.key if job.diff else "the base model")
            self._restore_base()  # as after any failure: the base weights; the next step merges again if it should
            self._rows_key = None
            job.on_event("error", e)
            return
        if row.finished():
            self._finish(row)
        else:
            self._rows.append(row)
            self._batch.add(out.cache, row.cached)

    def _decode(self) -> None:
        """One forward over every row's pending token; each row gets its next token."""
        rows, batch = self._rows, self._batch
        self.largest_batch = max(self.largest_batch, len(rows))
        self.metrics.batch_rows.set(len(rows))
        self._tell_hooks([row.diff for row in rows])
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(rows), 1)], dim=1)
        out = self.model(
            input_ids=torch.tensor([[row.pending] for row in rows], device=self.device),
            attention_mask=batch.mask,
            position_ids=torch.tensor([[row.cached] for row in rows], device=self.device),
            cache=batch.cache, use_cache=True, logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].float()
        for i, row in enumerate(rows):
            row.cached += 1
            self._append(row, logits[i : i + 1])

    def _append(self, row: Row, logits: torch.Tensor) -> None:
        token = int(logits.argmax(-1)) if row.pick is None else row.pick(logits)
        row.new_ids.append(token)
        piece = row.stream.update(row.new_ids)
        if piece:
            row.job.on_event("text", piece)

    # ------------------------------------------------------------ leaving the batch

    def _drop(self, done: Callable[[Row], bool]) -> None:
        keep = [i for i, row in enumerate(self._rows) if not done(row)]
        if len(keep) == len(self._rows):
            return
        for i, row in enumerate(self._rows):
            if i not in keep:
                self._finish(row)
        self._rows = [self._rows[i] for i in keep]
        self._batch.keep(keep)

    def _finish(self, row: Row) -> None:
        rest = row.stream.finish(row.new_ids)
        if rest:
            row.job.on_event("text", rest)
        row.job.on_event("done", Completion(
            text=row.stream.emitted,
            finish_reason=finish_reason(row.new_ids, row.job.params, row.stream, row.job.cancelled, list(row.eos)),
            prompt_tokens=len(row.job.prompt_ids), completion_tokens=len(row.new_ids), token_ids=list(row.new_ids),
        ))

    def _fail_all(self, error: Exception) -> None:
        rows, self._rows, self._batch, self._rows_key = self._rows, [], BatchCache(), None
        self.mixed.clear_rows()
        self._restore_base()  # a failed step leaves the base weights, never a diff
        for row in rows:
            row.job.on_event("error", error)

    # ------------------------------------------------------------ unloading

    def forget(self, diff: DiffVersion) -> None:
        """Restore the base if ``diff`` is merged; drop its entries once no running row uses it."""
        super().forget(diff)
        with self.weights_lock:
            self._forgotten.append(diff)
            self._evict_forgotten()

    def _evict_forgotten(self) -> None:
        in_use = {id(row.diff) for row in self._rows}
        gone = [d for d in self._forgotten if id(d) not in in_use]
        if gone:
            self.mixed.remove(gone)
            self._forgotten = [d for d in self._forgotten if id(d) in in_use]
            self._rows_key = None  # slots were renumbered


def need(job: Job) -> int:
    """KV tokens a request may hold at most: its prompt plus its max_tokens."""
    return len(job.prompt_ids) + job.params.max_tokens


def eos_ids(model, params: SamplingParams) -> set[int]:
    eos = generation_config(model, params).eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
