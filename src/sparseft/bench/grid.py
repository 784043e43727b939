"""The benchmark grid: every row of a BenchConfig run side by side on one machine → results.json.

Each row runs in a fresh Python process (``sparseft.bench.worker``) so its peak memory is its own
and a crash or timeout in one row is recorded in that row instead of ending the grid. results.json
and results.md are rewritten after every row, so nothing finished is lost if the grid is killed.

Example:
    >>> from sparseft.bench import load_bench_config, run_grid
    >>> results = run_grid(load_bench_config("examples/bench/tiny.yaml"), "runs/bench-tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..atomic import check_dir_to_write_into, check_not_an_input
from ..errors import ConfigError
from ..methods import get_method
from ..quantize import DEFAULT_QUANT_INIT
from .config import BASE_ROW_ID, LATER_KNOBS, QUANT_INIT_BEFORE_OPTION, BenchConfig, RunSpec, row_curve
from .results import MACHINE_KEYS, SCHEMA_VERSION, results_markdown, row_machine, write_results

RESULTS_NAME = "results.json"
MARKDOWN_NAME = "results.md"
TRAIN_FILE_NAME = "train.jsonl"
LOG_TAIL_CHARS = 2000


def run_grid(
    cfg: BenchConfig, out: str | os.PathLike, command: str = "", plots: bool = True,
    resume: bool = False, overwrite: bool = False, protocol: dict[str, Any] | None = None, any_machine: bool = False,
) -> dict[str, Any]:
    """Run every row of ``cfg`` into ``out``; returns the results (also in ``out/results.json``).

    With ``resume``, rows that finished ``ok`` in ``out`` by an earlier run of the same job (same spec,
    same training file, same machine) are kept as they are and only the others run; ``any_machine`` also
    keeps those measured on another machine (a grid spread over sessions on a pool of machines): every row
    records its machine, so times are compared within one (``row_machines``). Results already in
    ``out`` are otherwise refused unless ``overwrite``: hours of measurement are not lost to a typo.
    ``protocol`` is stored as the results' ``protocol`` field (the stage of ``bench.protocol``).
    """
    out = check_grid_out(cfg, out)
    if not (resume or overwrite) and (out / RESULTS_NAME).is_file():
        raise ConfigError(f"{out / RESULTS_NAME} holds an earlier run: --resume keeps its finished rows, "
                          "--overwrite starts over, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    earlier = read_earlier_run(cfg, out, any_machine) if resume else None
    model = prepare_model(cfg, out)
    train_file, train_rows, skipped = prepare_train_file(cfg, model, out / TRAIN_FILE_NAME, keep_same=resume)
    results = new_results(cfg, command, model, len(train_rows), skipped)
    if protocol is not None:
        results["protocol"] = protocol  # which stage of the protocol this is, and what it chose (bench/protocol.py)
    kept = {}
    if earlier is not None:
        kept = reusable_rows(cfg, earlier, model, train_file, out)
        for row in kept.values():  # rows from before rows recorded their machine ran on the earlier run's
            row.setdefault("machine", row_machine(earlier.get("machine", {})))
        results["started_at"] = earlier["started_at"]
        results["resumed_at"] = earlier.get("resumed_at", []) + [now()]
    # One slot per row in the config's order, the kept rows in theirs from the start: every save holds them,
    # so a resumed run killed during its first row loses none of the earlier run's rows.
    slots = {row_id_of(spec): kept.get(row_id_of(spec)) for spec in row_specs(cfg)}
    save_rows(results, slots, out)
    for spec in row_specs(cfg):
        row_id = row_id_of(spec)
        if row_id in kept:
            print(f"[bench] row {row_id}: kept from the earlier run (ok)", flush=True)
        else:
            slots[row_id] = run_row(cfg, spec, model, train_file, out)
        fill_model_size(results, slots[row_id])
        save_rows(results, slots, out)
    results["finished_at"] = now()
    save(results, out)
    if plots:
        from .plots import write_plots

        results["plots"] = [str(p.relative_to(out)) for p in write_plots(results, out)]
        save(results, out)
    return results


def check_grid_out(cfg: BenchConfig, out: str | os.PathLike) -> Path:
    """``out`` when the grid may write its files into it: a directory (or a path where one can be made) in
    which none of them would replace one of the config's inputs. ``--out data/`` had replaced the user's
    data/train.jsonl with the rendered training rows."""
    out = check_dir_to_write_into(out, "--out")
    inputs = [cfg.train_data, cfg.eval_data, cfg.validation_data, cfg.source]
    for name in (TRAIN_FILE_NAME, RESULTS_NAME, MARKDOWN_NAME):
        check_not_an_input(out / name, inputs, "--out")
    return out


def save_rows(results: dict[str, Any], slots: dict[str, dict[str, Any] | None], out: Path) -> None:
    """Save ``results`` with the rows finished so far (this run's and the kept ones), in the config's order."""
    results["rows"] = [row for row in slots.values() if row is not None]
    save(results, out)


def read_earlier_run(cfg: BenchConfig, out: Path, any_machine: bool = False) -> dict[str, Any]:
    """The results.json a resumed grid continues; it must come from this machine (times are compared), unless
    ``any_machine``."""
    from .results import read_results

    path = out / RESULTS_NAME
    if not path.is_file():
        raise ConfigError(f"--resume: {path} does not exist; nothing to resume (run without --resume)")
    earlier = read_results(path)
    if any_machine:
        return earlier
    here = row_machine(machine_info(cfg))
    # The grid's machine, and each row's: an earlier --any-machine resume may have kept rows of another one.
    for before in [earlier.get("machine", {})] + [row["machine"] for row in earlier["rows"] if row.get("machine")]:
        differs = [key for key in MACHINE_KEYS if before.get(key) != here[key]]
        if differs:
            key = differs[0]
            raise ConfigError(f"--resume: {path} was measured on another machine ({key} {before.get(key)!r}, "
                              f"here {here[key]!r}); its times would not compare with new rows. Use a new --out, "
                              "or --any-machine to keep its rows (their scores stand; each row records its machine)")
    return earlier


def reusable_rows(cfg: BenchConfig, earlier: dict[str, Any], model: str, train_file: Path, out: Path) -> dict[str, Any]:
    """Earlier ``ok`` rows whose worker spec equals what this config would run now, by row id; says on
    stdout why each other ``ok`` row of this config runs again (a resume that quietly redoes hours of rows
    hides a misplaced folder or a changed config)."""
    specs = {row_id_of(spec): spec for spec in row_specs(cfg)}
    kept = {}
    for row in earlier.get("rows", []):
        if row.get("status") != "ok" or row["id"] not in specs:
            continue
        spec_path = out / "runs" / row["id"] / "spec.json"
        why = rerun_reason(spec_path, worker_spec(cfg, specs[row["id"]], model, train_file, spec_path.parent))
        if why is None:
            kept[row["id"]] = row
        else:
            print(f"[bench] row {row['id']}: runs again: {why}", flush=True)
    return kept


def rerun_reason(spec_path: Path, wanted: dict[str, Any]) -> str | None:
    """Why the earlier row whose worker spec is at ``spec_path`` cannot be kept; None when it can."""
    if not spec_path.is_file():
        return f"its worker spec {spec_path} is missing (it says what the row ran)"
    earlier = json.loads(spec_path.read_text())
    if same_job(earlier, wanted):
        return None
    differs = [key for key in differing_keys(earlier, wanted) if key not in SPEC_LOCATIONS]
    return f"{spec_path} differs from what this config runs now (in {', '.join(differs)})"


def differing_keys(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys where ``a`` and ``b`` differ, nested dicts followed (``run.lr``)."""
    keys = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            keys += differing_keys(x, y, f"{prefix}{key}.")
        elif x != y:
            keys.append(prefix + key)
    return keys


# Where a worker spec's files are: they differ between two runs of one job reached from other folders.
SPEC_LOCATIONS = ("row_dir", "result_path", "train_file")


def same_job(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal worker specs up to where the folder was reached from (a relative or absolute --out) and where
    the eval data lies: the same content (specs since ``eval_data_sha256``), else the same normalized path
    (``../shared/data`` from one folder and ``/work/shared/data`` name one file)."""
    paths = SPEC_LOCATIONS + ("eval_data", "eval_data_sha256")
    if {k: v for k, v in a.items() if k not in paths} != {k: v for k, v in b.items() if k not in paths}:
        return False
    if a.get("eval_data_sha256") and b.get("eval_data_sha256"):
        return a["eval_data_sha256"] == b["eval_data_sha256"]
    return os.path.normpath(str(a.get("eval_data"))) == os.path.normpath(str(b.get("eval_data")))


@functools.lru_cache(maxsize=8)
def eval_data_sha256(path: str) -> str:
    from ..training.data import data_sha256

    return data_sha256(path)


def save(results: dict[str, Any], out: Path) -> None:
    write_results(results, out / RESULTS_NAME)
    (out / MARKDOWN_NAME).write_text(results_markdown(results))


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- shared inputs


def prepare_train_file(
    cfg: BenchConfig, model: str, path: Path, keep_same: bool = False
) -> tuple[Path, list[dict[str, Any]], int]:
    """The task's training rows, rendered with the model's tokenizer (its chat template, as evaluation
    does), written once as JSON Lines so every row trains on the same bytes.

    Rows longer than ``max_length`` tokens are skipped (truncating would cut off the answer), taking the
    next rows of the file instead until ``train_limit`` rows are kept; the count skipped is returned.
    With ``keep_same`` (a resumed grid) an existing file must come out byte for byte the same.
    """
    from ..loading import load_tokenizer
    from ..tasks import get_task
    from ..training.data import Row, encode_row

    tokenizer, task = load_tokenizer(model), get_task(cfg.task)
    candidates = task.training_rows(cfg.train_data, None if cfg.train_limit is None else 4 * cfg.train_limit, tokenizer)
    if cfg.train_limit is not None and len(candidates) == 4 * cfg.train_limit:
        candidates = task.training_rows(cfg.train_data, None, tokenizer)  # many too long: look further
    kept, skipped = [], 0
    for number, row in enumerate(candidates, start=1):
        example = encode_row(Row(f"{cfg.train_data} example {number}", dict(row)), tokenizer, None, False)
        if len(example.input_ids) > cfg.max_length:
            skipped += 1
            continue
        kept.append(dict(row))
        if len(kept) == cfg.train_limit:
            break
    if not kept:
        raise ConfigError(f"{cfg.source}: no training row of {cfg.train_data} fits max_length={cfg.max_length} tokens")
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if keep_same and path.is_file() and path.read_text() != text:
        raise ConfigError(f"--resume: the training rows differ from {path} of the earlier run (data, limits or "
                          "tokenizer changed); its rows cannot be compared with new ones. Use a new --out.")
    path.write_text(text)
    return path, kept, skipped


def prepare_model(cfg: BenchConfig, out: Path) -> str:
    """The model every row loads: an alias/path as given, or a tiny random model built into ``out``
    whose vocabulary covers the task's prompts, labels and evaluation text."""
    if isinstance(cfg.model, str):
        return cfg.model
    from ..tasks import get_task
    from .shapes import build_tiny_model_dir

    task, eval_task = get_task(cfg.task), get_task(cfg.evaluated_task)
    texts = [v for row in task.training_rows(cfg.train_data, cfg.train_limit) for v in row.values()]
    texts += [eval_task.prompt(None, r) + " " + eval_task.target(r) for r in eval_task.load(cfg.eval_data, cfg.eval_limit)]
    shape = cfg.model.get("tiny") or {}
    return str(build_tiny_model_dir(out / "tiny-model", texts, shape=shape, seed=cfg.seed))


def new_results(cfg: BenchConfig, command: str, model: str, num_train_rows: int, skipped: int) -> dict[str, Any]:
    from ..tasks import get_task

    return {
        "schema_version": SCHEMA_VERSION,
        "name": cfg.name,
        "command": command,
        "config": {**cfg.to_dict(), "train_rows_used": num_train_rows, "train_rows_skipped_too_long": skipped},
        "machine": machine_info(cfg),
        "model": {"name": model if isinstance(cfg.model, str) else "tiny random Llama (built on the fly)",
                  "path": model, "total_params": None},
        "task": {"name": cfg.task, "eval_task": cfg.evaluated_task,
                 "primary_metric": get_task(cfg.evaluated_task).primary_metric},
        "started_at": now(),
        "finished_at": None,
        "rows": [],
    }


def fill_model_size(results: dict[str, Any], row: dict[str, Any]) -> None:
    """Facts known only once a row ran: the model's size and the task's headline metric."""
    if results["model"]["total_params"] is None and row.get("total_params"):
        results["model"]["total_params"] = row["total_params"]
    if results["task"]["primary_metric"] is None and row.get("primary_metric"):
        results["task"]["primary_metric"] = row["primary_metric"]


def machine_info(cfg: BenchConfig) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    return {
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name(0) if cuda else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": cfg.threads or torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------- rows


def row_specs(cfg: BenchConfig) -> list[RunSpec | None]:
    """The rows in order; ``None`` stands for the base model's evaluation."""
    return ([None] if cfg.eval_base else []) + list(cfg.runs)


def row_id_of(spec: RunSpec | None) -> str:
    return spec.id if spec else BASE_ROW_ID


def resolve_quantize_init(run: dict[str, Any]) -> None:
    """A quantized row's spec names ``quantize_init`` (TrainConfig's default when unset) unless it is where
    rows started before the option existed: those have no such key, so --resume still finds them equal."""
    init = run.pop("quantize_init", None) or DEFAULT_QUANT_INIT
    if run.get("quantize") and init != QUANT_INIT_BEFORE_OPTION:
        run["quantize_init"] = init


def worker_spec(cfg: BenchConfig, spec: RunSpec | None, model: str, train_file: Path, row_dir: Path) -> dict[str, Any]:
    """Everything one worker process needs, as plain JSON."""
    run = spec.to_dict() if spec else {"id": BASE_ROW_ID, "method": "base"}
    for key in ("seed", "dtype", "quantize", *LATER_KNOBS):
        if key in run and run[key] is None:
            del run[key]  # unset: specs stay as they were before rows could carry these (--resume)
    for key in ("validation_every", "curve_limit"):  # resolved into job["curve"] below
        run.pop(key, None)
    resolve_quantize_init(run)
    run = get_method(run["method"]).complete_run(run, cfg.density)
    job = {
        "run": run,
        "model": model,
        "eval_task": cfg.evaluated_task,
        "train_file": str(train_file),
        "eval_data": cfg.eval_data,
        "eval_data_sha256": eval_data_sha256(cfg.eval_data),
        "eval_limit": cfg.eval_limit,
        "grid_density": cfg.density,
        "target_modules": cfg.target_modules,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "max_length": cfg.max_length,
        "seed": cfg.seed,
        "threads": cfg.threads,
        "device": cfg.device,
        "row_dir": str(row_dir),
        "result_path": str(row_dir / "row.json"),
    }
    if spec is not None and spec.seed is not None:
        job["seed"] = spec.seed  # a seeded row of a protocol's test stage
    curve = row_curve(cfg, spec)
    if curve is not None:  # only then: a row without a curve keeps the spec it had before curves (--resume)
        job["curve"] = curve
    return job


def run_row(cfg: BenchConfig, spec: RunSpec | None, model: str, train_file: Path, out: Path) -> dict[str, Any]:
    """One row in a fresh process; a crash, timeout or error becomes a ``failed`` row."""
    row_id = row_id_of(spec)
    row_dir = out / "runs" / row_id
    row_dir.mkdir(parents=True, exist_ok=True)
    job = worker_spec(cfg, spec, model, train_file, row_dir)
    (row_dir / "spec.json").write_text(json.dumps(job, indent=2))
    result_path = Path(job["result_path"])
    result_path.unlink(missing_ok=True)
    started, load_before = time.perf_counter(), load_average()
    print(f"[bench] {now()} row {row_id}: starting", flush=True)
    error = None
    with open(row_dir / "log.txt", "w") as log:
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "sparseft.bench.worker", str(row_dir / "spec.json")],
                stdout=log, stderr=subprocess.STDOUT, timeout=cfg.row_timeout_s, env=worker_env(),
            )
            if proc.returncode != 0 and not result_path.is_file():
                error = f"worker exited with code {proc.returncode}: {log_tail(row_dir / 'log.txt')}"
        except subprocess.TimeoutExpired:
            error = f"row timed out after {cfg.row_timeout_s:.0f} s (row_timeout_s)"
    row = json.loads(result_path.read_text()) if result_path.is_file() and error is None else failed_row(job, error)
    row["row_wall_s"] = round(time.perf_counter() - started, 3)
    # Times on a shared machine depend on what else ran: keep the 1-minute load average around the row.
    row["load_average"] = {"start": load_before, "end": load_average()}
    row["machine"] = row_machine(machine_info(cfg))
    print(f"[bench] {now()} row {row_id}: {row['status']} in {row['row_wall_s']:.0f} s", flush=True)
    return row


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not available on this platform
        return None


def worker_env() -> dict[str, str]:
    """The worker must import this very sparseft, also when it runs from a source tree (PYTHONPATH=src)."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def log_tail(path: Path) -> str:
    text = path.read_text(errors="replace") if path.is_file() else ""
    return text[-LOG_TAIL_CHARS:]


def failed_row(job: dict[str, Any], error: str | None) -> dict[str, Any]:
    from .worker import empty_row

    row = empty_row(job)
    row["status"], row["error"] = "failed", error or "worker wrote no result"
    return row
