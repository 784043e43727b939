"""BenchConfig: one YAML file that defines a side-by-side grid of fine-tuning runs.

Everything that must be equal for a fair comparison (model, task, data, seed, steps, batch size,
sequence length) is a grid-level field; a row may only choose its method and that method's own
knobs (scorer, density / budget, LoRA rank, learning rate), and the base it trains over (dtype;
quantize for sparse rows).

Example (``examples/bench/tiny.yaml`` is a complete one)::

    model: smollm2-135m
    task: sst2
    train_data: ${SPARSEFT_DATA}/sst2/train.tsv
    eval_data: ${SPARSEFT_DATA}/sst2/dev.tsv
    steps: 80
    density: 0.005
    runs:
      - {id: full, method: full, lr: 2.0e-5}
      - {id: lora-matched, method: lora, lora_rank: match, lr: 1.0e-3}
      - {id: sparse-random, method: sparse, scorer: random, lr: 2.0e-3}
      - {id: sparse-random-int8, method: sparse, scorer: random, lr: 2.0e-3, quantize: int8}
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import SEED_RANGE, finite_number, positive_int_or_none
from ..errors import ConfigError
from ..files import read_yaml_file, yaml_item_lines, yaml_key_lines
from ..hfdata import PREFIX as HF_PREFIX
from ..loading import check_device
from ..methods import METHODS, Method, get_method, training_methods
from ..quantize import (
    DEFAULT_QUANT_INIT, QUANT_SCHEMES, check_quant_init, check_select_over, require_torchao, skip_patterns,
)

BASE_ROW_ID = "base"
BASE_DTYPES = ("float32", "bfloat16")  # what a row's dtype may say (float16 trains poorly on CPU)
ROW_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class RunSpec:
    """One row of the grid: a method and its own knobs."""

    id: str
    method: str  # a registered method that trains (sparseft.methods); its knobs below, the others unset
    lr: float
    scorer: str | None = None  # sparse only
    density: float | None = None  # sparse only; defaults to the grid's density
    num_params: int | None = None  # sparse only; exact budget instead of a density
    lora_rank: int | str | None = None  # lora only: an int, or "match" (rank matching the sparse budget)
    calibration_batches: int | None = None  # sparse data scorers only
    allocation: str | None = None  # sparse only: how k splits over modules (TrainConfig's default when None)
    # sparse only: re-selection during training (TrainConfig's fields of these names; unset: off / defaults)
    reselect_every: int | None = None
    reselect_fraction: float | None = None
    reselect_growth_batches: int | None = None
    seed: int | None = None  # the grid's seed when None; the test stage of a protocol sets one per row
    # The base the row trains over, and is scored over: loaded in dtype (any method; float32 when None),
    # weight-only quantized as quantize says (sparse only). The base row stays the fp32 base.
    dtype: str | None = None
    quantize: str | None = None
    # With quantize: where the values start, "zero" (TrainConfig's default, and how rows ran before
    # TrainConfig.quantize_init existed: such a row keeps its earlier worker spec for --resume), "correction"
    # or "correction-after".
    quantize_init: str | None = None
    # With quantize: where the entries are chosen, TrainConfig's default "full" (when None) or "quantized".
    select_over: str | None = None
    # With quantize: fnmatch patterns of linear layers left unquantized (a mixed base; TrainConfig.quantize_skip).
    quantize_skip: list[str] | None = None
    validation_every: int | None = None  # the grid's validation_every when None (any training method)
    curve_limit: int | None = None  # the grid's curve_limit when None
    # Any training method: the share of the steps the learning rate warms up over linearly before its cosine
    # decay (TrainConfig.warmup_ratio; TrainConfig's default, no warm-up, when None).
    warmup_ratio: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class BenchConfig:
    """The grid: shared model, data and schedule, plus the rows to compare."""

    model: str | dict[str, Any]
    task: str
    train_data: str
    eval_data: str
    runs: list[RunSpec]
    name: str = "bench"
    # The task that reads eval_data when it differs from the training one, e.g. SQuAD split by article:
    # train with squad-train, evaluate with squad-heldout (the same file, other articles).
    eval_task: str | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    steps: int = 50
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 64
    seed: int = 0
    density: float = 0.005
    target_modules: list[str] | None = None
    eval_base: bool = True
    threads: int | None = None
    device: str = "auto"
    row_timeout_s: float = 3600.0
    # The protocol (``sparseft bench --stage validation|test``, see bench/protocol.py): learning rates are
    # chosen on the validation split, disjoint from both the training rows and the scored eval split, and
    # the chosen row of each method then runs with every seed of ``seeds`` on the eval (test) split.
    validation_task: str | None = None
    validation_data: str | None = None
    validation_limit: int | None = None
    seeds: list[int] | None = None
    # The validation curve: in the validation stage each row also scores the model being trained on the
    # first ``curve_limit`` validation examples (default: validation_limit) every ``validation_every``
    # steps and at its last step, so a report can tell whether ``steps`` was long enough. Off when None.
    validation_every: int | None = None
    curve_limit: int | None = None
    source: str = ""  # the YAML file this came from (filled by load_bench_config)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def evaluated_task(self) -> str:
        return self.eval_task or self.task

    def row_ids(self) -> list[str]:
        return ([BASE_ROW_ID] if self.eval_base else []) + [r.id for r in self.runs]

    @property
    def scores_validation_split(self) -> bool:
        """Whether the rows are scored on the validation split (the protocol's validation stage)."""
        return self.validation_task is not None and (self.evaluated_task, self.eval_data) == (
            self.validation_task, self.validation_data)


def row_curve(cfg: BenchConfig, run: RunSpec | None) -> dict[str, int | None] | None:
    """``{"every": N, "limit": M}``: the validation curve a row records, or None (no curve).

    Only where the rows are scored on the validation split: a curve scored on the test split would let
    the test examples decide how long to train. ``limit`` None means every example of the split.
    """
    if run is None or not cfg.scores_validation_split:
        return None
    every = run.validation_every or cfg.validation_every
    if every is None:
        return None
    return {"every": every, "limit": run.curve_limit or cfg.curve_limit or cfg.eval_limit}


def only_rows(cfg: BenchConfig, row_ids: list[str]) -> BenchConfig:
    """``cfg`` with just the rows named (``base`` for the base model's evaluation), in the config's order."""
    unknown = sorted(set(row_ids) - set(cfg.row_ids()) - {BASE_ROW_ID})
    if unknown:
        raise ConfigError(f"{cfg.source}: no row {', '.join(map(repr, unknown))}; rows: {', '.join(cfg.row_ids())}")
    return dataclasses.replace(cfg, runs=[r for r in cfg.runs if r.id in row_ids], eval_base=BASE_ROW_ID in row_ids)


def load_bench_config(path: str | os.PathLike, data_root: str | None = None) -> BenchConfig:
    """Read and validate a bench YAML file.

    Relative paths resolve against the file's folder; ``${SPARSEFT_DATA}`` expands to ``data_root``,
    else the environment variable of that name, else ``../shared/data`` next to the working
    directory (where this project's shared evaluation data sits).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: bench config not found")
    raw, text = read_yaml_file(path, ConfigError)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of bench fields, got {type(raw).__name__}")
    try:
        return parse_bench_config(raw, where=str(path), base_dir=path.parent, data_root=data_root)
    except ConfigError as e:
        # A message about a top-level field starts with its name (``model.tiny ...`` for a part), one about
        # a row with ``runs[i]``: point at its line, as a train config does (``FILE:line N: <field> ...``).
        rest = str(e).removeprefix(f"{path}: ")
        name = rest.split(" ", 1)[0].split(".", 1)[0]
        row = re.match(r"runs\[(\d+)\]", rest)
        if row:
            items = yaml_item_lines(text, "runs")
            line = items[int(row[1])] if int(row[1]) < len(items) else None
        else:
            line = yaml_key_lines(text).get(name)
        if line is None or rest == str(e):
            raise
        raise ConfigError(f"{path}:line {line}: {rest}") from None


def parse_bench_config(
    raw: dict[str, Any], where: str = "<bench config>", base_dir: Path | None = None, data_root: str | None = None
) -> BenchConfig:
    known = {f.name for f in dataclasses.fields(BenchConfig)} - {"source"}
    unknown = sorted(set(raw) - known, key=str)  # YAML keys need not be strings (`1: 2`)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
    for required in ("model", "task", "train_data", "eval_data", "runs"):
        if required not in raw:
            raise ConfigError(f"{where}: missing required field {required!r}")
    fields = dict(raw)
    for key in ("task", "eval_task", "validation_task", "train_data", "eval_data", "validation_data"):
        if fields.get(key) is not None and (not isinstance(fields[key], str) or not fields[key].strip()):
            raise ConfigError(f"{where}: {key} must be a name or path (a non-empty string), got {fields[key]!r}")
    # A data root is the user's, given from where they stand: relative to the working directory, not the file.
    root = str(Path(data_root or os.environ.get("SPARSEFT_DATA") or "../shared/data").expanduser().absolute())
    for key in ("train_data", "eval_data"):  # hf:NAME[:CONFIG]:SPLIT names a Hugging Face dataset, not a path
        value = str(fields[key])
        fields[key] = value if value.startswith(HF_PREFIX) else resolve_path(value, base_dir, root)
    from ..tasks.taskfile import looks_like_task_file

    for key in ("task", "eval_task", "validation_task"):  # a task file, like the data, is found next to the config
        if isinstance(fields.get(key), str) and looks_like_task_file(fields[key]):
            fields[key] = resolve_path(fields[key], base_dir, root)
    if fields.get("validation_data") is not None:
        fields["validation_data"] = resolve_path(str(fields["validation_data"]), base_dir, root)
    if isinstance(fields["model"], str) and fields["model"].startswith((".", "$")):
        fields["model"] = resolve_path(fields["model"], base_dir, root)
    runs, origins = expand_lr_grids(fields["runs"], where)
    fields["runs"] = parse_runs(runs, where, origins)
    cfg = BenchConfig(**fields, source=where)
    check_field_types(cfg, where)
    check_grid_values(cfg, where)
    check_protocol_values(cfg, where)
    check_curve_values(cfg, where, origins)
    return cfg


def lr_row_id(row_id: str, lr: float) -> str:
    """The id of one point of a row's lr grid, e.g. ``sparse-combined-lr0.001``."""
    return f"{row_id}-lr{lr:g}"


def expand_lr_grids(raw_runs: Any, where: str) -> tuple[Any, list[int]]:
    """A row whose ``lr`` is a list becomes one row per learning rate (ids from ``lr_row_id``); with the
    rows, the index of the ``runs`` item each came from, which an error about the row names."""
    if not isinstance(raw_runs, list):
        return raw_runs, []
    expanded, origins = [], []
    for i, item in enumerate(raw_runs):
        # A row without a string id stays as it is, so parse_runs refuses it ("missing required field 'id'")
        # rather than running it as "None-lr0.001".
        if not (isinstance(item, dict) and isinstance(item.get("lr"), list) and isinstance(item.get("id"), str)):
            expanded.append(item)
            origins.append(i)
            continue
        if not item["lr"] or not all(finite_number(lr) and lr > 0 for lr in item["lr"]):
            raise ConfigError(f"{where}: runs[{i}] ({item.get('id')}): an lr grid must be a non-empty list of "
                              f"positive numbers, got {item['lr']!r}")
        expanded += [{**item, "id": lr_row_id(str(item.get("id")), float(lr)), "lr": float(lr)} for lr in item["lr"]]
        origins += [i] * len(item["lr"])
    return expanded, origins


def check_protocol_values(cfg: BenchConfig, where: str) -> None:
    """The validation split and seeds, when given (both are needed for ``--stage``)."""
    from ..tasks import get_task

    if (cfg.validation_task is None) != (cfg.validation_data is None):
        raise ConfigError(f"{where}: validation_task and validation_data go together (the validation split)")
    if cfg.validation_task is not None:
        try:
            validation = get_task(cfg.validation_task)
        except ConfigError as e:
            raise ConfigError(f"{where}: validation_task: {e}") from None
        if validation.family != get_task(cfg.task).family:
            raise ConfigError(f"{where}: validation_task {cfg.validation_task!r} is a {validation.family} task but "
                              f"task {cfg.task!r} is {get_task(cfg.task).family}")
        if (cfg.validation_task, cfg.validation_data) in ((cfg.evaluated_task, cfg.eval_data), (cfg.task, cfg.train_data)):
            raise ConfigError(f"{where}: the validation split ({cfg.validation_task} on {cfg.validation_data}) must "
                              "differ from the training rows and the scored eval split")
        if not Path(cfg.validation_data).exists():
            raise ConfigError(f"{where}: validation_data {cfg.validation_data} does not exist")
    if not positive_int_or_none(cfg.validation_limit):
        raise ConfigError(f"{where}: validation_limit must be a positive integer or absent, got {cfg.validation_limit!r}")
    if cfg.seeds is not None:
        seeds = cfg.seeds
        if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
            raise ConfigError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"{where}: seeds repeat a seed: {seeds!r}")


