"""The largest Llama whose sparse training step fits on one GPU, over a bf16 base and a 4-bit (nf4) base.

For each try (a named shape of ``sparseft.bench.shapes`` and a base kind), in a fresh process:

1. the model is created on the ``meta`` device (sizes only, no memory), then materialized one piece
   at a time directly on the GPU in bf16 (embeddings, each decoder layer, final norm, head), random
   init from a generator seeded per piece; for ``nf4`` each decoder layer's linear weights are
   quantized (``sparseft.quantize``, QLoRA's NF4) before the next layer exists, so the full-precision
   model never exists at once. The head and embeddings stay bf16 (QLoRA keeps them unquantized too);
2. it is wrapped for sparse training at ``--density`` of every projection, entries uniformly at
   random (what the ``random`` scorer gives, sampled on the GPU: the scorer's CPU top-k over 70B
   scores would take longer than the step), with no base fingerprint (hashing 140 GB is not what is
   measured here). Over the bf16 base the delta is merged in place; over nf4 it runs unmerged;
3. ``--steps`` AdamW steps on random tokens (batch ``--batch`` × ``--seq``), with Hugging Face's
   gradient checkpointing per decoder layer (non-reentrant) unless ``--no-checkpointing``.

Recorded per try: fits or where it ran out of memory (build / step), the base's memory, the peak
(``torch.cuda.max_memory_allocated``), the last step's time. Per base kind the ladder is tried from
the largest shape down and stops at the first that fits; a shape whose base plus sparse state alone
(a lower bound of what the step needs) exceeds the card is skipped without building. Then the
``--anchors`` run: by default QLoRA's anchor, a 65B model over a 4-bit base (which QLoRA trains on one
48 GB card), at density 0.001 (at the ladder's 0.01 the sparse state alone, 24 bytes per entry, puts
it past 48 GB). The table says for each fitting try whether its peak is within 48 GB. It is
rewritten after every try, so a run cut short keeps what it measured.

    python -m sparseft.bench.gpu_fit --out docs/benchmarks/gpu_fit.md          # one H200: est. 3-4 min
    python -m sparseft.bench.gpu_fit --device cpu --tiny --out /tmp/fit.md      # smoke test, seconds

The nf4 base needs torchao (not on every GPU image); without it those tries are recorded as skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import LLAMA_PROJECTIONS, SparseConfig
from .shapes import SHAPES, linear_params_per_layer, llama_config, parameter_count

BASES = ("bf16", "nf4")
LADDER = ("405b", "70b", "65b", "34b", "13b", "8b", "3b", "1b")
SPARSE_STATE_BYTES = 8 + 4 + 4 + 8  # per trained entry: int64 index, fp32 value, its gradient, AdamW's two moments
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # codes, an int8 scale per 64, a factor per 256 scales


@dataclass
class FitResult:
    shape: str
    base: str  # bf16 | nf4
    density: float
    status: str  # fits | oom-build | oom-step | skipped | failed
    params: int
    base_gib: float | None = None  # allocated once the base exists (before wrapping)
    peak_gib: float | None = None
    step_s: float | None = None
    trainable: int | None = None
    checkpointing: bool = True
    note: str = ""


# ---------------------------------------------------------------- the model, one piece at a time


def meta_model(shape: str, seq: int, **overrides):
    """A ``LlamaForCausalLM`` of ``shape`` on the meta device: bf16 parameters with no storage."""
    from transformers import LlamaForCausalLM

    config = llama_config(shape, min_positions=seq, **overrides)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def init_piece(module: nn.Module, device: torch.device, seed: int, std: float) -> None:
    """Give ``module``'s meta parameters real memory on ``device`` and seeded random values:
    Hugging Face's Llama init (normal(0, std) for linear and embedding weights, ones for norms)."""
    module.to_empty(device=device, recurse=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, (nn.Linear, nn.Embedding)):
                sub.weight.normal_(0.0, std, generator=gen)
                if getattr(sub, "bias", None) is not None:
                    sub.bias.zero_()
            elif hasattr(sub, "weight") and isinstance(sub.weight, torch.Tensor) and sub.weight.dim() == 1:
                sub.weight.fill_(1.0)  # RMSNorm


