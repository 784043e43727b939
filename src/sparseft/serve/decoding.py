"""Text in, text out for one request: prompt encoding, ``generate`` with streaming, stop strings.

Generation goes through the model's own ``generate`` so a served completion is token for token what
``SparseModel.generate`` gives offline with the same diff and settings.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList


@dataclass
class SamplingParams:
    """How to decode: ``temperature == 0`` is greedy; ``stop`` strings end the text (and are not returned)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_tokens reached) or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a completion prompt, with the special tokens the tokenizer adds by itself."""
    return list(tokenizer(text)["input_ids"])


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat rendered by the tokenizer's chat template, ready for the assistant's turn."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # The template writes its own special tokens (e.g. BOS); adding them again would double them.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class TextStream:
    """Turns the growing list of generated ids into text pieces, never emitting any part of a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = ""
        self.stopped = False  # a stop string appeared

    def _text(self, ids: list[int]) -> tuple[str, bool]:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[: min(cuts)], True) if cuts else (text, False)

    def _advance(self, text: str, final: bool) -> str:
        safe = len(text)
        if not final:
            # Hold back what could be the start of a stop string, and half-decoded UTF-8.
            safe -= self.holdback
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        safe = max(safe, len(self.emitted))
        piece = text[len(self.emitted) : safe]
        self.emitted += piece
        return piece

    def update(self, ids: list[int]) -> str:
        """The new text to send after ``ids`` were generated so far."""
        text, hit = self._text(ids)
        self.stopped = self.stopped or hit
        return self._advance(text, final=hit)

    def finish(self, ids: list[int]) -> str:
        """Whatever text is still unsent once generation ended with ``ids``."""
        text, hit = self._text(ids)
        self.stopped = self.stopped or hit
        return self._advance(text, final=True)


class WatchStream(StoppingCriteria):
    """Called by ``generate`` after every new token: sends text pieces, stops on a stop string or cancel."""

    def __init__(self, prompt_len: int, stream: TextStream, on_text: Callable[[str], None], cancelled: threading.Event):
        self.prompt_len = prompt_len
        self.stream = stream
        self.on_text = on_text
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        piece = self.stream.update(input_ids[0, self.prompt_len :].tolist())
        if piece:
            self.on_text(piece)
        stop = self.stream.stopped or self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


def generation_config(model, params: SamplingParams) -> GenerationConfig:
    """The model's own EOS/BOS/pad with the request's sampling settings (nothing else inherited)."""
    base = model.generation_config
    eos = base.eos_token_id
    pad = base.pad_token_id if base.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    sampling = (
        dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        if params.temperature > 0
        else dict(do_sample=False)
    )
    return GenerationConfig(
        max_new_tokens=params.max_tokens,
        eos_token_id=eos,
        bos_token_id=base.bos_token_id,
        pad_token_id=pad,
        **sampling,
    )


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompt_ids: list[int],
    params: SamplingParams,
    on_text: Callable[[str], None] = lambda piece: None,
    cancelled: threading.Event | None = None,
) -> Completion:
    """Decode one request on whatever weights ``model`` holds now; ``on_text`` receives text pieces as they come."""
    cancelled = cancelled or threading.Event()
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    stream = TextStream(tokenizer, params.stop)
    watch = WatchStream(len(prompt_ids), stream, on_text, cancelled)
    if params.seed is not None:
        torch.manual_seed(params.seed)
    config = generation_config(model, params)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        generation_config=config,
        stopping_criteria=StoppingCriteriaList([watch]),
    )
    new_ids = out[0, len(prompt_ids) :].tolist()
    rest = stream.finish(new_ids)
    if rest:
        on_text(rest)
    return Completion(
        text=stream.emitted,
        finish_reason=finish_reason(new_ids, params, stream, cancelled, config.eos_token_id),
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(new_ids),
        token_ids=new_ids,
    )


def finish_reason(new_ids: list[int], params: SamplingParams, stream: TextStream, cancelled, eos) -> str:
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if cancelled.is_set():
        return "cancelled"
    if stream.stopped or (new_ids and new_ids[-1] in eos_ids):
        return "stop"
    return "length" if len(new_ids) >= params.max_tokens else "stop"