def check_curve_values(cfg: BenchConfig, where: str, origins: list[int]) -> None:
    """validation_every / curve_limit, at the top and on each row: positive integers, a curve only with a
    validation split to score it on, at most ``steps`` apart and no more examples than the validation."""
    places = [(where, cfg)] + [(f"{where}: runs[{i}] ({run.id})", run) for i, run in zip(origins, cfg.runs)]
    for at, holder in places:
        for key in ("validation_every", "curve_limit"):
            if not positive_int_or_none(getattr(holder, key)):
                raise ConfigError(f"{at}: {key} must be a positive integer or absent, got {getattr(holder, key)!r}")
    curved = cfg.validation_every is not None or any(run.validation_every for run in cfg.runs)
    for at, holder in places:
        if holder.validation_every is not None and cfg.validation_task is None:
            raise ConfigError(f"{at}: validation_every needs the validation split (validation_task and "
                              "validation_data): the curve is scored on it")
        if holder.validation_every is not None and holder.validation_every > cfg.steps:
            raise ConfigError(f"{at}: validation_every ({holder.validation_every}) is more than steps ({cfg.steps}): "
                              "the curve would have its last step only")
        # A row's curve_limit needs that row's curve; the grid's, some row's.
        has_curve = curved if holder is cfg else (holder.validation_every or cfg.validation_every) is not None
        if holder.curve_limit is not None and not has_curve:
            raise ConfigError(f"{at}: curve_limit without validation_every: there is no curve to limit")
        if holder.curve_limit is not None and holder.curve_limit > (cfg.validation_limit or holder.curve_limit):
            raise ConfigError(f"{at}: curve_limit ({holder.curve_limit}) is more than validation_limit "
                              f"({cfg.validation_limit}): a curve point scores at most the examples a row is scored on")


