"""TrainConfig: every value of a training run (the CLI flags mirror it); YAML in and out."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import SparseConfig, check_budget_request, convert_fields
from ..errors import ConfigError
from ..files import read_yaml_file, yaml_key_lines
from ..methods import get_method, training_methods
from ..quantize import (
    DEFAULT_QUANT_INIT, DEFAULT_SELECT_OVER, QUANT_SCHEMES, check_quant_init, check_scheme, check_select_over,
    skip_patterns,
)
from .sharding import check_fsdp_config

PRECISIONS = ("auto", "bf16", "fp32")
# Fields that say where a run goes or how it is resumed, not what it computes: left out of provenance
# so that two identical runs into different directories record the same provenance.
LOCATION_FIELDS = ("out", "resume", "progress")
# The selection fields, given flat (``density: 0.01``, ``--density``) or under ``selection:``. ``seed`` is
# not one of them: TrainConfig's one seed seeds selection, data order and initialisation alike.
SELECTION_FIELDS = tuple(f.name for f in dataclasses.fields(SparseConfig) if f.name != "seed")
# Where training's selection defaults differ from SparseConfig's: the best measured recipe (docs/training.md).
TRAIN_SELECTION_DEFAULTS = {"scorer": "combined", "calibration_batches": 2}


@dataclass
class TrainConfig:
    """A training run.

    Example:
        >>> cfg = TrainConfig.from_dict(dict(model="smollm2-135m", data="train.jsonl", out="runs/sst2", density=0.05))
        >>> cfg.method, cfg.selection.density
        ('sparse', 0.05)

    Fields (besides the obvious ones):
        method: a registered method (:mod:`sparseft.methods`): ``sparse`` (train k entries, save a
            diff), ``full`` (all weights, save an HF model directory) or ``lora`` (peft LoRA adapter).
        selection: a :class:`sparseft.SparseConfig` (density / num_params / scorer / allocation /
            target_modules / calibration_batches / scorer_weights / value_dtype) for sparse runs;
            ``target_modules`` also sets where LoRA goes. ``from_dict``, YAML files and CLI flags take
            these fields flat too (``density: 0.05`` or ``selection: {density: 0.05}``); its seed is ``seed``.
            The scorer defaults to ``combined`` here (``SparseConfig`` itself defaults to ``random``): the
            best measured recipe, ~3 points over random on SST-2 (docs/benchmarks/sst2_smollm2_cpu_sweep.md),
            calibrated on 2 batches (``SparseConfig``: 8; 1, 2, 4 and 8 scored alike on held-out SST-2,
            docs/benchmarks/sst2_smollm2_calibration/); the defaults are listed, and tested, in
            docs/training.md ("Defaults").
        masks: a saved masks/diff file to train exactly those entries (instead of selecting).
        reselect_every / reselect_fraction: dynamic re-selection (sparse runs): every N steps each
            module swaps its smallest-|value| entries for the largest-|gradient| ones outside its
            mask, k fixed; ``reselect_fraction`` of k at the first re-selection, cosine-decayed to 0
            at the end (see ``sparseft.training.reselect``). 0 or None: off (the default).
        reselect_growth_batches: micro-batches whose summed dense gradient ranks the entries to grow
            (re-selection only): the step's own micro-batches first, then the next steps' in data
            order. 1 (the default): the step's first micro-batch. N costs N forward + backward passes
            per re-selection and, for N > 1, an fp32 buffer the size of the targeted weights while
            they run.
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
        quantize: ``int8``, ``int4``, ``nf4`` (torchao, ``pip install 'sparseft[quant]'``) or ``q4_1`` (GGUF's
            blocks): train over a weight-only quantized base (sparse runs). Entries are selected on the
            full-precision base, then its linear weights are quantized and the diff is fingerprinted against
            the quantized base (see ``sparseft.quantize``).
        quantize_init: with ``quantize``, where the values start: ``zero`` (the default) at 0; ``correction``
            at each selected entry's quantization error, so those entries begin at their full-precision
            weights (measured no better once trained, docs/training.md); ``correction-after`` at 0, with
            that error added when training ends, so the saved diff holds its entries at full precision
            plus what training added (not with ``reselect_every``). A resumed run takes its values from
            the checkpoint.
        select_over: with ``quantize``, where the entries are chosen: ``full`` (the default) over the
            full-precision weights, which are quantized after; ``quantized`` over the quantized base (its
            gradients, formed at each layer from its input and output gradient), so the full-precision
            weights are only loaded, never selected on.
        quantize_skip: with ``quantize``, patterns (``fnmatch``) of linear layers left in ``dtype``, e.g.
            ``["*.down_proj"]``: a mixed base, recorded with the diff; loading it needs
            ``quantize_base(model, scheme, skip=...)`` with the same patterns (Python only so far).
    """

    model: str = ""
    data: str = ""
    out: str = ""
    method: str = "sparse"
    # selection
    selection: SparseConfig = field(default_factory=lambda: SparseConfig(**TRAIN_SELECTION_DEFAULTS))
    masks: str | None = None
    reselect_every: int | None = None
    reselect_fraction: float = 0.1
    reselect_growth_batches: int = 1
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
    quantize_init: str = DEFAULT_QUANT_INIT
    select_over: str = DEFAULT_SELECT_OVER
    quantize_skip: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.selection, SparseConfig):
            raise ConfigError(f"selection must be a SparseConfig (or a mapping of its fields in from_dict), "
                              f"got {type(self.selection).__name__}")
        convert_fields(self)  # numbers from YAML may be strings (``lr: 1e-3``); store the declared types
        self.quantize_skip = skip_patterns(self.quantize_skip)
        self.selection = dataclasses.replace(self.selection, seed=self.seed)
        check_budget_request(self.selection.allocation, self.selection.num_params)  # before any model loads
        trainable = training_methods()
        checks = [
            (self.method in trainable, f"method must be one of {tuple(trainable)}, got {self.method!r}"),
            (self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps!r}"),
            (self.epochs > 0, f"epochs must be > 0, got {self.epochs!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}"),
            # A negative clipping norm flips the gradient's sign (training would climb the loss).
            (self.max_grad_norm is None or self.max_grad_norm > 0,
             f"max_grad_norm must be > 0 (or null: no clipping), got {self.max_grad_norm!r}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1] (the final lr as a share of lr), "
                                              f"got {self.min_lr_ratio!r}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size!r}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum!r}"),
            (self.max_length is None or self.max_length >= 2, f"max_length must be >= 2, got {self.max_length!r}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps!r}"),
            (0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}"),
            (self.save_every >= 0, f"save_every must be >= 0, got {self.save_every!r}"),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every!r}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank!r}"),
            (self.lora_alpha is None or self.lora_alpha > 0, f"lora_alpha must be > 0 (or null: 2 × rank), "
                                                             f"got {self.lora_alpha!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.check_reselection()
        if self.masks and not get_method(self.method).takes_masks:
            takers = [name for name in training_methods() if get_method(name).takes_masks]
            raise ConfigError(f"masks applies to {'/'.join(takers)} runs only (the entries to train), "
                              f"not method={self.method!r}")
        get_method(self.method).validate(self)
        if self.fsdp:
            check_fsdp_config(self.method, self.reselecting)
        check_quant_init(self.quantize_init, self.reselecting)
        check_select_over(self.select_over, self.quantize_init)
        if self.quantize is not None:
            self.check_quantize()
        else:
            self.check_no_quantize_knobs()

    def check_reselection(self) -> None:
        # Types are settled by convert_fields (an int or None, a float); only the ranges are checked here.
        every = self.reselect_every
        check_reselect_ranges(every, self.reselect_fraction, self.reselect_growth_batches)
        if every and not get_method(self.method).reselects:
            movers = [name for name in training_methods() if get_method(name).reselects]
            raise ConfigError(f"reselect_every applies to {'/'.join(movers)} runs only (it moves a sparse mask), "
                              f"not method={self.method!r}")

    def check_no_quantize_knobs(self) -> None:
        """The options that say how the base is quantized, given without quantize: refused rather than ignored."""
        knobs = [(self.select_over != DEFAULT_SELECT_OVER, f"select_over={self.select_over!r} chooses the entries "
                                                           "over a quantized base"),
                 (self.quantize_init != DEFAULT_QUANT_INIT, f"quantize_init={self.quantize_init!r} says where the "
                                                             "values over a quantized base start"),
                 (bool(self.quantize_skip), "quantize_skip names layers to leave unquantized")]
        for given, what in knobs:
            if given:
                raise ConfigError(f"{what}: it needs quantize (--quantize {'|'.join(QUANT_SCHEMES)})")

    def check_quantize(self) -> None:
        check_scheme(self.quantize)
        if not get_method(self.method).quantizes_base:
            able = [name for name in training_methods() if get_method(name).quantizes_base]
            raise ConfigError(f"quantize applies to {'/'.join(able)} runs only (a diff over the quantized base), "
                              f"not method={self.method!r}")
        if self.fsdp:
            raise ConfigError("quantize cannot be combined with fsdp: FSDP does not shard quantized weights here")

    @property
    def selects_over_quantized(self) -> bool:
        return bool(self.quantize) and self.select_over == "quantized"

    @property
    def reselecting(self) -> bool:
        return bool(self.reselect_every)

    # ------------------------------------------------------------ derived

    def sparse_config(self) -> SparseConfig:
        """The selection part of this run (what the diff records), a copy the caller may change."""
        return SparseConfig.from_dict(self.selection.to_dict())

    def provenance_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k not in LOCATION_FIELDS}

    # ------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict[str, Any]:
        """The flat form, as flags and YAML files spell it: the selection fields at the top level, in the
        order they always had (what train_config.yaml, provenance and checkpoints record)."""
        flat: dict[str, Any] = {}
        for name, value in dataclasses.asdict(self).items():
            if name == "selection":
                flat.update({k: value[k] for k in SELECTION_FIELDS})
            else:
                flat[name] = value
        return flat

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """A TrainConfig from its fields, the selection ones flat (``density: 0.05``), nested
        (``selection: {density: 0.05}``) or both (a field may not be given both ways)."""
        not_names = [k for k in data if not isinstance(k, str)]
        if not_names:
            raise ConfigError(f"field names must be strings, got {not_names[0]!r} ({type(not_names[0]).__name__})")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known - set(SELECTION_FIELDS))
        if unknown:
            raise ConfigError(f"unknown TrainConfig field(s) {unknown}; known fields: "
                              f"{sorted((known - {'selection'}) | set(SELECTION_FIELDS))} and 'selection'")
        data["selection"] = selection_config({k: data.pop(k) for k in SELECTION_FIELDS if k in data},
                                             data.get("selection"))
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
        data, text = read_yaml_file(path, ConfigError)
        data = data or {}
        # The selection fields may be given flat or under selection:; `-` in keys reads as `_`.
        lines = {str(k).replace("-", "_"): n for k, n in yaml_key_lines(text, nested=("selection",)).items()}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of TrainConfig fields, got {type(data).__name__}")
        given = {k.replace("-", "_"): v for k, v in overrides.items() if v is not None}
        nested = data.get("selection")
        if isinstance(nested, dict):  # a flag wins over the file's value, given flat or under selection
            data["selection"] = {k: v for k, v in nested.items() if str(k).replace("-", "_") not in given}
        data.update(given)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            # Every field check's message starts with the field's name (``scorer_weights.fisher ...`` for a part).
            name = str(e).split(" ", 1)[0].split(".", 1)[0]
            if name in lines and name not in given:
                raise ConfigError(f"{path}:line {lines[name]}: {e}") from e
            raise


def selection_config(flat: dict[str, Any], nested: Any) -> SparseConfig:
    """The run's SparseConfig from selection fields given flat and/or under ``selection:``."""
    if isinstance(nested, SparseConfig):
        nested = {k: v for k, v in nested.to_dict().items() if k != "seed"}
    if nested is None:
        nested = {}
    if not isinstance(nested, dict):
        raise ConfigError(f"selection must be a mapping of SparseConfig fields, got {type(nested).__name__}")
    nested = {str(k).replace("-", "_"): v for k, v in nested.items()}
    if "seed" in nested:
        raise ConfigError("selection.seed: give seed at the top level; it seeds selection, data order and "
                          "initialisation alike")
    both = sorted(set(flat) & set(nested))
    if both:
        raise ConfigError(f"{both[0]} is given both at the top level and under selection; give it once")
    values = {**TRAIN_SELECTION_DEFAULTS, **nested, **flat}
    if isinstance(values.get("target_modules"), str):
        values["target_modules"] = [t.strip() for t in values["target_modules"].split(",") if t.strip()]
    if isinstance(values.get("scorer_weights"), str):
        values["scorer_weights"] = parse_scorer_weights(values["scorer_weights"])
    if "scorer_weights" in values and not isinstance(values["scorer_weights"], dict):
        raise ConfigError(f"scorer_weights must be a mapping of scorer: weight (e.g. {{gradient: 0.5, fisher: 0.5}}), "
                          f"got {values['scorer_weights']!r}")
    return SparseConfig.from_dict(values)


