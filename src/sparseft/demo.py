"""The demo, read top to bottom: sparse fine-tuning of the embedded SmolLM2-135M on a small in-house task.

base model → accuracy before → train a sparse diff on the bundled support-ticket routing data →
save it → apply it (merge) → accuracy after → revert it (unmerge) and check the weights are the base's,
bit for bit. Every number printed is measured in this run.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .atomic import check_dir_to_write_into, check_out_dir
from .audit import inspect_diff
from .config import SparseConfig, positive_count
from .evaluate import evaluate_records
from .loading import load_model, load_tokenizer, resolve_model_path
from .model import SparseModel
from .selection import get_scorer
from .tasks import ROUTING_DATA, get_task
from .training import TrainConfig, run_training


@dataclass
class DemoConfig:
    """The demo's handful of settings (the defaults finish in minutes on 2 CPU cores)."""

    model: str = "smollm2-135m"
    task: str = "routing"
    data_dir: str = str(ROUTING_DATA)  # holds train.jsonl and test.jsonl
    out: str = "sparseft-demo"
    density: float = 0.01
    scorer: str = "random"
    epochs: float = 2.0
    lr: float = 2e-3
    batch_size: int = 8
    eval_batch_size: int = 16
    seed: int = 0

    def check(self) -> None:
        """Every setting, before anything loads: a bad --epochs or --scorer used to surface only after the
        model had loaded and the "before" evaluation had run (minutes)."""
        get_task(self.task)
        get_scorer(self.scorer)
        positive_count("eval_batch_size", self.eval_batch_size)
        # --out too: a file there failed with a bare errno after the "before" evaluation, "" wrote into the working
        # directory, and a folder of the user's at OUT/diff was refused only once training was to start.
        out = check_dir_to_write_into(self.out, "--out")
        check_out_dir(out / "diff", "--out", inputs=[self.model])
        train_config(self, out / "train_rows.jsonl", out / "diff")  # density, epochs, lr, batch size, seed


