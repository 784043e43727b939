"""Dynamic re-selection (reselect_every): which entries move, what state moves with them, and that
training stays exact and deterministic with it on."""

import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama, make_tiny_tokenizer
from sparseft import SparseConfig, SparseModel, get_sparse_model, select
from sparseft.cli import main
from sparseft.delta import SparseLinear
from sparseft.errors import ConfigError
from sparseft.training import TrainConfig
from sparseft.training.checkpoint import load_checkpoint
from sparseft.training.data import load_examples, make_batches
from sparseft.training.loop import growth_batches
from sparseft.training.reselect import (ReselectSchedule, accumulated_growth_candidates, growth_candidates, plan_swap,
                                        reselect, swap_entries)
from test_training import quick_config, sha256, train_in_process, train_until_crash, write_train_file


@pytest.fixture
def train_file(tmp_path):
    return write_train_file(tmp_path / "train.jsonl")


def masks_of(out):
    return {n: layer.indices for n, layer in SparseModel.from_pretrained(make_tiny_llama(), out).sparse_layers().items()}


# ---------------------------------------------------------------- the schedule


def test_swap_count_decays_with_a_cosine_from_the_first_reselection_to_the_end():
    s = ReselectSchedule(every=10, fraction=0.2, total_steps=110)
    assert [s.due(t) for t in (0, 5, 10, 15, 20, 100)] == [False, False, True, False, True, True]
    assert s.fraction_at(10) == pytest.approx(0.2)  # the full fraction at the first re-selection
    assert s.fraction_at(60) == pytest.approx(0.1)  # half-way: cos(pi/2) -> half
    assert s.fraction_at(110) == pytest.approx(0.0)
    counts = [s.count(k=100, numel=1000, step=t) for t in range(10, 110, 10)]
    assert counts[0] == 20 and counts[5] == 10 and counts == sorted(counts, reverse=True) and counts[-1] >= 0
    assert s.count(k=900, numel=1000, step=10) == 100  # never more than there are entries outside the mask
    assert ReselectSchedule(every=5, fraction=1.0, total_steps=50).count(k=3, numel=100, step=5) == 3
    assert not ReselectSchedule(every=0, fraction=0.1, total_steps=50).due(10)


# ---------------------------------------------------------------- drop / grow on hand-built cases


def test_growth_takes_the_largest_dense_gradients_outside_the_mask():
    layer = SparseLinear(nn.Linear(3, 2, bias=False), torch.tensor([0, 4]))
    x = torch.tensor([[1.0, 0.5, 3.0]])
    # loss = y0 - 2 y1, so dW = [[1, .5, 3], [-2, -1, -6]]: |dW| flat = 1, .5, 3, 2, 1, 6 with 0 and 4 taken
    grown = growth_candidates({"l": layer}, {"l": 2}, lambda: (layer(x) * torch.tensor([[1.0, -2.0]])).sum())
    assert grown["l"].tolist() == [2, 5]
    assert layer.values.grad is None and layer.weight.grad is None  # the pass leaves no gradients behind
    grown = growth_candidates({"l": layer}, {"l": 3}, lambda: (layer(x) * torch.tensor([[1.0, -2.0]])).sum())
    assert grown["l"].tolist() == [2, 3, 5]


def test_drop_takes_the_smallest_magnitudes_and_keeps_the_indices_sorted():
    indices = torch.tensor([0, 4, 7, 9])
    values = torch.tensor([0.5, -0.1, 0.05, -2.0])
    new, source = plan_swap(indices, values, grown=torch.tensor([8, 2]))
    assert new.tolist() == [0, 2, 8, 9]  # 7 (|0.05|) and 4 (|-0.1|) dropped
    assert source.tolist() == [0, -1, -1, 3]  # old positions; -1 = grown
    # equal magnitudes: the lower position is dropped first, so the choice is deterministic
    new, _ = plan_swap(torch.tensor([1, 2, 3]), torch.tensor([0.3, -0.3, 0.3]), grown=torch.tensor([0]))
    assert new.tolist() == [0, 2, 3]