def quantize_layer_nf4(layer: nn.Module) -> None:
    """Quantize one decoder layer's linear weights to nf4 in place (its bf16 weights are freed)."""
    from ..quantize import quantize_base

    quantize_base(layer, "nf4")


def build_layerwise(shape: str, base: str, device: torch.device, seed: int = 0, seq: int = 0, **overrides):
    """A random-init Llama of ``shape`` built piece by piece on ``device`` (bf16), its decoder layers
    quantized to nf4 one at a time when ``base == "nf4"``. Piece i is seeded with ``seed · 10⁶ + i``,
    so a layer's weights do not depend on how many layers were built before it."""
    model = meta_model(shape, seq, **overrides)
    inner, std = model.model, model.config.initializer_range
    pieces = [inner.embed_tokens, *inner.layers, inner.norm]
    if not model.config.tie_word_embeddings:
        pieces.append(model.lm_head)
    decoder_layers = {id(layer) for layer in inner.layers}
    for i, piece in enumerate(pieces):
        init_piece(piece, device, seed * 10**6 + i, std)
        if base == "nf4" and id(piece) in decoder_layers:
            quantize_layer_nf4(piece)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = inner.embed_tokens.weight
    with torch.device(device):  # the rotary frequencies are computed, not drawn: make them again, in fp32
        inner.rotary_emb = type(inner.rotary_emb)(model.config)
    model.config.use_cache = False
    return model


