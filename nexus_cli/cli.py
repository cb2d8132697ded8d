"""`nexus`: the command line over the Python API. Parse, call, render; nothing else.

Every command takes ``--json`` (machine output only on stdout), ``--meta``,
``--config`` and ``--debug`` after its name, and exits with the code of the error
it met (see ``nexus_cli.errors``).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.exceptions import TyperException

from nexus_cli import console
from nexus_cli.api import ProgressReporter, Project, init_project, silent_progress
from nexus_cli.config import StorageConfig, resolve_config
from nexus_cli.errors import NexusError, UsageError
from nexus_cli.gitrepo import GitRepo
from nexus_cli.names import validate_model_name
from nexus_cli.signature import parse_signature_json, signature_from_input_shape
from nexus_cli.transfer import release_freed_buffers_early

app = typer.Typer(
    name="nexus",
    help="Tie model weights to git commits: store, list, load, roll back and verify them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Options every command shares, declared once.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
MetaOpt = Annotated[
    Path | None,
    typer.Option("--meta", help="Metadata file [default: .nexus_meta.json at the git root]."),
]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="Config file [default: .nexusrc beside --meta].")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]
ModelArg = Annotated[str, typer.Argument(help="Model name, like prod_model.", show_default=False)]
CommitOpt = Annotated[
    str | None, typer.Option("--commit", help="Commit hash or prefix [default: the latest].")
]


@dataclass
class Output:
    """How a command reports: JSON for machines or Rich for people."""

    json: bool
    debug: bool

    @property
    def progress(self) -> ProgressReporter:
        return silent_progress if self.json else console.progress_bar

    def emit(self, payload: Any, human: Callable[[], None]) -> None:
        if self.json:
            sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
        else:
            human()

    def fail(self, code: str, message: str, exit_code: int) -> typer.Exit:
        if self.json:
            sys.stdout.write(json.dumps({"error": {"code": code, "message": message}}) + "\n")
        console.error(message)
        return typer.Exit(exit_code)


def run(out: Output, action: Callable[[], None]) -> None:
    """Run a command body, turning every error into one line and an exit code."""
    try:
        action()
    except NexusError as exc:
        if out.debug:
            traceback.print_exc()
        raise out.fail(exc.code, str(exc), exc.exit_code) from None
    except KeyboardInterrupt:
        raise out.fail("interrupted", "interrupted", 130) from None
    except Exception as exc:  # anything we did not foresee: still one line, exit 1
        if out.debug:
            traceback.print_exc()
        message = f"unexpected error: {type(exc).__name__}: {exc} (run with --debug for details)"
        raise out.fail("unexpected", message, 1) from None


def _relative(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _commit_hint(project: Project, summary: str) -> str:
    meta = _relative(project.meta_path)
    return f'Commit the metadata: [bold]git add {meta} && git commit -m "{summary}"[/]'


def _parse_metrics(pairs: list[str]) -> dict[str, float]:
    metrics = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            metrics[name.strip()] = float(value)
        except ValueError:
            raise UsageError(f"--metric {pair!r}: write it as name=number, like acc=0.93") from None
    return metrics


@app.command()
def init(
    provider: Annotated[str, typer.Option(help="local, s3, minio or gcs.")] = "local",
    bucket: Annotated[str, typer.Option(help="Bucket (s3, minio, gcs).")] = "",
    prefix: Annotated[str, typer.Option(help="Key prefix inside the bucket.")] = "",
    endpoint_url: Annotated[str, typer.Option(help="S3-compatible endpoint (minio).")] = "",
    region: Annotated[str, typer.Option(help="Region (s3, minio).")] = "",
    path: Annotated[str, typer.Option("--path", help="Local store folder.")] = ".nexus/store",
    force: Annotated[bool, typer.Option(help="Overwrite an existing .nexusrc.")] = False,
    json_: JsonOpt = False,
    meta: MetaOpt = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Write .nexusrc and an empty .nexus_meta.json; git-ignore a local store."""
    out = Output(json_, debug)

    def action() -> None:
        values = {"provider": provider, "bucket": bucket, "prefix": prefix, "path": path,
                  "endpoint_url": endpoint_url, "region": region}  # fmt: skip
        settings: StorageConfig = resolve_config(values, environ={})
        meta_path = meta.absolute() if meta else GitRepo.discover().root / ".nexus_meta.json"
        config_path, meta_path = init_project(
            meta_path.parent, settings, force=force, meta_path=meta_path, config_path=config
        )
        out.emit(
            {"config": str(config_path), "meta": str(meta_path), "provider": settings.provider},
            lambda: console.say(
                f"Wrote {_relative(config_path)} ({settings.describe()}) and "
                f"{_relative(meta_path)}.\nCommit both: [bold]git add {_relative(config_path)} "
                f'{_relative(meta_path)} && git commit -m "nexus init"[/]'
            ),
        )

    run(out, action)


