"""TrainConfig: every value of a training run (the CLI flags mirror it); YAML in and out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import ALLOCATIONS, LLAMA_PROJECTIONS, VALUE_DTYPES, SparseConfig, convert_fields
from ..errors import ConfigError
from ..quantize import check_scheme
from .sharding import check_fsdp_config

METHODS = ("sparse", "full", "lora")
PRECISIONS = ("auto", "bf16", "fp32")
# Fields that say where a run goes or how it is resumed, not what it computes: left out of provenance
# so that two identical runs into different directories record the same provenance.
LOCATION_FIELDS = ("out", "resume", "progress")


@dataclass
class TrainConfig:
    """A training run.

    Example:
        >>> cfg = TrainConfig(model="smollm2-135m", data="train.jsonl", out="runs/sst2", density=0.01, steps=100)
        >>> cfg.method
        'sparse'

    Fields (besides the obvious ones):
        method: ``sparse`` (train k entries, save a diff), ``full`` (all weights, save an HF model
            directory) or ``lora`` (peft LoRA adapter).
        density / num_params / scorer / allocation / target_modules / calibration_batches /
            value_dtype: as in :class:`sparseft.SparseConfig` (sparse runs; ``target_modules`` also
            sets where LoRA goes).
        masks: a saved masks/diff file to train exactly those entries (instead of selecting).
        reselect_every / reselect_fraction: dynamic re-selection (sparse runs): every N steps each
            module swaps its smallest-|value| entries for the largest-|gradient| ones outside its
            mask, k fixed; ``reselect_fraction`` of k at the first re-selection, cosine-decayed to 0
            at the end (see ``sparseft.training.reselect``). 0 or None: off (the default).
        steps: optimizer steps; when None, ``epochs`` passes over the data decide.
        batch_size: rows per micro-batch per process; one optimizer step sees
            ``batch_size × grad_accum × world_size`` rows.
        warmup_steps / warmup_ratio: linear warm-up length (steps wins when both are set), then cosine
            decay to ``min_lr_ratio × lr``.
        max_length / truncation: longer examples are an error unless truncation is on.
        save_every: write a resumable checkpoint every N steps (0: never).
        resume: a checkpoint directory, or ``"latest"`` for the newest under ``out/checkpoints``.
        lora_rank / lora_alpha / lora_match_sparse: LoRA shape; with ``lora_match_sparse`` the rank
            is chosen so the trainable count is closest to the sparse run's at ``density``.
        dtype: dtype the base model is loaded in; device: ``auto`` (CUDA when present) or a torch device.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``bf16`` (autocast on any device) or
            ``fp32``. Trainable values and optimizer state stay fp32 in every case.
        fsdp: under torchrun / accelerate launch, shard the frozen base across the processes with FSDP2
            (each holds 1/N of it) instead of replicating it with DDP; sparse runs without
            re-selection only (see ``sparseft.training.sharding``).
        quantize: ``int8`` or ``int4``: train over a weight-only quantized base (sparse runs; torchao,
            ``pip install 'sparseft[quant]'``). Entries are selected on the full-precision base, then
            its linear weights are quantized and the diff is fingerprinted against the quantized base
            (see ``sparseft.quantize``).
    """

    model: str = ""
    data: str = ""
    out: str = ""
    method: str = "sparse"
    # selection
    density: float | None = 0.01
    num_params: int | None = None
    scorer: str = "random"
    allocation: str = "proportional"
    masks: str | None = None
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_PROJECTIONS))
    calibration_batches: int = 8
    value_dtype: str = "bfloat16"
    reselect_every: int | None = None
    reselect_fraction: float = 0.1
    # optimisation
    steps: int | None = None
    epochs: float = 1.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int | None = 512
    truncation: bool = False
    seed: int = 0
    # bookkeeping
    save_every: int = 0
    log_every: int = 1
    resume: str | None = None
    progress: bool = True
    # baselines
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_match_sparse: bool = False
    # hardware
    dtype: str = "float32"
    device: str = "auto"
    precision: str = "auto"
    fsdp: bool = False
    quantize: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        convert_fields(self)  # numbers from YAML may be strings (``lr: 1e-3``); store the declared types
        checks = [
            (self.method in METHODS, f"method must be one of {METHODS}, got {self.method!r}"),
            (self.allocation in ALLOCATIONS, f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}"),
            (self.value_dtype in VALUE_DTYPES, f"value_dtype must be one of {VALUE_DTYPES}, got {self.value_dtype!r}"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps!r}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr!r}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum!r}"),
            (self.max_length is None or self.max_length >= 2, f"max_length must be >= 2, got {self.max_length!r}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps!r}"),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every!r}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.check_reselection()
        if self.fsdp:
            check_fsdp_config(self.method, self.reselecting)
        if self.quantize is not None:
            self.check_quantize()
        if self.method == "sparse" and self.masks is None:
            self.sparse_config()  # validates density / num_params / scorer fields early

    def check_reselection(self) -> None:
        # Types are settled by convert_fields (an int or None, a float); only the ranges are checked here.
        every = self.reselect_every
        check_reselect_ranges(every, self.reselect_fraction)
        if every and self.method != "sparse":
            raise ConfigError(f"reselect_every applies to sparse runs only (it moves a sparse mask), not method={self.method!r}")

    def check_quantize(self) -> None:
        check_scheme(self.quantize)
        if self.method != "sparse":
            raise ConfigError(f"quantize applies to sparse runs only (the diff sits over the quantized base), "
                              f"not method={self.method!r}")
        if self.fsdp:
            raise ConfigError("quantize cannot be combined with fsdp: FSDP does not shard quantized weights here")

    @property
    def reselecting(self) -> bool:
        return bool(self.reselect_every)

    # ------------------------------------------------------------ derived

    def sparse_config(self) -> SparseConfig:
        """The selection part of this run as a SparseConfig (what the diff records)."""
        return SparseConfig(
            density=self.density,
            num_params=self.num_params,
            target_modules=list(self.target_modules),
            scorer=self.scorer,
            allocation=self.allocation,
            calibration_batches=self.calibration_batches,
            value_dtype=self.value_dtype,
            seed=self.seed,
        )

    def provenance_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in LOCATION_FIELDS}

    # ------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**data)

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Fields from a YAML file; ``overrides`` that are not None win (how CLI flags combine with --config).

        A bad value that comes from the file is reported as ``FILE:line N: <field> ...``.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        text = path.read_text()
        try:
            data = yaml.safe_load(text) or {}
            lines = key_lines(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of TrainConfig fields, got {type(data).__name__}")
        given = {k: v for k, v in overrides.items() if v is not None}
        data.update(given)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            # Every field check's message starts with the field's name.
            name = str(e).split(" ", 1)[0]
            if name in lines and name not in given:
                raise ConfigError(f"{path}:line {lines[name]}: {e}") from e
            raise


def key_lines(text: str) -> dict[str, int]:
    """``{field: 1-based line}`` of the top-level keys of a YAML mapping (``-`` in keys read as ``_``)."""
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(key.value).replace("-", "_"): key.start_mark.line + 1 for key, _ in node.value}


def check_reselect_ranges(every: int | None, fraction: float) -> None:
    """The ranges of the re-selection options (for TrainConfig and the Hugging Face SparseTrainer)."""
    if every is not None and every < 0:
        raise ConfigError(f"reselect_every must be a whole number of steps >= 0 (0 or null: off), got {every!r}")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"reselect_fraction must be in (0, 1] (share of each module's k swapped at the first "
                          f"re-selection), got {fraction!r}")
