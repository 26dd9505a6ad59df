"""The alpaca-nb command in a new shell: every expected error is one clear line and a non-zero exit.

Each case runs the real console entry point in a subprocess, as a user would after `make setup`,
with TIKTOKEN_CACHE_DIR unset: the package must find its encodings by itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alpaca_nb.costs import tiktoken_cache

UNREACHABLE = "http://127.0.0.1:1/v1"  # port 1: nothing listens there, the connection is refused at once


def user_environment(**changes: str | None) -> dict[str, str]:
    """The environment of a fresh shell after set-up: no TIKTOKEN_CACHE_DIR, the same user cache."""
    environment = dict(os.environ)
    environment.pop("TIKTOKEN_CACHE_DIR", None)
    for name, value in changes.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return environment


def run_cli(*arguments: str, timeout: float = 120, **changes: str | None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "alpaca_nb.cli", *arguments], capture_output=True, text=True,
                          timeout=timeout, env=user_environment(**changes), check=False)


def assert_one_clear_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert all(text in result.stderr + result.stdout for text in expected), result.stderr


def generate_arguments(out_dir: Path, model: str = "gpt-4o-mini", base_url: str = UNREACHABLE) -> list[str]:
    return ["generate", "--base-url", base_url, "--model", model, "--num-instructions", "2", "--out", str(out_dir),
            "--max-requests", "2", "--timeout", "5"]


def test_encodings_are_found_without_tiktoken_cache_dir(tmp_path):
    """`make setup` ran `alpaca-nb prepare`, which installed them into the package's user cache."""
    code = "from alpaca_nb.costs import count_tokens; print(count_tokens('Give three tips for staying healthy.', 'gpt-4o-mini'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env=user_environment(ALPACA_NB_OFFLINE="1"), check=False)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == 7


def test_an_unreachable_endpoint_names_the_url_and_the_fix(tmp_path):
    result = run_cli(*generate_arguments(tmp_path / "run"))
    assert_one_clear_error(result, UNREACHABLE, "connection error", "is a server listening there?")


def test_a_corrupt_middle_line_of_generated_jsonl_names_the_file_and_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "generated.jsonl").write_text('{"instruction": "a"}\n{not json\n{"instruction": "b"}\n')
    before = (out / "generated.jsonl").read_bytes()
    result = run_cli(*generate_arguments(out))
    assert_one_clear_error(result, f"{out / 'generated.jsonl'}, line 2: invalid JSON", "the file is unchanged")
    assert (out / "generated.jsonl").read_bytes() == before  # nothing kept was lost


def test_an_unknown_price_lists_the_known_models(tmp_path):
    result = run_cli(*generate_arguments(tmp_path / "run", model="some-vllm-model"))
    assert_one_clear_error(result, "no price known for model 'some-vllm-model'", "prices.toml")


def test_a_missing_offline_encoding_says_how_to_provide_it(tmp_path):
    result = run_cli(*generate_arguments(tmp_path / "run"), ALPACA_NB_CACHE_DIR=str(tmp_path / "empty-cache"),
                     ALPACA_NB_OFFLINE="1")
    assert_one_clear_error(result, "tiktoken encoding 'o200k_base'", "alpaca-nb prepare --tiktoken-from DIR")


def test_a_missing_data_file_names_it_and_where_it_looked(tmp_path):
    result = run_cli(*generate_arguments(tmp_path / "run"), ALPACA_NB_CACHE_DIR=str(tmp_path / "empty-cache"),
                     ALPACA_NB_DATA_DIR=None, ALPACA_NB_OFFLINE="1", TIKTOKEN_CACHE_DIR=str(tiktoken_cache()))
    assert_one_clear_error(result, "seed_tasks")


def test_a_server_killed_during_generation_is_reported_as_dead(tmp_path):
    """The embedded server is started by the CLI itself and SIGKILLed by its pid mid-run."""
    process = subprocess.Popen(
        [sys.executable, "-m", "alpaca_nb.cli", "generate", "--api", "completions", "--num-instructions", "1000",
         "--out", str(tmp_path / "run"), "--max-tokens", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=user_environment())
    first_line = process.stdout.readline()  # "started the embedded llama.cpp server at ... (pid N)"
    assert "(pid " in first_line, first_line + process.stderr.read()
    server_pid = int(first_line.rsplit("(pid ", 1)[1].rstrip(")\n"))
    time.sleep(3.0)  # requests in flight
    os.kill(server_pid, signal.SIGKILL)
    started = time.monotonic()
    stdout, stderr = process.communicate(timeout=120)
    assert time.monotonic() - started < 30  # at once, not after rounds of retries against a closed port
    result = subprocess.CompletedProcess(process.args, process.returncode, first_line + stdout, stderr)
    assert_one_clear_error(result, "exited: killed by SIGKILL", "its log is")


def test_prepare_ends_with_a_self_check_that_names_the_broken_part(tmp_path):
    """A stand-in llama-server that dies of SIGILL, as a natively built one did on a VM that advertises AMX."""
    crashing = tmp_path / "llama-server"
    crashing.write_text("#!/bin/sh\nkill -ILL $$\n")
    crashing.chmod(0o755)
    result = run_cli("prepare", ALPACA_NB_LLAMA_SERVER=str(crashing))
    assert_one_clear_error(result, "self-check failed: the embedded llama-server does not answer",
                           "killed by SIGILL", "make llama-server")


def test_prepare_self_check_passes_on_the_built_server():
    result = run_cli("prepare", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "llama-server" in result.stdout and "load_model()" in result.stdout and "answered" in result.stdout
