"""`make demo`'s script end to end: nexus, the model server and the proxy as real processes on
127.0.0.1, a store / predict / store v2 / reload / rollback / reload loop in a scratch git
repository. The best integration test there is; plus: a failed start still cleans up."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.cloud_servers import free_port, wait_for_http

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "scripts" / "demo.sh"
ANSWER = re.compile(
    r"input (\d)\s+->\s+\[([^\]]+)\]\s+class \d\s+\(model demo_model @ ([0-9a-f]{12})\)"
)


def run_demo(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEMO)],
        cwd=tmp_path,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "TMPDIR": str(tmp_path),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=240,  # the demo promises under two minutes; this only catches a hang
    )


def port_is_free(port: int) -> bool:
    """Nothing listens there any more (a bind test would trip over TIME_WAIT sockets)."""
    with socket.socket() as probe:
        probe.settimeout(2)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def answer_rounds(output: str) -> list[dict[int, tuple[str, str]]]:
    """The printed answers, one dict {input: (scores, commit)} per round of predictions."""
    rounds: list[dict[int, tuple[str, str]]] = []
    for index, scores, commit in ANSWER.findall(output):
        if index == "0":
            rounds.append({})
        rounds[-1][int(index)] = (scores, commit)
    return rounds


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_leaves_nothing_behind(tmp_path: Path) -> None:
    server_port, proxy_port = free_port(), free_port()
    result = run_demo(tmp_path, DEMO_SERVER_PORT=str(server_port), DEMO_PROXY_PORT=str(proxy_port))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    v1, v2, rolled_back = answer_rounds(result.stdout)
    assert len(v1) == len(v2) == len(rolled_back) == 5
    commits = [{commit for _, commit in answers.values()} for answers in (v1, v2, rolled_back)]
    assert len(commits[0]) == len(commits[1]) == 1, "one model version per round"
    assert commits[0] != commits[1], "the reload serves the new version"
    assert commits[2] == commits[0], "the rollback serves the first version again"
    assert [s for s, _ in v1.values()] != [s for s, _ in v2.values()]
    assert [s for s, _ in v1.values()] == [s for s, _ in rolled_back.values()]
    assert "different answers from before" in result.stdout
    assert "the same answers as before" in result.stdout

    assert port_is_free(server_port), "the model server must be stopped"
    assert port_is_free(proxy_port), "the proxy must be stopped"
    assert not list(tmp_path.glob("nexus-demo-*")), "the scratch repository must be removed"


def test_demo_that_cannot_start_fails_clearly_and_still_cleans_up(tmp_path: Path) -> None:
    server_port = free_port()
    with socket.socket() as squatter:  # something else already holds the proxy's port
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        proxy_port = squatter.getsockname()[1]
        result = run_demo(
            tmp_path, DEMO_SERVER_PORT=str(server_port), DEMO_PROXY_PORT=str(proxy_port)
        )
    assert result.returncode == 1, result.stdout[-3000:]
    assert "demo failed" in result.stdout
    assert "last lines of the proxy log" in result.stdout
    assert port_is_free(server_port), "the model server it started must be stopped"
    assert not list(tmp_path.glob("nexus-demo-*"))


def _start_serve(tmp_path: Path, serve_dir: Path, server_port: int, proxy_port: int):
    log = open(tmp_path / "serve.log", "ab")  # noqa: SIM115 - closed once the process has it
    process = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "serve.sh")],
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "SERVE_DIR": str(serve_dir),
            "SERVE_PORT": str(proxy_port),
            "SERVER_PORT": str(server_port),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    return process


@pytest.mark.slow
def test_serve_keeps_both_running_and_reuses_its_repository(tmp_path: Path) -> None:
    serve_dir = tmp_path / "serve-demo"
    for attempt in ("first", "second"):
        server_port, proxy_port = free_port(), free_port()
        process = _start_serve(tmp_path, serve_dir, server_port, proxy_port)
        try:
            wait_for_http(f"http://127.0.0.1:{proxy_port}/readyz", timeout=120)
            request = urllib.request.Request(
                f"http://127.0.0.1:{proxy_port}/predict",
                data=json.dumps({"input": [0.1] * 8}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
            assert len(answer["output"]) == 2
            assert process.poll() is None, "make serve keeps running"
        finally:
            process.terminate()  # what Ctrl-C / a service manager does
            process.wait(timeout=60)
        assert port_is_free(server_port), f"{attempt} run: the model server must stop with it"
        assert port_is_free(proxy_port), f"{attempt} run: the proxy must stop with it"
    log = (tmp_path / "serve.log").read_text()
    assert log.count("first run: versioning the demo model") == 1, "the second run reuses it"
