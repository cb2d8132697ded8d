"""The HTTP side of `make demo` / `make serve`: wait for readiness, send predictions, reload.

    python scripts/demo_client.py step "Title"
    python scripts/demo_client.py wait URL [--timeout S] [--process NAME:PID:LOG ...]
    python scripts/demo_client.py predict PROXY_URL --save FILE \
        [--compare FILE --expect same|changed]
    python scripts/demo_client.py reload SERVER_URL

Standard library HTTP on 127.0.0.1 only; the output goes through the CLI's Rich console
(nexus_cli.console), so it looks like the rest of the demo and honours NO_COLOR.
Exit status 1 with one clear line when something is not as the demo expects.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nexus_cli.console import printable, safe
from nexus_cli.console import stdout as console

SAMPLES = 5
FEATURES = 8
#: the demo's inputs: the same five every time, so answers can be compared across versions
_rng = random.Random(8)
INPUTS = [[round(_rng.uniform(-1, 1), 3) for _ in range(FEATURES)] for _ in range(SAMPLES)]


class DemoError(Exception):
    """Something the demo expected did not happen; the message says what."""


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 30) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise DemoError(f"{url} answered {exc.code}: {detail}") from exc
    except OSError as exc:
        raise DemoError(f"{url}: {exc}") from exc


def step(title: str) -> None:
    console.print()
    console.rule(f"[bold]{safe(title)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")  # a zombie still answers kill(0): ask Linux
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _show_log(name: str, path: Path) -> None:
    tail = path.read_text(errors="replace").splitlines()[-15:] if path.exists() else []
    console.print(f"[bold]last lines of the {safe(name)} log ({safe(path)}):")
    for line in tail:
        console.print("  " + printable(line), markup=False)


def wait(url: str, timeout: float, processes: list[str]) -> None:
    """Poll ``url`` until it answers 200. Fail at once when one of ``processes``
    (``NAME:PID:LOG``) exits, or after ``timeout``; either way show the logs' last lines."""
    watched = []
    for entry in processes:
        name, pid, log = entry.split(":", 2)
        watched.append((name, int(pid), Path(log)))
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with console.status(f"waiting for {url}"):
        while True:
            try:
                _request(url, timeout=2)
                console.print(f"[green]ready[/green]: {safe(url)}")
                return
            except DemoError as exc:
                last = str(exc)
            dead = [name for name, pid, _ in watched if not _alive(pid)]
            if dead or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    for name, _, log in watched:
        _show_log(name, log)
    if dead:
        raise DemoError(f"the {' and the '.join(dead)} exited before {url} was ready")
    raise DemoError(f"{url} was not ready after {timeout:g} s: {last}")


def _close(first: list[list[float]], second: list[list[float]]) -> bool:
    """Equal up to float noise: the proxy batches differently from one run to the next,
    and a batch of 5 may round differently from a batch of 3 in the last bits."""
    flat_first = [v for row in first for v in row]
    flat_second = [v for row in second for v in row]
    return len(flat_first) == len(flat_second) and all(
        abs(a - b) <= 1e-4 * max(1.0, abs(a)) for a, b in zip(flat_first, flat_second, strict=True)
    )


def predict(proxy: str, save: Path, compare: Path | None, expect: str | None) -> None:
    """POST the demo inputs to the proxy's /predict, all at once (the proxy batches them),
    and print the answers in order."""
    with ThreadPoolExecutor(max_workers=len(INPUTS)) as pool:
        replies = list(pool.map(lambda x: _request(f"{proxy}/predict", {"input": x}), INPUTS))
    answers = []
    for index, answer in enumerate(replies):
        output = answer["output"]
        answers.append(output)
        scores = ", ".join(f"{value:+.4f}" for value in output)
        winner = max(range(len(output)), key=output.__getitem__)
        commit = answer["model"]["commit_hash"][:12]
        console.print(
            f"  input {index}  ->  [cyan]\\[{scores}][/cyan]  class {winner}  "
            f"[dim](model {safe(answer['model']['name'])} @ {safe(commit)})[/dim]"
        )
    save.write_text(json.dumps({"answers": answers, "commit": commit}))
    if compare is None:
        return
    before = json.loads(compare.read_text())
    same = _close(before["answers"], answers)
    verdict = "the same answers as before" if same else "different answers from before"
    console.print(f"  => {verdict} (model was @ {safe(before['commit'])}, now @ {safe(commit)})")
    if expect == "same" and not same:
        raise DemoError("expected the answers of the earlier version after the rollback")
    if expect == "changed" and same:
        raise DemoError("expected new answers after the reload")


def reload(server: str) -> None:
    result = _request(f"{server}/admin/reload", {})
    console.print(
        f"  model server reloaded: {safe(result['from_commit'][:12])} -> "
        f"{safe(result['to_commit'][:12])}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("step").add_argument("title")
    waiting = commands.add_parser("wait")
    waiting.add_argument("url")
    waiting.add_argument("--timeout", type=float, default=90)
    waiting.add_argument("--process", action="append", default=[], metavar="NAME:PID:LOG")
    predicting = commands.add_parser("predict")
    predicting.add_argument("proxy")
    predicting.add_argument("--save", type=Path, required=True)
    predicting.add_argument("--compare", type=Path)
    predicting.add_argument("--expect", choices=("same", "changed"))
    commands.add_parser("reload").add_argument("server")
    args = parser.parse_args(argv)
    try:
        if args.command == "step":
            step(args.title)
        elif args.command == "wait":
            wait(args.url, args.timeout, args.process)
        elif args.command == "predict":
            predict(args.proxy.rstrip("/"), args.save, args.compare, args.expect)
        else:
            reload(args.server.rstrip("/"))
    except DemoError as exc:
        console.print(f"[bold red]demo failed:[/bold red] {safe(exc)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
