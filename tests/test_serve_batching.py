"""The batching engine: rows join and leave every step, each decodes with its own diff, exactly as offline.

The CI load test drives a live server with 8 diffs + the base and 72 concurrent requests (some
streamed, some cancelled) and checks every finished greedy answer against the offline merged model.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from conftest import make_tiny_llama
from serve_fixtures import LiveServer, make_diff, make_tokenizer, save_base
from sparseft import SparseModel
from sparseft.serve import DiffRegistry, SamplingParams, ServeLimits, build_app
from sparseft.serve.batching import BatchingEngine
from sparseft.serve.registry import DiffVersion

NUM_DIFFS = 8
MAX_TOKENS = 10
PROMPTS = [[1, 10, 20, 30], [1, 40, 41, 42, 43], [1, 9, 8, 7, 6, 5, 4, 3]]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching")
    diffs = {f"d{i}": make_diff(root / f"d{i}", seed=i + 1) for i in range(NUM_DIFFS)}
    return {"root": root, "model": save_base(root / "base"), "diffs": diffs}


@pytest.fixture(scope="module")
def offline(files):
    """Greedy token ids of base + diff merged offline (and of the base) for every prompt."""
    out = {}
    for name in [None, *files["diffs"]]:
        model = make_tiny_llama()
        if name is not None:
            model = SparseModel.from_pretrained(model, files["diffs"][name]).merge_and_unload()
        for i, prompt in enumerate(PROMPTS):
            ids = torch.tensor([prompt])
            with torch.no_grad():
                tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                                        do_sample=False)
            out[name, i] = tokens[0, len(prompt):].tolist()
    return out


def engine_with_diffs(files, **kw):
    engine = BatchingEngine(make_tiny_llama(), make_tokenizer(), **kw)
    registry = DiffRegistry(engine.validated_entries, reserved_names=("base",))
    return engine, {name: registry.load(name, path) for name, path in files["diffs"].items()}


class Results:
    """Collects each job's text pieces and outcome; ``wait`` blocks until ``n`` jobs ended."""

    def __init__(self) -> None:
        self.pieces, self.outcome, self._ended = {}, {}, threading.Semaphore(0)

    def sink(self, key):
        self.pieces[key] = []

        def on_event(kind, payload):
            if kind == "text":
                self.pieces[key].append(payload)
            else:
                self.outcome[key] = payload
                self._ended.release()
        return on_event

    def wait(self, n):
        for _ in range(n):
            assert self._ended.acquire(timeout=60), "a job never ended"


@pytest.mark.parametrize("strategy", ["mixed", "auto"])
def test_rows_of_many_diffs_join_and_leave_and_each_gets_its_offline_tokens(files, offline, strategy):
    engine, diffs = engine_with_diffs(files, strategy=strategy, max_batch_size=6)
    results, jobs = Results(), []
    for k in range(30):
        name = [None, *diffs][k % (NUM_DIFFS + 1)]
        max_tokens = 3 + k % (MAX_TOKENS - 2)  # rows leave at different steps
        jobs.append((k, name, k % len(PROMPTS), max_tokens))
        engine.submit(diffs.get(name), PROMPTS[k % len(PROMPTS)], SamplingParams(max_tokens), results.sink(k))
    engine.start()
    results.wait(len(jobs))
    engine.stop()
    assert 1 < engine.largest_batch <= 6
    for k, name, prompt, max_tokens in jobs:
        done = results.outcome[k]
        expected = offline[name, prompt][:max_tokens]
        assert done.token_ids == expected, (name, prompt)
        assert "".join(results.pieces[k]) == done.text == make_tokenizer().decode(expected, skip_special_tokens=True)
    base = make_tiny_llama().state_dict()
    assert engine.merged is None and all(torch.equal(t, base[n]) for n, t in engine.model.state_dict().items())


def test_auto_merges_while_every_row_shares_one_diff(files, offline):
    engine, diffs = engine_with_diffs(files, strategy="auto")
    results = Results()
    for k in range(len(PROMPTS)):
        engine.submit(diffs["d3"], PROMPTS[k], SamplingParams(MAX_TOKENS), results.sink(k))
    engine.start()
    results.wait(len(PROMPTS))
    assert engine.merged is diffs["d3"] and engine.swaps == 1 and engine.largest_batch == len(PROMPTS)
    assert engine.mixed.rows.slots is None  # merged: the hooks add nothing
    assert [results.outcome[k].token_ids for k in range(len(PROMPTS))] == [offline["d3", k] for k in range(len(PROMPTS))]
    engine.stop()


def test_stop_strings_max_tokens_and_cancellation(files, offline):
    engine, diffs = engine_with_diffs(files, strategy="mixed")
    tok = make_tokenizer()
    expected = offline["d1", 0]
    stop = tok.decode(expected[3:5])  # the 4th and 5th tokens' text
    results = Results()
    engine.submit(diffs["d1"], PROMPTS[0], SamplingParams(MAX_TOKENS, stop=[stop]), results.sink("stop"))
    engine.submit(diffs["d1"], PROMPTS[0], SamplingParams(2), results.sink("length"))
    running = engine.submit(diffs["d2"], PROMPTS[1], SamplingParams(MAX_TOKENS), results.sink("cancelled"))
    waiting = engine.submit(None, PROMPTS[2], SamplingParams(MAX_TOKENS), results.sink("never started"))
    waiting.cancel()
    engine.start()
    results.wait(1)  # wait until one job ended (the "length" one, after its 2 tokens), then cancel
    running.cancel()
    results.wait(3)
    engine.stop()
    by_stop = results.outcome["stop"]
    assert by_stop.finish_reason == "stop" and stop not in by_stop.text
    full = tok.decode(expected, skip_special_tokens=True)
    assert by_stop.text == full[: full.index(stop)] and len(by_stop.token_ids) <= 5
    assert results.outcome["length"].finish_reason == "length" and results.outcome["length"].token_ids == expected[:2]
    cancelled = results.outcome["cancelled"]
    assert cancelled.finish_reason == "cancelled" and cancelled.token_ids == offline["d2", 1][:len(cancelled.token_ids)]
    assert len(cancelled.token_ids) < MAX_TOKENS
    assert "cancelled before it started" in str(results.outcome["never started"])


