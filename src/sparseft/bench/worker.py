"""One benchmark row, run in its own process: train (full / LoRA / sparse), measure, evaluate.

``python -m sparseft.bench.worker SPEC.json`` reads the job written by ``grid.run_row`` and writes the
row to ``spec["result_path"]``, also when the row fails (status "failed" and the traceback), so the
grid records it and goes on. A fresh process per row keeps peak memory (ru_maxrss on CPU,
``torch.cuda.max_memory_allocated`` on GPU) the row's own.
"""

from __future__ import annotations

import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..methods import Method, get_method
from ..quantize import DEFAULT_SELECT_OVER
from .config import QUANT_INIT_BEFORE_OPTION


def row_method(job: dict[str, Any]) -> Method:
    return get_method(job["run"]["method"])


def empty_row(job: dict[str, Any]) -> dict[str, Any]:
    """A row with every schema field present (null until measured)."""
    run = job["run"]
    method = row_method(job)
    row: dict[str, Any] = {
        "id": run["id"], "method": method.name, "status": "running", "error": None,
        "metrics": None, "primary_metric": None, "eval_examples": None, "eval_wall_s": None,
        "total_params": None, "trainable_params": None if method.trains else 0,
        "trainable_pct": None if method.trains else 0.0,
        "seed": job["seed"], "device": None, "versions": versions(), "row_wall_s": None,
        # The base this row trained over and was scored over (the base row: the fp32 base).
        "dtype": base_dtype(job), "quantize": run.get("quantize"), "quantize_init": quantize_init(run),
        "select_over": select_over(run), "quantize_skip": run.get("quantize_skip"),
    }
    if method.trains:
        row.update({
            "scorer": run.get("scorer"), "density": run.get("density"), "num_params_requested": run.get("num_params"),
            "lora_rank": run.get("lora_rank") if isinstance(run.get("lora_rank"), int) else None,
            "lr": run["lr"], "warmup_ratio": None, "steps": job["steps"], "batch_size": job["batch_size"], "grad_accum": job["grad_accum"],
            "max_length": job["max_length"], "train_examples": None,
            "train_wall_s": None, "loop_wall_s": None, "selection_wall_s": None, "median_step_s": None, "tokens_per_s": None,
            "first_loss": None, "final_loss": None, "losses": None,
            "peak_memory_bytes": None, "peak_memory_kind": None, "optimizer_state_bytes": None,
            "artifact_kind": method.artifact_kind, "artifact_bytes": None, "artifact_path": None,
        })
    if run.get("quantize"):  # the loaded base's bytes as a fraction of fp32's (a quantized base's budget)
        row["base_bytes_vs_fp32"] = None
    if method.trains and job.get("curve"):  # only rows with a curve have its fields: others stay as they were
        row.update({"validation_curve": None, "curve_best_step": None, "curve_examples": None, "curve_wall_s": None})
    return row


def base_dtype(job: dict[str, Any]) -> str:
    return job["run"].get("dtype") or "float32"


def versions() -> dict[str, str]:
    """Versions from package metadata: importing peft only to read its version would cost seconds per row."""
    from importlib.metadata import version

    from .. import __version__

    return {"sparseft": __version__, **{p: version(p) for p in ("torch", "transformers", "peft")},
            "python": platform.python_version()}


def setup_device(job: dict[str, Any]) -> str:
    import torch

    from ..loading import resolve_device

    if job.get("threads"):
        torch.set_num_threads(int(job["threads"]))
    return str(resolve_device(job["device"], "the grid's device"))


# ---------------------------------------------------------------- training


def quantize_init(run: dict[str, Any]) -> str | None:
    """Where a quantized row's values started (no key: as before the option, see grid.resolve_quantize_init)."""
    return run.get("quantize_init", QUANT_INIT_BEFORE_OPTION) if run.get("quantize") else None


def select_over(run: dict[str, Any]) -> str | None:
    """Where a quantized row's entries were chosen (no key: TrainConfig's default)."""
    return (run.get("select_over") or DEFAULT_SELECT_OVER) if run.get("quantize") else None