def resolve_path(value: str, base_dir: Path | None, data_root: str) -> str:
    value = value.replace("${SPARSEFT_DATA}", data_root).replace("$SPARSEFT_DATA", data_root)
    p = Path(os.path.expandvars(value)).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p.resolve()) if p.exists() else str(p)


def parse_runs(raw_runs: Any, where: str, origins: list[int] | None = None) -> list[RunSpec]:
    """The rows as RunSpecs, each checked; ``origins[i]``: the ``runs`` item row ``i`` came from (default: i)."""
    if not isinstance(raw_runs, list) or not raw_runs:
        raise ConfigError(f"{where}: 'runs' must be a non-empty list of rows")
    known = {f.name for f in dataclasses.fields(RunSpec)}
    runs, seen = [], {BASE_ROW_ID}
    for item, origin in zip(raw_runs, origins or range(len(raw_runs))):
        at = f"{where}: runs[{origin}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: expected a mapping, got {type(item).__name__}")
        unknown = sorted(set(item) - known, key=str)
        if unknown:
            raise ConfigError(f"{at}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        for required in ("id", "method", "lr"):
            if required not in item:
                raise ConfigError(f"{at}: missing required field {required!r}")
        run = RunSpec(**item)
        check_run(run, at)
        if run.id in seen:
            raise ConfigError(f"{at}: row id {run.id!r} is used twice (or is the reserved {BASE_ROW_ID!r})")
        seen.add(run.id)
        runs.append(run)
    return runs


def check_run(run: RunSpec, at: str) -> None:
    if not isinstance(run.id, str) or not ROW_ID_PATTERN.match(run.id):
        raise ConfigError(f"{at}: id {run.id!r} must be letters, digits, '-', '_' or '.'")
    if not isinstance(run.method, str) or run.method not in training_methods():
        raise ConfigError(f"{at} ({run.id}): method must be one of {tuple(training_methods())}, got {run.method!r}")
    if not finite_number(run.lr) or run.lr <= 0:
        raise ConfigError(f"{at} ({run.id}): lr must be a positive finite number, got {run.lr!r}")
    if run.seed is not None and (not isinstance(run.seed, int) or isinstance(run.seed, bool)):
        raise ConfigError(f"{at} ({run.id}): seed must be an integer, got {run.seed!r}")
    if run.seed is not None:  # as the grid's seed: before any row, not in this row's worker
        check_seed_range(run.seed, f"{at} ({run.id})")
    if run.warmup_ratio is not None and not (finite_number(run.warmup_ratio) and 0 <= run.warmup_ratio < 1):
        raise ConfigError(f"{at} ({run.id}): warmup_ratio must be a number in [0, 1) (the share of the steps the "
                          f"learning rate warms up over), got {run.warmup_ratio!r}")
    method = get_method(run.method)
    for knob in KNOBS:
        if getattr(run, knob) is not None and knob not in method.run_knobs:
            users = [m.name for m in METHODS.values() if knob in m.run_knobs]
            raise ConfigError(f"{at} ({run.id}): {knob} applies to {'/'.join(users)} rows only")
    check_base_weights(run, method, at)
    method.check_run(run, at)


def check_base_weights(run: RunSpec, method: Method, at: str) -> None:
    """A row's ``dtype`` (any method) and ``quantize`` (methods that train over a quantized base)."""
    if run.dtype is not None and run.dtype not in BASE_DTYPES:
        raise ConfigError(f"{at} ({run.id}): dtype must be one of {BASE_DTYPES}, got {run.dtype!r}")
    if run.quantize is None:
        for knob in ("quantize_init", "select_over", "quantize_skip"):
            if getattr(run, knob) is not None:
                raise ConfigError(f"{at} ({run.id}): {knob} applies to rows with quantize (a diff over a "
                                  f"quantized base)")
        return
    try:  # the checks TrainConfig makes, before any row runs
        init = run.quantize_init or DEFAULT_QUANT_INIT
        check_quant_init(init, bool(run.reselect_every))
        if run.select_over is not None:
            check_select_over(run.select_over, init)
        if run.quantize_skip is not None:
            run.quantize_skip = skip_patterns(run.quantize_skip) or None  # [] is unset: specs stay equal (--resume)
    except ConfigError as e:
        raise ConfigError(f"{at} ({run.id}): {e}") from None
    if not method.quantizes_base:
        able = [name for name in training_methods() if get_method(name).quantizes_base]
        raise ConfigError(f"{at} ({run.id}): quantize applies to {'/'.join(able)} rows only (a diff over the "
                          f"quantized base), not method {run.method!r}")
    if run.quantize not in QUANT_SCHEMES:
        raise ConfigError(f"{at} ({run.id}): quantize must be one of {QUANT_SCHEMES}, got {run.quantize!r}")
    try:
        require_torchao(run.quantize)  # torchao is missing: say so now, not after the rows before this one ran
    except ConfigError as e:
        raise ConfigError(f"{at} ({run.id}): {e}") from None


# The RunSpec fields that belong to some method (the rest, id / method / lr / seed / dtype, every row has;
# quantize, which follows Method.quantizes_base, is checked by check_base_weights).
KNOBS = ("scorer", "density", "num_params", "lora_rank", "calibration_batches", "allocation", "reselect_every",
         "reselect_fraction", "reselect_growth_batches")
# Knobs added after grids were first run: a row's worker spec leaves them out when unset, so --resume
# still finds its earlier rows equal.
LATER_KNOBS = ("reselect_every", "reselect_fraction", "reselect_growth_batches", "select_over", "quantize_skip",
               "allocation", "warmup_ratio")
# Where the values of a quantized row started before quantize_init existed: its worker spec has no such key.
QUANT_INIT_BEFORE_OPTION = "zero"


def check_seed_range(seed: int, at: str) -> None:
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise ConfigError(f"{at}: seed {seed} is outside [{SEED_RANGE[0]}, {SEED_RANGE[1]}] "
                          "(what torch.manual_seed takes)")


def check_field_types(cfg: BenchConfig, where: str) -> None:
    """The grid fields no other check looks at: seed, threads, row_timeout_s, eval_base, target_modules,
    and the grid's name, which names the default output folder."""
    if not isinstance(cfg.name, str) or not ROW_ID_PATTERN.match(cfg.name):
        raise ConfigError(f"{where}: name {cfg.name!r} must be letters, digits, '-', '_' or '.' (it names the "
                          "output folder runs/bench-<name>)")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise ConfigError(f"{where}: seed must be an integer, got {cfg.seed!r}")
    seeds = cfg.seeds if isinstance(cfg.seeds, list) else []  # their types are checked with the protocol's fields
    for seed in [cfg.seed, *(x for x in seeds if isinstance(x, int))]:
        check_seed_range(seed, where)
    if not positive_int_or_none(cfg.threads):
        raise ConfigError(f"{where}: threads must be a positive integer or absent, got {cfg.threads!r}")
    if not finite_number(cfg.row_timeout_s) or cfg.row_timeout_s <= 0:
        raise ConfigError(f"{where}: row_timeout_s must be a positive number of seconds, got {cfg.row_timeout_s!r}")
    if not isinstance(cfg.eval_base, bool):
        raise ConfigError(f"{where}: eval_base must be true or false, got {cfg.eval_base!r}")
    modules = cfg.target_modules
    if modules is not None and (not isinstance(modules, list) or not modules
                                or not all(isinstance(m, str) and m.strip() for m in modules)):
        raise ConfigError(f"{where}: target_modules must be a non-empty list of module names, got {modules!r}")


def check_grid_values(cfg: BenchConfig, where: str) -> None:
    for name in ("steps", "batch_size", "grad_accum", "max_length"):
        value = getattr(cfg, name)
        if value is None or not positive_int_or_none(value):
            raise ConfigError(f"{where}: {name} must be a positive integer, got {value!r}")
    for name in ("train_limit", "eval_limit"):
        value = getattr(cfg, name)
        if not positive_int_or_none(value):
            raise ConfigError(f"{where}: {name} must be a positive integer or absent, got {value!r}")
    if not finite_number(cfg.density) or not 0 < cfg.density <= 1:
        raise ConfigError(f"{where}: density must be in (0, 1], got {cfg.density!r}")
    cfg.device = check_device(cfg.device, f"{where}: device")  # before any row starts, not in each worker
    check_tasks(cfg, where)
    if not isinstance(cfg.model, (str, dict)):
        raise ConfigError(f"{where}: model must be an alias/path or a mapping {{tiny: {{...}}}}")
    if isinstance(cfg.model, dict) and set(cfg.model) != {"tiny"}:
        raise ConfigError(f"{where}: a model mapping must have the single key 'tiny' (a tiny random model)")
    if isinstance(cfg.model, dict):
        check_tiny_shape(cfg.model["tiny"], where)
    for key in ("train_data", "eval_data"):
        if not getattr(cfg, key).startswith(HF_PREFIX) and not Path(getattr(cfg, key)).exists():
            raise ConfigError(f"{where}: {key} {getattr(cfg, key)} does not exist (set SPARSEFT_DATA or --data-root?)")


# What `model: {tiny: {...}}` may set: the sizes of the tiny Llama (its vocabulary comes from the task's text).
TINY_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "max_position_embeddings")