@pytest.mark.parametrize("strategy", ["mixed", "auto"])
def test_a_diff_that_fails_fails_its_request_and_the_engine_keeps_serving(files, offline, strategy):
    engine, diffs = engine_with_diffs(files, strategy=strategy)
    good = diffs["d0"]
    entries = {name: (indices + 10**9, values) for name, (indices, values) in good.entries.items()}
    broken = DiffVersion("broken", 1, "memory", "", good.num_entries, 0.0, entries)  # out-of-range positions
    results = Results()
    engine.submit(broken, PROMPTS[0], SamplingParams(MAX_TOKENS), results.sink("broken"))
    engine.start()
    results.wait(1)
    assert isinstance(results.outcome["broken"], Exception)
    engine.submit(good, PROMPTS[0], SamplingParams(MAX_TOKENS), results.sink("good"))
    results.wait(1)
    engine.stop()
    assert results.outcome["good"].token_ids == offline["d0", 0]
    base = make_tiny_llama().state_dict()
    assert all(torch.equal(t, base[n]) for n, t in engine.model.state_dict().items())


def test_max_batch_tokens_bounds_the_batch(files):
    engine, diffs = engine_with_diffs(files, strategy="mixed", max_batch_size=64,
                                      max_batch_tokens=2 * (len(PROMPTS[0]) + MAX_TOKENS))
    results = Results()
    for k in range(6):
        engine.submit(diffs["d0"], PROMPTS[0], SamplingParams(MAX_TOKENS), results.sink(k))
    engine.start()
    results.wait(6)
    engine.stop()
    assert engine.largest_batch == 2


def test_unloading_a_diff_drops_its_entries_once_its_rows_are_done(files):
    engine, diffs = engine_with_diffs(files, strategy="mixed")
    results = Results()
    engine.submit(diffs["d0"], PROMPTS[0], SamplingParams(1), results.sink(0))
    engine.submit(diffs["d1"], PROMPTS[0], SamplingParams(1), results.sink(1))
    engine.start()
    results.wait(2)
    assert set(map(id, engine.mixed.diffs)) == {id(diffs["d0"]), id(diffs["d1"])}
    engine.forget(diffs["d0"])
    assert [d.name for d in engine.mixed.diffs] == ["d1"]
    engine.stop()


def test_seeded_sampling_repeats_whatever_else_is_in_the_batch(files):
    engine, diffs = engine_with_diffs(files, strategy="mixed")
    results = Results()
    sampled = SamplingParams(MAX_TOKENS, temperature=1.0, seed=7)
    engine.submit(diffs["d0"], PROMPTS[0], sampled, results.sink("alone"))
    engine.start()
    results.wait(1)
    for k in range(3):
        engine.submit(diffs[f"d{k + 1}"], PROMPTS[k], SamplingParams(MAX_TOKENS, temperature=1.0), results.sink(k))
    engine.submit(diffs["d0"], PROMPTS[0], sampled, results.sink("crowded"))
    results.wait(4)
    engine.stop()
    assert results.outcome["alone"].token_ids == results.outcome["crowded"].token_ids


# ---------------------------------------------------------------- the CI load test, over HTTP


async def one_request(client, model, prompt, mode):
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": mode != "plain"}
    if mode == "plain":
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        text = ""
        async for line in r.aiter_lines():
            if mode == "cancel" and text:
                return None  # leave after the first piece: the server cancels the job
            if line.startswith("data: {"):
                text += httpx.Response(200, content=line.removeprefix("data: ")).json()["choices"][0]["text"]
        return text


@pytest.mark.parametrize("strategy", ["mixed", "auto"])
def test_mixed_concurrent_load_matches_offline_merged_outputs(files, offline, strategy):
    tok = AutoTokenizer.from_pretrained(files["model"])
    app = build_app(str(files["model"]), list((n, str(p)) for n, p in files["diffs"].items()), served_name="base",
                    limits=ServeLimits(max_tokens=32), strategy=strategy, max_batch_size=16)
    models = ["base", *files["diffs"]]
    requests = [(models[k % len(models)], k % len(PROMPTS), ("plain", "stream", "plain", "cancel")[k % 4])
                for k in range(72)]

    async def drive(url):
        limits = httpx.Limits(max_connections=len(requests))
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one_request(client, m, PROMPTS[p], mode) for m, p, mode in requests))

    with LiveServer(app) as live:
        texts = asyncio.run(drive(live.url))
        engine = app.state.engine
        assert engine.largest_batch > 1 and engine.alive
        deadline = time.monotonic() + 10  # the worker sets the gauge just after the last answer went out
        while "sparseft_batch_rows 0.0" not in httpx.get(f"{live.url}/metrics").text:
            assert time.monotonic() < deadline, "the batch never emptied"
            time.sleep(0.05)
    for (model, prompt, mode), text in zip(requests, texts):
        if mode != "cancel":
            expected = offline[None if model == "base" else model, prompt]
            assert text == tok.decode(expected, skip_special_tokens=True), (model, prompt, mode)