def train_config(job: dict[str, Any], device: str):
    """The TrainConfig of this row: the grid's shared data and schedule, the row's method and knobs."""
    from ..training import TrainConfig

    run = job["run"]
    fields: dict[str, Any] = dict(
        model=job["model"], data=job["train_file"], out=str(Path(job["row_dir"]) / "artifact"),
        method=run["method"], steps=job["steps"], lr=float(run["lr"]), batch_size=job["batch_size"],
        grad_accum=job["grad_accum"], max_length=job["max_length"], seed=job["seed"],
        device=device, progress=False, dtype=base_dtype(job), quantize=run.get("quantize"),
    )
    if run.get("quantize"):
        fields["quantize_init"] = quantize_init(run)
        fields["select_over"] = select_over(run)
        fields["quantize_skip"] = run.get("quantize_skip") or []
    if job.get("target_modules"):
        fields["target_modules"] = job["target_modules"]
    if run.get("warmup_ratio") is not None:
        fields["warmup_ratio"] = float(run["warmup_ratio"])
    fields.update(row_method(job).train_fields(run, job))
    return TrainConfig.from_dict(fields)


def train_row(job: dict[str, Any], row: dict[str, Any], device: str):
    """Train and fill the cost fields of ``row`` (and its validation curve, when the job has one);
    returns the TrainResult. Time spent scoring the curve is apart, in ``curve_wall_s``."""
    import torch

    from ..training import run_training

    cfg = train_config(job, device)
    curve = ValidationCurve(job, device) if job.get("curve") else None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = run_training(cfg, on_step=curve)
    row["train_wall_s"] = round(time.perf_counter() - started - result.on_step_s, 3)
    if curve is not None:
        row.update(curve.row_fields(result.on_step_s))
    row.update({
        "loop_wall_s": round(result.wall_time_s, 3),
        # Inside train_wall_s; None for rows that chose no entries (full, LoRA).
        "selection_wall_s": None if result.selection_wall_s is None else round(result.selection_wall_s, 3),
        "median_step_s": result.median_step_s,
        "tokens_per_s": result.tokens_per_s,
        "losses": [round(x, 5) for x in result.losses],
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "trainable_params": int(result.trainable),
        "total_params": int(result.total_params),
        "trainable_pct": 100.0 * result.trainable / result.total_params,
        "peak_memory_bytes": int(result.peak_memory_bytes),
        "peak_memory_kind": "cuda_max_memory_allocated" if device.startswith("cuda") else "peak_rss",
        "optimizer_state_bytes": int(result.optimizer_state_bytes),
        "artifact_bytes": int(result.artifact_bytes),
        "artifact_path": str(result.out),
        "train_examples": count_lines(job["train_file"]),
        "warmup_ratio": cfg.warmup_ratio,  # the row's own, else TrainConfig's default
    })
    row.update(row_method(job).row_facts(result, cfg))
    return result


class ValidationCurve:
    """The ``on_step`` hook of a row with a curve: every ``every`` steps and at the last, the model being
    trained is scored on the first ``limit`` examples of the row's eval split (in the validation stage,
    the validation split) by the evaluator ``evaluate_row`` uses, then handed back to training as it was.
    """

    def __init__(self, job: dict[str, Any], device: str):
        from ..loading import load_tokenizer
        from ..tasks import get_task

        self.every, self.last_step = int(job["curve"]["every"]), int(job["steps"])
        self.task = get_task(job["eval_task"])
        self.records = self.task.load(job["eval_data"], job["curve"]["limit"])  # bad data fails before training
        self.tokenizer = load_tokenizer(job["model"])
        self.batch_size = job.get("eval_batch_size") or 8
        self.cuda_devices = [torch_device_index(device)] if device.startswith("cuda") else []
        self.points: list[dict[str, Any]] = []

    def __call__(self, step: int, model) -> None:
        if step % self.every == 0 or step == self.last_step:
            metrics = self.score(model)
            metric = primary_metric_of(self.task, metrics)
            self.points.append({"step": step, metric: round(float(metrics[metric]), 6)})

    def score(self, model) -> dict[str, float]:
        """Metrics of the live model in eval mode without gradients; the RNG is forked so that training
        draws the same random numbers as without a curve."""
        import torch

        from ..evaluate import evaluate_records_detailed

        with torch.no_grad(), torch.random.fork_rng(devices=self.cuda_devices):  # evaluation restores train mode
            metrics, _, _, _ = evaluate_records_detailed(
                model, self.tokenizer, self.task, self.records, batch_size=self.batch_size, progress=False)
        return metrics

    def row_fields(self, wall_s: float) -> dict[str, Any]:
        return {"validation_curve": self.points, "curve_best_step": best_step(self.points),
                "curve_examples": len(self.records), "curve_wall_s": round(wall_s, 3)}


