"""Startup cost: `nexus --help` and `nexus list` load only what they use.

No timing assertions (a shared CI machine is noisy): the modules that made startup
slow are named instead, so a stray top-level import fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Repo, run_nexus

HEAVY = ("pydantic", "git", "boto3", "botocore", "google", "filelock", "rich", "concurrent")

PROBE = """
import json, sys
sys.argv = ["nexus", *json.loads(sys.argv[1])]
from nexus_cli.cli import main
try:
    main()
except SystemExit:
    pass
loaded = sorted({name.split(".")[0] for name in sys.modules})
sys.stderr.write("LOADED " + json.dumps(loaded) + "\\n")
"""


def loaded_by(args: list[str], cwd: Path) -> set[str]:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        cwd=cwd, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    line = next(x for x in completed.stderr.splitlines() if x.startswith("LOADED "))
    return set(json.loads(line.removeprefix("LOADED ")))


def test_help_loads_typer_only(tmp_path: Path) -> None:
    assert loaded_by(["--help"], tmp_path) & set(HEAVY) == set()


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_list_loads_no_git_no_sdk_no_pydantic(cli, repo: Repo, json_flag: list[str]) -> None:
    assert cli("store", repo.write_weights("m.pt", b"w"), "prod_model").exit_code == 0
    loaded = loaded_by(["list", *json_flag], repo.path)
    heavy = {"pydantic", "git", "boto3", "botocore", "google", "filelock"}
    if json_flag:
        heavy.add("rich")  # JSON output never renders a table
    assert loaded & heavy == set()


BROKEN_TYPER = """
import json, sys
import typer._coercion

class RuntimeParam:  # a future Typer whose internals differ from 0.29's
    def __init__(self, descriptor):
        self.descriptor = descriptor

typer._coercion.RuntimeParam = RuntimeParam
sys.argv = ["nexus", *json.loads(sys.argv[1])]
from nexus_cli.cli import main
main()
"""


@pytest.mark.parametrize(
    "args", [["list", "--json"], ["store", "out/m.pt", "prod_model", "--metric", "acc=0.5"]]
)
def test_the_pydantic_shortcut_degrades_to_typer_s_own_coercion(
    repo: Repo, args: list[str]
) -> None:
    """The startup shortcut leans on Typer internals; where they differ, nexus still works."""
    repo.write_weights("m.pt", b"w")
    completed = subprocess.run(
        [sys.executable, "-c", BROKEN_TYPER, json.dumps(args)],
        cwd=repo.path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert "Traceback" not in completed.stderr


def test_the_executable_ends_fast_but_loses_no_output(cli, repo: Repo) -> None:
    """`nexus` skips the interpreter's teardown (``os._exit`` after ``main``): what it
    printed must still all arrive, well past a pipe's buffer, with the right exit code."""
    message = "m" * 100_000  # the JSON listing is larger than stdout's 8 KiB buffer
    weights = repo.write_weights("m.pt", b"w")
    assert cli("store", weights, "prod_model", "-m", message).exit_code == 0
    listed = run_nexus("list", "--json", cwd=repo.path)
    assert listed.exit_code == 0, listed.stderr
    assert json.loads(listed.stdout)[0]["message"] == message
    missing = run_nexus("load", "no_such_model", "--json", cwd=repo.path)
    assert missing.exit_code == 4, missing.stderr
    assert json.loads(missing.stdout)["error"]["code"]
    assert "Traceback" not in missing.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_output_that_cannot_be_written_is_not_a_success(repo: Repo) -> None:
    """With the teardown skipped, a failed final flush must still fail the command (120,
    as Python's own exit would), not vanish behind exit status 0."""
    for args in (["--help"], ["list", "--json"]):  # written at once; buffered to the end
        with open("/dev/full", "w") as full:
            completed = subprocess.run(
                [sys.executable, "-m", "nexus_cli", *args],
                cwd=repo.path, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
            )  # fmt: skip
        assert completed.returncode == 120, (args, completed.stderr)
        assert "cannot write the output: No space left on device" in completed.stderr
        assert "Traceback" not in completed.stderr