@dataclass
class DemoReport:
    model: str
    task: str
    num_train: int
    num_test: int
    metric: str
    before: float
    after: float
    trained_entries: int
    model_parameters: int
    diff_bytes: int
    model_bytes: int
    revert_bitwise_equal: bool
    train_steps: int
    first_loss: float | None  # None when no step ran
    last_loss: float | None
    diff_dir: str
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> DemoReport:
    """Fine-tune, evaluate before/after, save, apply and exactly revert; returns the measured facts."""
    cfg.check()
    clock = Stopwatch()
    task = get_task(cfg.task)
    data_dir, out = Path(cfg.data_dir), Path(cfg.out)
    test = task.load(data_dir / "test.jsonl")

    with clock("load model"):
        model, tokenizer = load_model(cfg.model).eval(), load_tokenizer(cfg.model)
    num_parameters = count_parameters(model)  # before any sparse values are attached
    log(f"model {cfg.model}: {num_parameters:,} parameters (loaded in {clock['load model']:.1f} s)")

    with clock("evaluate before"):
        before = evaluate_records(model, tokenizer, task, test, cfg.eval_batch_size)[0]
    metric = next(iter(before))
    log(f"before: {metric} {before[metric]:.1%} on {len(test)} test examples")

    # Training rows come from the task itself, so training sees exactly the prompts evaluation uses.
    rows_file = write_rows(task.training_rows(data_dir / "train.jsonl", tokenizer=tokenizer), out / "train_rows.jsonl")
    with clock("train"):
        result = run_training(train_config(cfg, rows_file, out / "diff"), model=model, tokenizer=tokenizer)
    first_loss, last_loss = (result.losses[0], result.losses[-1]) if result.losses else (None, None)
    log(f"trained {result.trainable:,} entries for {result.steps} steps: loss {loss_span(first_loss, last_loss)}")

    # From here on the saved file is what counts: a fresh base + the diff as read back from disk.
    base = load_model(cfg.model).eval()
    original = [(p, p.detach().clone()) for p in base.parameters()]
    sparse = SparseModel.from_pretrained(base, out / "diff")
    sparse.merge()  # apply: W + S written into the weights, so evaluation runs at plain dense speed
    with clock("evaluate after"):
        after = evaluate_records(sparse, tokenizer, task, test, cfg.eval_batch_size)[0]
    log(f"after:  {metric} {after[metric]:.1%}")
    changed = sum(int((p != copy).sum()) for p, copy in original)
    sparse.unmerge()  # revert: the saved original entries are written back
    reverted = all(torch.equal(p, copy) for p, copy in original)
    log(f"apply changed {changed:,} weight entries; after revert the weights equal the base bit for bit: {reverted}")
    diff_info = inspect_diff(out / "diff")

    report = DemoReport(
        model=cfg.model,
        task=task.name,
        num_train=sum(1 for _ in open(rows_file, encoding="utf-8")),
        num_test=len(test),
        metric=metric,
        before=before[metric],
        after=after[metric],
        trained_entries=diff_info["num_entries"],
        model_parameters=num_parameters,
        diff_bytes=diff_info["total_bytes"],
        model_bytes=model_file_bytes(cfg.model, base),
        revert_bitwise_equal=reverted,
        train_steps=result.steps,
        first_loss=first_loss,
        last_loss=last_loss,
        diff_dir=str(out / "diff"),
        seconds={**clock.seconds, "total": clock.total()},
    )
    (out / "demo_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def train_config(cfg: DemoConfig, rows_file: Path, out: Path) -> TrainConfig:
    return TrainConfig(
        model=cfg.model,
        data=str(rows_file),
        out=str(out),
        method="sparse",
        selection=SparseConfig(density=cfg.density, scorer=cfg.scorer),
        epochs=cfg.epochs,
        lr=cfg.lr,
        warmup_ratio=0.1,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )


def write_rows(rows: list[dict[str, str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_file_bytes(name: str, model) -> int:
    """Size of the base's weight files on disk; fp32 parameter bytes when there are none to measure."""
    files = list(Path(resolve_model_path(name)).glob("*.safetensors")) if Path(resolve_model_path(name)).is_dir() else []
    return sum(f.stat().st_size for f in files) or sum(p.numel() * p.element_size() for p in model.parameters())


def loss_span(first: float | None, last: float | None) -> str:
    return "n/a (no step ran)" if first is None or last is None else f"{first:.3f} -> {last:.3f}"


def format_report(r: DemoReport) -> str:
    """The demo's summary: what was trained, what it cost, and what it changed."""
    s = r.seconds
    return "\n".join(
        [
            "",
            f"sparse fine-tuning of {r.model} on '{r.task}' ({r.num_train} training / {r.num_test} test examples)",
            f"  trained entries   {r.trained_entries:,} = {r.trained_entries / r.model_parameters:.3%} of {r.model_parameters:,} parameters",
            f"  diff size         {r.diff_bytes / 1e6:.2f} MB vs model {r.model_bytes / 1e6:.1f} MB ({r.diff_bytes / r.model_bytes:.2%})",
            f"  training          {r.train_steps} steps, loss {loss_span(r.first_loss, r.last_loss)}, {s.get('train', 0):.0f} s",
            f"  {r.metric:<17} {r.before:.1%} -> {r.after:.1%}  (before/after fine-tuning, test set)",
            f"  apply + revert    merged for evaluation, unmerged: weights bitwise equal to the base: {r.revert_bitwise_equal}",
            f"  diff saved to     {r.diff_dir}  (sparseft apply --model {r.model} --diff {r.diff_dir} --out merged/)",
            f"  time              {s.get('total', 0):.0f} s total (load {s.get('load model', 0):.0f} s, eval before "
            f"{s.get('evaluate before', 0):.0f} s, train {s.get('train', 0):.0f} s, eval after {s.get('evaluate after', 0):.0f} s)",
        ]
    )


class Stopwatch:
    """Named wall-clock phases: ``with clock("train"): ...`` then ``clock["train"]``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        watch = self

        class Phase:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                watch.seconds[name] = round(time.perf_counter() - self.t0, 2)

        return Phase()

    def __getitem__(self, name: str) -> float:
        return self.seconds[name]

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 2)