def enable_checkpointing(model) -> None:
    """Hugging Face's checkpointing of every decoder layer, non-reentrant (the frozen embeddings give
    the first layer an input with no gradient, which the reentrant variant would not backpropagate)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ---------------------------------------------------------------- sparse wrapping and the step


def sample_entries(numel: int, k: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """k distinct flat positions out of ``numel``, uniformly at random, sorted; made on ``device``.

    Draws a few percent more positions than needed and drops repeats (cheap at the densities
    trained here), instead of a permutation of all ``numel`` positions."""
    extra = max(16, k // 20)
    for _ in range(4):
        drawn = torch.unique(torch.randint(numel, (k + extra,), generator=gen, device=device))
        if drawn.numel() >= k:
            keep = torch.randperm(drawn.numel(), generator=gen, device=device)[:k]
            return torch.sort(drawn[keep]).values
        extra *= 4
    return torch.sort(torch.randperm(numel, generator=gen, device=device)[:k]).values


def wrap_sparse(model, density: float, seed: int = 0):
    """The ``SparseModel`` over ``model`` at ``density`` of every projection, entries at random."""
    from ..model import SparseModel
    from ..targets import find_targets

    config = SparseConfig(density=density, scorer="random", seed=seed)
    device = model.lm_head.weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    # Sampled on the device, kept on the CPU: SparseModel copies each layer's indices to the device, and two
    # device copies of every index (8 bytes per entry) would be a transient that training never needs.
    masks = {name: sample_entries(layer.weight.numel(), max(1, round(density * layer.weight.numel())), gen, device).cpu()
             for name, layer in find_targets(model, LLAMA_PROJECTIONS).items()}
    return SparseModel(model, config, masks, base_fingerprint={"not computed": "gpu_fit probe"})


def memory_gib(device: torch.device, peak: bool) -> float:
    if device.type == "cuda":
        used = torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)
        return used / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # CPU: peak RSS (Linux: KiB)


def train_steps(sparse, device: torch.device, steps: int, batch: int, seq: int, vocab: int) -> float:
    """Seconds of the last of ``steps`` AdamW steps on random tokens."""
    optimizer = torch.optim.AdamW(sparse.sparse_parameters(), lr=1e-5)
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    seconds = 0.0
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        sparse(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return seconds


def lower_bound_bytes(shape: str, base: str, density: float) -> int:
    """Bytes the step needs at the least: the base as stored plus the sparse state (no activations)."""
    c = SHAPES[shape]
    linear = c["num_hidden_layers"] * linear_params_per_layer(shape)
    rest = parameter_count(shape) - linear
    base_bytes = 2 * rest + (NF4_BYTES_PER_WEIGHT if base == "nf4" else 2) * linear
    return int(base_bytes + SPARSE_STATE_BYTES * density * linear)


def nf4_missing() -> str | None:
    """Why an nf4 base cannot be built here (torchao missing or broken), or None."""
    try:
        from torchao.quantization import to_nf4

        to_nf4(torch.randn(64, 64, dtype=torch.bfloat16), 64, 64)
    except Exception as e:  # noqa: BLE001 - any failure means: no nf4 here, say which
        return f"nf4 needs torchao, which failed here: {type(e).__name__}: {e}"[:300]
    return None


def probe(args, shape: str, base: str, density: float) -> FitResult:
    """One try, in this process: build, wrap, step; out-of-memory is a result, not an error."""
    device = torch.device(args.device)
    result = FitResult(shape, base, density, "fits", parameter_count(shape), checkpointing=args.checkpointing)
    if base == "nf4" and (why := nf4_missing()):
        result.status, result.note = "skipped", why
        return result
    phase = "build"
    try:
        model = build_layerwise(shape, base, device, seq=args.seq)
        if args.checkpointing:
            enable_checkpointing(model)
        model.train()
        result.base_gib = memory_gib(device, peak=False)
        sparse = wrap_sparse(model, density)
        result.trainable = sum(p.numel() for p in sparse.sparse_parameters())
        phase = "step"
        result.step_s = train_steps(sparse, device, args.steps, args.batch, args.seq, model.config.vocab_size)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not isinstance(e, torch.OutOfMemoryError) and "out of memory" not in str(e):
            raise  # a bug, not a size: the parent records the try as failed, with this error
        result.status, result.note = f"oom-{phase}", str(e).splitlines()[0][:200]
    result.peak_gib = memory_gib(device, peak=True)
    return result


# ---------------------------------------------------------------- the ladder


def run_isolated(args, shape: str, base: str, density: float, timeout_s: float) -> FitResult:
    """``probe`` in a fresh interpreter (no memory left over from the last try)."""
    cmd = [sys.executable, "-m", "sparseft.bench.gpu_fit", "--one", f"{shape}:{base}:{density}", "--device", args.device,
           "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), *([] if args.checkpointing else ["--no-checkpointing"])]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return FitResult(shape, base, density, "failed", parameter_count(shape), note=f"no result within {timeout_s:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
        return FitResult(shape, base, density, "failed", parameter_count(shape), note=f"exit {done.returncode}: {tail}")
    return FitResult(**json.loads(lines[-1]))


def card_bytes(device: torch.device) -> int | None:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def tries(args, base: str, card: int | None):
    """(shape, reason to skip or None) from the largest shape down."""
    for shape in args.ladder:
        need = lower_bound_bytes(shape, base, args.density)
        if card is not None and need > card:
            yield shape, f"base + sparse state alone {need / 2**30:.0f} GiB > card {card / 2**30:.0f} GiB (not built)"
        else:
            yield shape, None


def run_ladder(args, write) -> list[FitResult]:
    """Per base kind, try the ladder downwards until one shape fits; then the ``--anchors``."""
    device, started = torch.device(args.device), time.monotonic()
    card, results = card_bytes(device), []

    def left() -> float:
        return args.budget_s - (time.monotonic() - started)

    def attempt(shape: str, base: str, density: float) -> FitResult:
        if left() < 10:
            result = FitResult(shape, base, density, "skipped", parameter_count(shape), note="time budget spent")
        else:
            result = run_isolated(args, shape, base, density, min(args.try_timeout_s, left()))
        results.append(result)
        write(results)
        print(f"{shape} {base}: {result.status} {result.peak_gib} GiB {result.note}", file=sys.stderr, flush=True)
        return result

    unavailable = set()  # base kinds that cannot be built here (nf4 without torchao)
    for base in args.bases:
        for shape, skip in tries(args, base, card):
            if skip:
                results.append(FitResult(shape, base, args.density, "skipped", parameter_count(shape), note=skip))
                continue
            status = attempt(shape, base, args.density).status
            if status == "skipped":
                unavailable.add(base)
            if status in ("fits", "skipped"):
                break
    done = {(r.shape, r.base, r.density) for r in results}
    for shape, base, density in args.anchors:
        if (shape, base, density) not in done and base not in unavailable:
            attempt(shape, base, density)
    write(results)
    return results


def largest_fitting(results: list[FitResult], density: float) -> dict[str, FitResult]:
    """Per base kind, the fitting try at ``density`` with the most parameters."""
    best: dict[str, FitResult] = {}
    for r in results:
        if r.status == "fits" and r.density == density and (r.base not in best or r.params > best[r.base].params):
            best[r.base] = r
    return best


QLORA_CARD_GIB = 48e9 / 2**30  # QLoRA's anchor: a 65B model finetuned on one 48 GB card


def billions(params: int) -> str:
    return f"{params / 1e9:.1f}B" if params >= 10**8 else f"{params / 1e6:.2f}M"


def markdown(results: list[FitResult], header: str, density: float) -> str:
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = [header, "", "| shape | params | base | density | result | base GiB | peak GiB | within 48 GB | step s "
             "| trainable | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        within = "" if r.status != "fits" else ("yes" if r.peak_gib <= QLORA_CARD_GIB else "no")
        lines.append(f"| {r.shape} | {billions(r.params)} | {r.base} | {r.density:g} | {r.status} "
                     f"| {fmt(r.base_gib, '.1f')} | {fmt(r.peak_gib, '.1f')} | {within} | {fmt(r.step_s, '.2f')} "
                     f"| {fmt(r.trainable, ',')} | {r.note} |")
    best = largest_fitting(results, density)
    lines += ["", f"Largest that fits at density {density:g}: " + ("; ".join(
        f"{b} base: **{r.shape}** ({billions(r.params)}, peak {r.peak_gib:.1f} GiB)" for b, r in best.items()) or "none")]
    return "\n".join(lines) + "\n"


def machine_line(args) -> str:
    device = torch.device(args.device)
    if device.type == "cuda":
        card = f"{torch.cuda.get_device_name(device)} ({card_bytes(device) / 2**30:.0f} GiB)"
    else:
        card = f"CPU {platform.processor() or platform.machine()} (peak = process RSS)"
    checkpointing = "gradient checkpointing per decoder layer" if args.checkpointing else "no gradient checkpointing"
    return (f"{card}; torch {torch.__version__}; sparse training of every projection, random entries; "
            f"batch {args.batch} × {args.seq}, AdamW, {args.steps} steps (time of the last); {checkpointing}")


def anchor(text: str) -> tuple[str, str, float]:
    """``SHAPE:BASE:DENSITY`` as a try."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in SHAPES or parts[1] not in BASES:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SHAPE:BASE:DENSITY, SHAPE one of {sorted(SHAPES)}, "
                                         f"BASE one of {list(BASES)}, e.g. 65b:nf4:0.001")
    return parts[0], parts[1], float(parts[2])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sparseft.bench.gpu_fit", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, 16 tokens: a smoke test")
    parser.add_argument("--ladder", nargs="+", default=list(LADDER), choices=sorted(SHAPES),
                        help="shapes to try, largest first")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=BASES)
    parser.add_argument("--anchors", nargs="*", default=["65b:nf4:0.001"], type=anchor,
                        help="SHAPE:BASE:DENSITY tries to add after the ladder while time is left "
                             "(default: QLoRA's 65B over a 4-bit base, at a 10x smaller budget than the ladder's)")
    parser.add_argument("--density", type=float, default=SparseConfig().density)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    parser.add_argument("--budget-s", type=float, default=230, help="stop starting tries after this many seconds")
    parser.add_argument("--try-timeout-s", type=float, default=120)
    parser.add_argument("--out", default="gpu_fit.md", help="Markdown table; JSON rows go next to it")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # shape:base, run by run_isolated
    args = parser.parse_args(argv)
    if args.tiny:
        args.ladder, args.anchors, args.seq = ["tiny"], [], 16
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu --tiny for a smoke test")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(asdict(probe(args, *anchor(args.one)))))
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m sparseft.bench.gpu_fit " + " ".join(argv if argv is not None else sys.argv[1:])
    header = f"{machine_line(args)}\n\nCommand: `{command}`"

    def write(results: list[FitResult]) -> None:
        out.write_text(markdown(results, header, args.density))
        out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")

    results = run_ladder(args, write)
    print(markdown(results, header, args.density))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