def test_values_and_adamw_moments_move_with_their_entries_in_place():
    layer = SparseLinear(nn.Linear(4, 3, bias=False), torch.tensor([1, 5, 6, 10]))
    optimizer = torch.optim.AdamW([layer.values], lr=0.1, foreach=False)
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    with torch.no_grad():
        layer.values.copy_(torch.tensor([0.4, -0.01, 0.3, 0.02]))
    state = optimizer.state[layer.values]
    state["exp_avg"].copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    state["exp_avg_sq"].copy_(torch.tensor([10.0, 20.0, 30.0, 40.0]))
    objects = [id(layer.values), id(layer.indices), id(state["exp_avg"]), id(state["exp_avg_sq"])]

    swap_entries(layer, optimizer, grown=torch.tensor([0, 7]))  # drops 5 (|-0.01|) and 10 (|0.02|)

    assert layer.indices.tolist() == [0, 1, 6, 7]
    assert layer.values.tolist() == pytest.approx([0.0, 0.4, 0.3, 0.0])
    assert state["exp_avg"].tolist() == [0.0, 1.0, 3.0, 0.0]
    assert state["exp_avg_sq"].tolist() == [0.0, 10.0, 30.0, 0.0]
    assert float(state["step"]) == 1.0  # the shared step count is not per entry
    assert objects == [id(layer.values), id(layer.indices), id(state["exp_avg"]), id(state["exp_avg_sq"])]
    assert optimizer.param_groups[0]["params"][0] is layer.values
    layer(torch.randn(2, 4)).sum().backward()
    optimizer.step()  # the optimizer goes on with the same parameter and its moved state
    assert state["exp_avg"][0] != 0 and state["exp_avg_sq"][3] != 0


# ---------------------------------------------------------------- on a whole model


def test_reselect_keeps_k_per_module_and_swaps_the_scheduled_count(tiny_batch):
    base, cfg = make_tiny_llama(), SparseConfig(density=0.1, scorer="random", seed=0)
    masks = select(base, cfg)
    chosen = {n: m.clone() for n, m in masks.items()}
    model = get_sparse_model(base, cfg, masks)
    layers = model.sparse_layers()
    optimizer = torch.optim.AdamW(model.sparse_parameters(), lr=1e-2, foreach=False)
    model(**tiny_batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    schedule = ReselectSchedule(every=2, fraction=0.3, total_steps=10)
    for step in (2, 4, 6, 8):
        before = {n: layer.indices.clone() for n, layer in layers.items()}
        swapped = reselect(layers, optimizer, schedule, step, lambda: model(**tiny_batch).loss)
        for name, layer in layers.items():
            count = schedule.count(before[name].numel(), layer.weight.numel(), step)
            assert swapped[name] == count > 0
            assert layer.k == before[name].numel()  # k fixed
            assert bool((layer.indices[1:] > layer.indices[:-1]).all())  # sorted, unique
            kept = torch.isin(layer.indices, before[name]).sum()
            assert int(kept) == layer.k - count
            values = optimizer.state[layer.values]
            assert values["exp_avg"][~torch.isin(layer.indices, before[name])].abs().sum() == 0
    assert all(p.grad is None for p in model.base_model.parameters())  # no dense gradient kept
    assert all(torch.equal(masks[n], chosen[n]) for n in masks)  # the caller's masks are not changed


def test_reselect_leaves_a_module_with_k_0_alone(tiny_batch):
    masks = select(make_tiny_llama(), SparseConfig(density=0.1, scorer="random", seed=0))
    empty = "model.layers.0.mlp.up_proj"
    masks[empty] = torch.zeros(0, dtype=torch.long)
    model = get_sparse_model(make_tiny_llama(), SparseConfig(density=0.1), masks)
    layers = model.sparse_layers()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=False)
    model(**tiny_batch).loss.backward()
    optimizer.step()
    swapped = reselect(layers, optimizer, ReselectSchedule(every=2, fraction=0.3, total_steps=10), 2,
                       lambda: model(**tiny_batch).loss)
    assert layers[empty].k == 0 and empty not in swapped and sum(swapped.values()) > 0