def best_step(points: list[dict[str, Any]]) -> int | None:
    """The step of a curve's best point; the earliest of equal ones (the steps after it bought nothing)."""
    if not points:
        return None
    return max(points, key=point_value)["step"]


def point_value(point: dict[str, Any]) -> float:
    """The metric of a curve point ``{"step": s, "<metric>": v}``."""
    return next(float(v) for k, v in point.items() if k != "step")


def torch_device_index(device: str) -> int:
    import torch

    return torch.device(device).index if torch.device(device).index is not None else torch.cuda.current_device()


def count_lines(path: str) -> int:
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


# ---------------------------------------------------------------- evaluation


def evaluate_row(job: dict[str, Any], row: dict[str, Any], device: str) -> None:
    """Task metrics on the eval split for the base, or the base with this row's artifact applied."""
    from ..evaluate import evaluate_records_detailed
    from ..loading import load_tokenizer
    from ..tasks import get_task
    from ..files import records_sha256

    task = get_task(job["eval_task"])
    records = task.load(job["eval_data"], job["eval_limit"])
    model = load_for_eval(job, row).to(device)
    if job["run"].get("quantize"):
        from .quant_memory import fp32_bytes, stored_bytes

        row["base_bytes_vs_fp32"] = round(stored_bytes(model) / fp32_bytes(model), 4)
    metrics, per_example, count, wall_s = evaluate_records_detailed(
        model, load_tokenizer(job["model"]), task, records, batch_size=job.get("eval_batch_size") or 8, progress=False)
    row["eval_wall_s"] = round(wall_s, 3)
    row["metrics"] = {k: float(v) for k, v in metrics.items()}
    row["eval_examples"] = count
    row["eval_examples_sha256"] = records_sha256(records)  # lets grids run elsewhere pair (bench.compare)
    row["primary_metric"] = primary_metric_of(task, metrics)
    # The primary metric of every example, in the eval split's order: paired bootstrap intervals need them.
    row["per_example"] = {row["primary_metric"]: [round(x, 6) for x in per_example[row["primary_metric"]]]
                          } if row["primary_metric"] in per_example else None
    if not row_method(job).trains:
        row["total_params"] = sum(p.numel() for p in model.parameters())


def primary_metric_of(task, metrics: dict[str, float]) -> str:
    """The task's headline metric (the first one it reports when it names none)."""
    return task.primary_metric or next(iter(metrics))


def load_for_eval(job: dict[str, Any], row: dict[str, Any]):
    """The model to evaluate: the row's artifact over the same base it trained over (dtype, quantization);
    merged in, so every row evaluates at the base's speed, except over a quantized base (unmerged)."""
    return row_method(job).load_for_eval(job["model"], row.get("artifact_path"), dtype=base_dtype(job),
                                         quantize=job["run"].get("quantize"),
                                         quantize_skip=job["run"].get("quantize_skip") or ())


# ---------------------------------------------------------------- entry point


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    row = empty_row(job)
    try:
        device = setup_device(job)
        row["device"] = device
        if row_method(job).trains:
            train_row(job, row, device)
        evaluate_row(job, row, device)
        row["status"] = "ok"
    except Exception:  # noqa: BLE001 - any failure of this row is recorded in the row, by design
        row["status"], row["error"] = "failed", traceback.format_exc()
    return row


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    row = run_job(job)
    Path(job["result_path"]).write_text(json.dumps(row, indent=2))
    if row["error"]:
        print(row["error"], file=sys.stderr)
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
