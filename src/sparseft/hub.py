"""A diff on the Hugging Face Hub: resolving ``org/name`` to a local directory, and the model card.

``resolve_diff("org/name")`` goes through ``huggingface_hub.snapshot_download``: online it downloads
(or reuses) the snapshot, offline (``HF_HUB_OFFLINE=1``) it takes the snapshot already in the local HF
cache (``models--org--name/snapshots/<rev>/`` via ``refs/main``). A path that exists locally is always
the local diff, so a directory named like a repository id still wins.

``model_card(diff)`` is the ``README.md`` that ``write_diff`` puts next to the diff, as PEFT does for
adapters: base, fingerprint, selection, training data hash and metrics when known, and how to load it.
It is made only from the diff itself (no dates, no paths), so the same diff gives the same card bytes;
it is not listed in ``file_hashes``, so editing the card never makes a diff fail verification.

Example:
    >>> local = resolve_diff("my-org/sst2-diff")  # doctest: +SKIP
    >>> model = SparseModel.from_pretrained(base, "my-org/sst2-diff")  # same thing, one step  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DiffNotFoundError

if TYPE_CHECKING:
    from .diffio import SparseDiff

CARD_NAME = "README.md"
# org/name, optionally @revision (a branch, tag or commit); Hub ids allow letters, digits, '-', '_', '.'.
REPO_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def parse_repo_id(source: str | os.PathLike) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``source`` names a Hub repository rather than a local path, else None."""
    if not isinstance(source, str) or Path(source).exists():
        return None
    match = REPO_ID.match(source)
    return (match["repo"], match["revision"]) if match else None


def resolve_diff(source: str | os.PathLike, revision: str | None = None, local_files_only: bool | None = None) -> Path:
    """The local directory of a diff: ``source`` itself when it is a path, else the Hub snapshot of
    ``org/name[@revision]`` (offline: from the local HF cache). Anything else is returned as a path,
    for ``read_diff`` to report as missing."""
    if isinstance(source, str) and not source.strip():  # Path("") is the working directory: not what was meant
        raise DiffNotFoundError(f"the diff path is empty ({source!r}); give a diff directory or a Hub id org/name")
    parsed = parse_repo_id(source)
    if parsed is None:
        return Path(source)
    from huggingface_hub import constants, snapshot_download

    repo_id, pinned = parsed
    offline = constants.HF_HUB_OFFLINE if local_files_only is None else local_files_only
    try:
        return Path(snapshot_download(repo_id, revision=revision or pinned, local_files_only=offline))
    except Exception as e:  # not found, gated, offline without a cached snapshot, no network
        where = " in the local Hugging Face cache (offline)" if offline else " on the Hugging Face Hub"
        raise DiffNotFoundError(
            f"{source}: no such diff directory, and no snapshot of repository {repo_id!r}{where} "
            f"({type(e).__name__}: {e})"
        ) from e


# ---------------------------------------------------------------- the model card


def _row(name: str, value: Any) -> str:
    return f"| {name} | {value} |"


def model_card(diff: "SparseDiff") -> str:
    """The README.md of a diff directory: YAML front matter for the Hub, then what the diff is and how to load it."""
    sel = diff.config
    prov = diff.provenance or {}
    base = diff.base_model or "unknown"
    # The Hub checks base_model against its model ids: an alias (smollm2-135m) or a local path is left out.
    hub_base = REPO_ID.match(diff.base_model or "") and not Path(diff.base_model).is_absolute()
    front = ["---", "library_name: sparseft", *([f"base_model: {base}"] if hub_base else []),
             "tags:", "- sparseft", "- sparse-fine-tuning", "---", ""]
    rows = [
        _row("base model", f"`{base}`"),
        *(_row(f"base fingerprint ({dtype})", f"`{digest}`") for dtype, digest in sorted(diff.base_fingerprint.items())),
        _row("trained entries", f"{diff.num_entries:,} in {len(diff.masks)} modules"),
        _row("selection", f"scorer `{sel.scorer}`, density {sel.density}, allocation `{sel.allocation}`"),
        _row("target modules", ", ".join(f"`{m}`" for m in sel.target_modules)),
        _row("value dtype", f"`{sel.value_dtype}`"),
    ]
    if "data_sha256" in prov:
        rows.append(_row("training data", f"`{prov.get('data_file', '')}` sha256 `{prov['data_sha256']}`"))
    if "steps" in prov:
        rows.append(_row("training", f"{prov['steps']} steps, seed {prov.get('seed')}"))
    metrics = prov.get("metrics") or {}
    if isinstance(metrics, dict):
        rows += [_row(f"metric: {name}", value) for name, value in sorted(metrics.items())]
    else:  # provenance is free-form (save_pretrained(provenance=...)); the card shows what it holds
        rows.append(_row("metrics", metrics))
    versions = prov.get("versions") or {}
    if versions:
        made_with = ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) if isinstance(versions, dict) else versions
        rows.append(_row("made with", made_with))
    load = [
        "```python",
        "from sparseft import SparseModel",
        "from sparseft.loading import load_model  # a Hub id, a local directory or a sparseft alias",
        "",
        f"base = load_model({json.dumps(base)})",
        'model = SparseModel.from_pretrained(base, "ORG/NAME")  # or a local directory',
        "```",
        "",
        f"Command line: `sparseft apply --model {base} --diff ORG/NAME --out merged/`.",
    ]
    body = [
        f"# Sparse diff over `{base}`",
        "",
        "A sparseft diff: the few weight entries that fine-tuning changed, "
        "stored as indices and values over the unchanged base model. Loading checks the base's fingerprint.",
        "",
        "| field | value |",
        "| --- | --- |",
        *rows,
        "",
        "## Load",
        "",
        *load,
    ]
    return "\n".join(front + body) + "\n"