def check_tiny_shape(shape: Any, where: str) -> None:
    """``model: {tiny: {hidden_size: 32, ...}}``: known sizes, positive integers, a Llama that can be built."""
    from .shapes import SHAPES, llama_config

    at = f"{where}: model.tiny"
    if shape is None:
        return
    if not isinstance(shape, dict):
        raise ConfigError(f"{at} must be a mapping of sizes like {{hidden_size: 32}}, got {shape!r}")
    known = (*TINY_SIZES, "tie_word_embeddings")
    unknown = sorted(set(shape) - set(known), key=str)
    if unknown:
        raise ConfigError(f"{at}: unknown field(s) {unknown}; known fields: {list(known)}")
    for key, value in shape.items():
        if key in TINY_SIZES and (value is None or not positive_int_or_none(value)):
            raise ConfigError(f"{at}.{key} must be a positive integer, got {value!r}")
        if key == "tie_word_embeddings" and not isinstance(value, bool):
            raise ConfigError(f"{at}.{key} must be true or false, got {value!r}")
    try:
        llama_config("tiny", **shape)
    except Exception as e:  # the config's own consistency checks (e.g. heads that do not divide hidden_size)
        raise ConfigError(f"{at}: not a shape a Llama can have ({' '.join(str(e).split())})") from None
    check_tiny_fits(at, {**SHAPES["tiny"], **shape})


