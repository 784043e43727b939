"""`sparseft serve` from the command line: flags, and the real command on a loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serve_fixtures import make_diff, reference, save_base
from sparseft.cli import build_parser

SRC = Path(__file__).resolve().parents[1] / "src"


def test_serve_flags_parse():
    args = build_parser().parse_args(["serve", "--model", "m", "--diff", "a=d1", "--diff", "b=d2", "--max-tokens", "64"])
    assert args.diff == [("a", "d1"), ("b", "d2")] and args.host == "127.0.0.1" and args.max_tokens == 64


def test_strategy_flags_parse_and_a_batch_of_zero_is_rejected(capsys):
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert (args.strategy, args.max_batch_size, args.max_batch_tokens) == ("auto", 16, None)
    args = build_parser().parse_args(["serve", "--model", "m", "--strategy", "mixed", "--max-batch-size", "64",
                                      "--max-batch-tokens", "8192"])
    assert (args.strategy, args.max_batch_size, args.max_batch_tokens) == ("mixed", 64, 8192)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--max-batch-size", "0"])
    assert "--max-batch-size: expected a whole number of at least 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--strategy", "fastest"])


def test_a_diff_without_a_name_is_rejected(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--diff", "just-a-dir"])
    assert "expected NAME=DIR" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a fresh interpreter imports torch + transformers: ~10 s idle, ~35 s on a busy 2-core box
def test_serve_command_answers_on_loopback(tmp_path):
    model_dir = save_base(tmp_path / "base")
    diff_dir = make_diff(tmp_path / "alpha", seed=1)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "sparseft", "serve", "--model", str(model_dir), "--served-name", "base",
           "--diff", f"alpha={diff_dir}", "--port", str(port), "--registry", str(tmp_path / "registry")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.25)
        r = httpx.post(f"{url}/v1/completions", timeout=60,
                       json={"model": "alpha", "prompt": [1, 10, 20], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference(model_dir, diff_dir, [1, 10, 20], 8)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert (tmp_path / "registry" / "registry.json").is_file()


@pytest.mark.parametrize("flag, value, expected", [
    ("--threads", "-1", "expected a whole number of at least 1"),   # was: RuntimeError from set_num_threads
    ("--threads", "0", "expected a whole number of at least 1"),
    ("--max-tokens", "0", "expected a whole number of at least 1"),  # was: a server whose requests all fail
    ("--max-tokens", "-5", "expected a whole number of at least 1"),
    ("--max-prompt-tokens", "0", "expected a whole number of at least 1"),  # was: silently "no limit"
    ("--max-prompt-tokens", "-1", "expected a whole number of at least 1"),
    ("--max-body-bytes", "-1", "expected a whole number of at least 1"),
    ("--max-queue", "0", "expected a whole number of at least 1"),
    ("--replicas", "0", "expected a whole number of at least 1"),
    ("--port", "99999", "expected a TCP port from 1 to 65535"),  # was: refused by uvicorn after the model loaded
    ("--port", "0", "expected a TCP port from 1 to 65535"),
])
def test_serve_refuses_bad_limits_at_the_flag(capsys, flag, value, expected):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--model", "m", flag, value])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {expected}, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", "", "cpu:0"])
def test_serve_refuses_a_bad_device_before_loading_anything(tmp_path, capsys, device):
    from sparseft.cli import main

    # The model does not exist: had it been loaded first, the error would name the model instead.
    assert main(["serve", "--model", str(tmp_path / "no-such-model"), "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"--device must be auto, cpu, cuda or cuda:N (N: a GPU index), got {device!r}" in err, err


def test_serve_refuses_a_registry_it_cannot_write_into_before_loading_anything(tmp_path, monkeypatch, capsys):
    from sparseft.cli import main

    # Was: a file as --registry loaded the model and then failed on the first diff with a bare errno (or, with no
    # --diff, served until a load failed); --registry "" kept the registry in the working directory.
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine\n")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cases = [(str(a_file), f"--registry {a_file}: is a file; expected a directory"),
             (str(a_file / "reg"), f"--registry {a_file / 'reg'}: cannot be created, {a_file} is a file"),
             ("", "--registry is empty ('')")]
    for registry, message in cases:  # the model does not exist: had it been loaded first, the error would name it
        assert main(["serve", "--model", str(tmp_path / "no-such-model"), "--registry", registry]) == 2
        assert f"sparseft serve: error: {message}" in capsys.readouterr().err
    assert a_file.read_text() == "mine\n" and list(work.iterdir()) == []


def test_build_app_refuses_a_bad_device_or_limit_before_loading(tmp_path):
    import torch

    from sparseft.errors import ConfigError
    from sparseft.serve import ServeLimits, build_app

    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        build_app(str(tmp_path / "no-such-model"), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device 'cuda:1' asks for a GPU, but torch sees no CUDA device"):
            build_app(str(tmp_path / "no-such-model"), device="cuda:1")
    for field, value in [("max_tokens", 0), ("max_tokens", -5), ("max_prompt_tokens", 0), ("max_body_bytes", -1),
                         ("max_queue", 0), ("max_tokens", 2.5)]:
        with pytest.raises(ConfigError, match=f"{field} must be a whole number"):
            ServeLimits(**{field: value})
    assert ServeLimits(max_prompt_tokens=None).max_prompt_tokens is None