def test_training_with_reselection_follows_the_schedule_and_the_loss_falls(train_file, tmp_path):
    fixed = train_in_process(quick_config(train_file, tmp_path / "fixed", steps=12))
    moving = train_in_process(quick_config(train_file, tmp_path / "moving", steps=12, reselect_every=3,
                                           reselect_fraction=0.3))
    assert moving.losses[-1] < moving.losses[0] - 0.1
    metrics = [json.loads(line) for line in (moving.out / "metrics.jsonl").read_text().splitlines()]
    # logged on the step each re-selection preceded (after 3, 6 and 9 updates)
    assert [m["step"] for m in metrics if "reselected" in m] == [4, 7, 10]
    schedule = ReselectSchedule(every=3, fraction=0.3, total_steps=12)
    layers = SparseModel.from_pretrained(make_tiny_llama(), fixed.out).sparse_layers().values()
    expected = [sum(schedule.count(layer.k, layer.weight.numel(), t) for layer in layers) for t in (3, 6, 9)]
    assert [m["reselected"] for m in metrics if "reselected" in m] == expected
    assert moving.trainable == fixed.trainable
    a, b = masks_of(fixed.out), masks_of(moving.out)
    assert {n: m.numel() for n, m in a.items()} == {n: m.numel() for n, m in b.items()}
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the mask moved; the diff format did not


def test_same_seed_gives_the_same_diff_bytes_with_reselection(train_file, tmp_path):
    settings = dict(steps=6, reselect_every=2, reselect_fraction=0.5)
    a = train_in_process(quick_config(train_file, tmp_path / "a", **settings))
    b = train_in_process(quick_config(train_file, tmp_path / "b", **settings))
    for name in ("sparse_delta.safetensors", "sparse_config.json"):
        assert sha256(a.out / name) == sha256(b.out / name)
    provenance = json.loads((a.out / "sparse_config.json").read_text())["provenance"]["train_config"]
    assert provenance["reselect_every"] == 2 and provenance["reselect_fraction"] == 0.5


def test_resume_with_reselection_gives_the_uninterrupted_diff(train_file, tmp_path, monkeypatch):
    # re-selections before steps 3 and 5 (after 2 and 4 updates); the checkpoint at 3 holds a moved mask
    settings = dict(steps=6, save_every=3, reselect_every=2, reselect_fraction=0.5, grad_accum=2, batch_size=2)
    reference = train_in_process(quick_config(train_file, tmp_path / "ref", **settings))

    out = tmp_path / "crashed"
    train_until_crash(monkeypatch, quick_config(train_file, out, **settings), crash_at_call=5)
    saved = load_checkpoint(out / "checkpoints" / "step-000003").masks
    initial = get_sparse_model(make_tiny_llama(), quick_config(train_file, out).sparse_config()).sparse_layers()
    initial = {n: layer.indices for n, layer in initial.items()}
    assert any(not torch.equal(saved[n], initial[n]) for n in initial)  # the checkpoint has the moved mask

    resumed = train_in_process(quick_config(train_file, out, resume="latest", **settings))
    assert sha256(resumed.out / "sparse_delta.safetensors") == sha256(reference.out / "sparse_delta.safetensors")
    assert resumed.losses == reference.losses[3:]

    with pytest.raises(ConfigError, match=r"cannot resume.*reselect_every: 2 -> 3"):
        train_in_process(quick_config(train_file, out, resume=str(out / "checkpoints" / "step-000003"),
                                      **{**settings, "reselect_every": 3}))


# ---------------------------------------------------------------- growth over several micro-batches


def random_batches(count, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": (ids := torch.randint(0, 128, (2, 12), generator=gen)), "labels": ids.clone()}
            for _ in range(count)]