def check_tiny_fits(at: str, values: dict[str, Any]) -> None:
    """A random-init tiny model is built whole in fp32 in every row: refuse one whose weights alone
    exceed this machine's memory, before the first row starts building it."""
    from .shapes import parameter_count

    params = parameter_count(values)
    memory = machine_memory_bytes()
    if memory is not None and 4 * params > memory:
        raise ConfigError(f"{at}: these sizes make a {params / 1e9:.1f}B-parameter model, {4 * params / 2**30:.0f} GiB "
                          f"in fp32 before any training state, more than this machine's {memory / 2**30:.0f} GiB; "
                          "a tiny model is for quick grids (for a real one, give model a directory or alias)")


def machine_memory_bytes() -> int | None:
    """Physical memory, where the OS says (Linux, macOS); None elsewhere."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_tasks(cfg: BenchConfig, where: str) -> None:
    """Known task names; a separate eval task must score the same kind of output the rows learn."""
    from ..tasks import get_task

    try:
        train, evaluated = get_task(cfg.task), get_task(cfg.evaluated_task)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    if train.family != evaluated.family:
        raise ConfigError(f"{where}: eval_task {cfg.eval_task!r} is a {evaluated.family} task but task "
                          f"{cfg.task!r} is {train.family}; the rows would be scored on a task they did not learn")