def parse_scorer_weights(text: str) -> dict[str, float]:
    """``"gradient=0.5,fisher=0.5"`` -> ``{"gradient": 0.5, "fisher": 0.5}`` (the ``--scorer-weights`` syntax)."""
    weights: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"scorer_weights must be NAME=WEIGHT pairs separated by commas "
                              f"(e.g. gradient=0.5,fisher=0.5), got {text!r}")
        weights[name.strip()] = value.strip()
    return weights  # the weights become floats (or a ConfigError naming the part) in SparseConfig


def check_reselect_ranges(every: int | None, fraction: float, growth_batches: int = 1) -> None:
    """The ranges of the re-selection options (for TrainConfig and the Hugging Face SparseTrainer)."""
    if every is not None and every < 0:
        raise ConfigError(f"reselect_every must be a whole number of steps >= 0 (0 or null: off), got {every!r}")
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"reselect_fraction must be in (0, 1] (share of each module's k swapped at the first "
                          f"re-selection), got {fraction!r}")
    if growth_batches < 1:
        raise ConfigError(f"reselect_growth_batches must be a whole number of micro-batches >= 1, got {growth_batches!r}")
    if growth_batches != 1 and not every:
        raise ConfigError(f"reselect_growth_batches applies only with reselect_every (re-selection on); got "
                          f"{growth_batches} with re-selection off")