def direct_growth(masks, values, batches, counts):
    """The reference: a plain tiny Llama with the entries' values added into its weights, the dense
    weight gradient of each batch's loss from autograd, summed, ranked by magnitude outside the mask."""
    model = make_tiny_llama()
    weights = {name: model.get_submodule(name).weight for name in masks}
    with torch.no_grad():
        for name, w in weights.items():
            w.view(-1)[masks[name]] += values[name]
    for w in weights.values():
        w.requires_grad_(True)
    total = {name: torch.zeros_like(w) for name, w in weights.items()}
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, list(weights.values()))
        for name, g in zip(weights, grads):
            total[name] += g
    scores = {}
    for name, g in total.items():
        score = g.abs().view(-1).clone()
        score[masks[name]] = -1.0
        scores[name] = score
    return scores


def sparse_model_with_values(seed=0):
    cfg = SparseConfig(density=0.1, scorer="random", seed=seed)
    masks = select(make_tiny_llama(), cfg)
    model = get_sparse_model(make_tiny_llama(), cfg, masks)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.sparse_layers().values():
            layer.values.copy_(0.05 * torch.randn(layer.values.shape, generator=gen))
    return model


def test_growth_over_several_batches_takes_the_largest_summed_dense_gradients():
    model = sparse_model_with_values()
    layers = model.sparse_layers()
    masks = {n: layer.indices.clone() for n, layer in layers.items()}
    values = {n: layer.values.detach().clone() for n, layer in layers.items()}
    counts = {n: 5 for n in layers}
    batches = random_batches(3)

    grown = accumulated_growth_candidates(layers, counts, [lambda b=b: model(**b).loss for b in batches])

    reference = direct_growth(masks, values, batches, counts)
    for name, indices in grown.items():
        assert indices.numel() == 5 and not torch.isin(indices, masks[name]).any()
        best = torch.sort(reference[name], descending=True).values[:5]
        # the chosen entries are the 5 largest |sum of the batches' dW| (up to float rounding of near-ties)
        torch.testing.assert_close(torch.sort(reference[name][indices], descending=True).values, best)
    assert set(grown) == set(layers)
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind
    # the sum is what decides: the first batch alone picks other entries somewhere
    first_only = growth_candidates(layers, counts, lambda: model(**batches[0]).loss)
    assert any(not torch.equal(first_only[n], grown[n]) for n in grown)


def test_growth_over_one_batch_is_the_one_pass_result():
    model = sparse_model_with_values()
    layers, batch = model.sparse_layers(), random_batches(1)[0]
    counts = {n: 4 for n in layers}
    one_pass = growth_candidates(layers, counts, lambda: model(**batch).loss)
    summed = accumulated_growth_candidates(layers, counts, [lambda: model(**batch).loss])
    assert {n: t.tolist() for n, t in one_pass.items()} == {n: t.tolist() for n, t in summed.items()}


def test_growth_batches_are_the_steps_own_then_the_next_steps_in_data_order(train_file):
    examples = load_examples(train_file, make_tiny_tokenizer(), max_length=64)

    def at(step):
        return make_batches(examples, 2, 0, seed=3, step=step, grad_accum=2)

    chosen = growth_batches(at(5), 5, lambda ahead: at(5 + ahead))
    expected = at(5) + at(6) + at(7)[:1]
    assert len(chosen) == 5
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(chosen, expected))
    assert [torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(growth_batches(at(5), 1, at), at(5)[:1])] == [True]
    assert len(growth_batches(at(5), 2, lambda ahead: pytest.fail("no batch beyond the step's own is needed"))) == 2


def test_training_with_growth_over_several_batches_moves_the_mask_differently_and_repeats(train_file, tmp_path):
    settings = dict(steps=6, reselect_every=2, reselect_fraction=0.5, grad_accum=2, batch_size=2)
    one = train_in_process(quick_config(train_file, tmp_path / "one", **settings))
    default = train_in_process(quick_config(train_file, tmp_path / "default", reselect_growth_batches=1, **settings))
    four = train_in_process(quick_config(train_file, tmp_path / "four", reselect_growth_batches=4, **settings))
    again = train_in_process(quick_config(train_file, tmp_path / "again", reselect_growth_batches=4, **settings))
    assert sha256(one.out / "sparse_delta.safetensors") == sha256(default.out / "sparse_delta.safetensors")
    assert sha256(four.out / "sparse_delta.safetensors") == sha256(again.out / "sparse_delta.safetensors")
    a, b = masks_of(one.out), masks_of(four.out)
    assert any(not torch.equal(a[n], b[n]) for n in a)  # the summed gradient chose other entries
    assert {n: m.numel() for n, m in a.items()} == {n: m.numel() for n, m in b.items()}
    assert four.losses[0] == one.losses[0]  # the first step (before any re-selection) is untouched
    provenance = json.loads((four.out / "sparse_config.json").read_text())["provenance"]["train_config"]
    assert provenance["reselect_growth_batches"] == 4


