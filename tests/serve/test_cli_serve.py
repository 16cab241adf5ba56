"""``explainkit serve`` through the real CLI: it starts, answers (many requests at once) and
stops; a bad run or a taken port is one sentence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import assert_clean_failure, run_cli


def start(*args: str) -> tuple[subprocess.Popen, str, list[str]]:
    """The server in a subprocess, and the URL it printed (with the port it chose)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "explainkit", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "EXPLAINKIT_LOAD_PLUGINS": ""},
    )
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if " at http://" in line:
            return proc, line.split(" at ")[1].split()[0], lines
    proc.kill()
    raise AssertionError(f"the server printed no address: {''.join(lines)}")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def test_serve_starts_answers_concurrently_and_stops(explorer_run, other_run):
    proc, url, lines = start(str(explorer_run), str(other_run), "--port", "0")
    try:
        assert url.startswith("http://127.0.0.1:")
        assert not any("anyone" in line for line in lines)
        status, body = get(url + "api/runs")
        assert status == 200 and [r["num_images"] for r in json.loads(body)] == [64, 64]
        urls = [url + f"api/runs/0/images?page={p % 3}&per_page=24" for p in range(12)]
        urls += [url + f"img/0/{i}.png" for i in range(12)] + [
            url + f"map/0/{i}/gradcam.png" for i in range(12)
        ]
        urls += [url + "img/0/999.png"]
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(get, urls))
        assert [s for s, _ in results[:-1]] == [200] * (len(urls) - 1)
        assert results[-1][0] == 404  # an error on that view only
        assert get(url + "runs/0/")[0] == 200  # and the server is still there
    finally:
        code = stop(proc)
    assert code == 0


def test_another_host_says_that_the_network_can_read_the_run(explorer_run):
    proc, url, lines = start(str(explorer_run), "--port", "0", "--host", "0.0.0.0")
    try:
        text = "".join(lines)
        assert "anyone who can reach this machine" in text and "127.0.0.1" in text
        assert url.startswith("http://0.0.0.0:")
    finally:
        stop(proc)


def test_bad_runs_and_ports_are_one_sentence(explorer_run, tmp_path):
    result = run_cli("serve", str(tmp_path / "missing"), timeout=120)
    assert_clean_failure(result, (1, 2), "missing")
    result = run_cli("serve", str(tmp_path), timeout=120)
    assert_clean_failure(result, (1, 2))
    result = run_cli("serve", str(explorer_run), "--port", "70000", timeout=120)
    assert_clean_failure(result, (2,), "70000")


def test_a_port_in_use_is_one_sentence(explorer_run):
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        result = run_cli(
            "serve", str(explorer_run), "--port", str(taken.getsockname()[1]), timeout=120
        )
    finally:
        taken.close()
    assert_clean_failure(result, (2,), "cannot listen")


@pytest.mark.parametrize("args", [["--help"]])
def test_help_names_the_safety_default(args):
    result = run_cli("serve", *args, timeout=120)
    assert result.returncode == 0 and "127.0.0.1" in result.stdout