@app.command()
def store(
    file: Annotated[Path, typer.Argument(help="The weights file to store.", show_default=False)],
    model_name: ModelArg,
    message: Annotated[str, typer.Option("-m", "--message", help="A note for this version.")] = "",
    metric: Annotated[
        list[str] | None, typer.Option("--metric", help="name=number; repeat for more.")
    ] = None,
    signature: Annotated[
        str | None, typer.Option("--signature", help="Inputs and outputs as JSON.")
    ] = None,
    input_shape: Annotated[
        str | None, typer.Option("--input-shape", help="One sample's shape, like 3,224,224.")
    ] = None,
    allow_dirty: Annotated[
        bool, typer.Option("--allow-dirty", help="Store even with uncommitted changes.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace other bytes stored at this commit.")
    ] = False,
    no_latest: Annotated[
        bool, typer.Option("--no-latest", help="Record the version without making it latest.")
    ] = False,
    json_: JsonOpt = False,
    meta: MetaOpt = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Upload FILE as MODEL_NAME's version at the current git commit."""
    out = Output(json_, debug)

    def action() -> None:
        validate_model_name(model_name)
        if signature is not None and input_shape is not None:
            raise UsageError("give --signature or --input-shape, not both")
        parsed_signature = None
        if signature is not None:
            parsed_signature = parse_signature_json(signature)
        elif input_shape is not None:
            parsed_signature = signature_from_input_shape(input_shape)
        metrics = _parse_metrics(metric or [])
        project = Project.open(meta, config)
        result = project.store(
            file, model_name, message=message, metrics=metrics, signature=parsed_signature,
            allow_dirty=allow_dirty, force=force, make_latest=not no_latest,
            progress=out.progress,
        )  # fmt: skip
        record = result.record

        def human() -> None:
            where = f"{project.store_backend.describe()}/{record.storage_uri}"
            verb = "Stored" if result.uploaded else "Already stored (nothing uploaded):"
            latest = " [green](latest)[/]" if record.is_latest else ""
            console.say(
                f"{verb} {record.model_name}@{record.short_commit}{latest}, "
                f"{console.human_size(record.size_bytes)}, {record.format}, "
                f"sha256 {record.sha256[:12]}\n  → {where}"
            )
            console.say(_commit_hint(project, f"nexus: store {model_name}@{record.short_commit}"))

        out.emit({**record.to_dict(), "uploaded": result.uploaded}, human)

    run(out, action)


@app.command("list")
def list_(
    model_name: Annotated[
        str | None, typer.Argument(help="Only this model's versions.", show_default=False)
    ] = None,
    json_: JsonOpt = False,
    meta: MetaOpt = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Show recorded versions, newest first."""
    out = Output(json_, debug)

    def action() -> None:
        if model_name is not None:
            validate_model_name(model_name)
        versions = Project.open(meta, config).list_versions(model_name)

        def human() -> None:
            if versions:
                console.versions_table(versions)
            else:
                console.say("No model versions recorded yet: run `nexus store FILE MODEL_NAME`.")

        out.emit([record.to_dict() for record in versions], human)

    run(out, action)


@app.command()
def load(
    model_name: ModelArg,
    commit: CommitOpt = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Where to write the file.")
    ] = None,
    json_: JsonOpt = False,
    meta: MetaOpt = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Download a version, verified by size and sha256 before it appears."""
    out = Output(json_, debug)

    def action() -> None:
        validate_model_name(model_name)
        result = Project.open(meta, config).load(
            model_name, commit=commit, output=output, progress=out.progress
        )
        out.emit(
            {
                "model_name": result.model_name,
                "commit_hash": result.commit_hash,
                "path": str(result.path),
                "sha256": result.sha256,
                "size_bytes": result.size_bytes,
            },
            lambda: console.say(
                f"Loaded {result.model_name}@{result.commit_hash[:7]} → {_relative(result.path)} "
                f"({console.human_size(result.size_bytes)}, sha256 verified)"
            ),
        )

    run(out, action)


@app.command()
def rollback(
    model_name: ModelArg,
    to: Annotated[
        str | None, typer.Option("--to", help="Commit hash or prefix [default: the previous].")
    ] = None,
    json_: JsonOpt = False,
    meta: MetaOpt = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Make the previous version (or --to) the latest. Uploads nothing."""
    out = Output(json_, debug)

    def action() -> None:
        validate_model_name(model_name)
        project = Project.open(meta, config)
        result = project.rollback(model_name, to=to)

        def human() -> None:
            console.say(
                f"{result.model_name}: latest is now {result.to_commit[:7]} "
                f"(was {result.from_commit[:7]})"
            )
            console.say(
                _commit_hint(project, f"nexus: roll {model_name} back to {result.to_commit[:7]}")
            )

        out.emit(
            {
                "model_name": result.model_name,
                "from_commit": result.from_commit,
                "to_commit": result.to_commit,
            },
            human,
        )

    run(out, action)


@app.command()
def verify(
    model_name: Annotated[
        str | None, typer.Argument(help="Only this model's versions.", show_default=False)
    ] = None,
    json_: JsonOpt = False,
    meta: MetaOpt = None,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Re-check every stored object against its record, by its bytes."""
    out = Output(json_, debug)
    exit_code = 0

    def action() -> None:
        nonlocal exit_code
        if model_name is not None:
            validate_model_name(model_name)
        results = Project.open(meta, config).verify(model_name, progress=out.progress)
        counts = {status: sum(r.status == status for r in results)
                  for status in ("ok", "missing", "mismatch")}  # fmt: skip
        exit_code = 7 if counts["mismatch"] else 4 if counts["missing"] else 0

        def human() -> None:
            if not results:
                console.say("No model versions recorded yet: nothing to verify.")
                return
            console.verify_table(results)
            console.say(
                f"{counts['ok']} ok, {counts['missing']} missing, {counts['mismatch']} mismatched"
            )

        payload = {
            "ok": exit_code == 0,
            "counts": counts,
            "results": [
                {
                    "model_name": r.record.model_name,
                    "commit_hash": r.record.commit_hash,
                    "storage_uri": r.record.storage_uri,
                    "status": r.status,
                    "detail": r.detail,
                }
                for r in results
            ],
        }
        out.emit(payload, human)
        if exit_code and not out.json:
            console.error("some stored objects do not match their records")

    run(out, action)
    if exit_code:
        raise typer.Exit(exit_code)


def main() -> None:
    """Console-script entry point: like ``app()``, but usage errors also speak JSON."""
    release_freed_buffers_early()
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        console.error("interrupted")
        code = 130
    except TyperException as exc:  # a usage error found while parsing the command line
        message = exc.format_message().strip()
        if not message:  # `nexus` alone: the help was shown
            sys.exit(getattr(exc, "exit_code", 2))
        if "--json" in sys.argv[1:]:
            error = {"error": {"code": "usage_error", "message": message}}
            sys.stdout.write(json.dumps(error) + "\n")
        console.error(message)
        context = getattr(exc, "ctx", None)
        if context is not None:
            console.stderr.print(context.get_usage())
        code = getattr(exc, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