def test_resume_with_growth_over_several_batches_gives_the_uninterrupted_diff(train_file, tmp_path, monkeypatch):
    # 3 growth batches with grad_accum 2: the step's two, then the next step's first
    settings = dict(steps=6, save_every=3, reselect_every=2, reselect_fraction=0.5, grad_accum=2, batch_size=2,
                    reselect_growth_batches=3)
    reference = train_in_process(quick_config(train_file, tmp_path / "ref", **settings))
    out = tmp_path / "crashed"
    train_until_crash(monkeypatch, quick_config(train_file, out, **settings), crash_at_call=5)
    resumed = train_in_process(quick_config(train_file, out, resume="latest", **settings))
    assert sha256(resumed.out / "sparse_delta.safetensors") == sha256(reference.out / "sparse_delta.safetensors")
    assert resumed.losses == reference.losses[3:]
    with pytest.raises(ConfigError, match=r"cannot resume.*reselect_growth_batches: 3 -> None"):
        train_in_process(quick_config(train_file, out, resume=str(out / "checkpoints" / "step-000003"),
                                      **{**settings, "reselect_growth_batches": 1}))


# ---------------------------------------------------------------- bad values


@pytest.mark.parametrize("flags, message", [
    (["--reselect-every", "-1"], "reselect_every must be a whole number of steps >= 0"),
    (["--reselect-every", "5", "--reselect-fraction", "0"], "reselect_fraction must be in (0, 1]"),
    (["--reselect-every", "5", "--reselect-fraction", "1.5"], "reselect_fraction must be in (0, 1]"),
    (["--reselect-every", "5", "--method", "lora"], "reselect_every applies to sparse runs only"),
    (["--reselect-every", "5", "--reselect-growth-batches", "0"], "reselect_growth_batches must be a whole number of "
                                                                 "micro-batches >= 1, got 0"),
    (["--reselect-growth-batches", "4"], "reselect_growth_batches applies only with reselect_every"),
    (["--reselect-every", "0", "--reselect-growth-batches", "4"], "reselect_growth_batches applies only with reselect_every"),
])
def test_bad_reselect_options_are_rejected_before_anything_is_written(flags, message, train_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["train", "--model", "tiny-not-loaded", "--data", str(train_file), "--out", str(out), "--steps", "2",
                 "--no-progress", *flags])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_reselect_values_from_yaml_are_checked_too():
    with pytest.raises(ConfigError, match="whole number"):
        TrainConfig.from_dict({"reselect_every": 2.5})
    with pytest.raises(ConfigError, match="reselect_fraction must be a number"):
        TrainConfig.from_dict({"reselect_every": 2, "reselect_fraction": "lots"})
    # A numeric string (how PyYAML reads ``1e-1``) is stored as the number it spells.
    assert TrainConfig.from_dict({"reselect_every": 2, "reselect_fraction": "1e-1"}).reselect_fraction == 0.1
    assert not TrainConfig(reselect_every=0).reselecting and TrainConfig(reselect_every=4).reselecting
    with pytest.raises(ConfigError, match="reselect_growth_batches must be a whole number, got 2.5"):
        TrainConfig.from_dict({"reselect_every": 2, "reselect_growth_batches": 2.5})
    with pytest.raises(ConfigError, match="reselect_growth_batches must be a whole number of micro-batches >= 1"):
        TrainConfig.from_dict({"reselect_every": 2, "reselect_growth_batches": -1})
    assert TrainConfig.from_dict({"reselect_every": 2, "reselect_growth_batches": "4"}).reselect_growth_batches == 4
