"""`nexus`: the command line over the Python API. Parse, call, render; nothing else.

Every command is declared with ``@command``, which gives it the shared options
(``--json``, ``--debug``, and for commands on a project ``--meta`` and ``--config``),
an ``Output``, and the mapping of each error to one line and the exit code of its
class (see ``nexus_cli.errors``). A command body returns a ``Reply``: the JSON payload
and how to render it for a person.

Startup time matters (``nexus --help`` runs in CI logs and shells): this module imports
only Typer. The API, git, storage SDKs and Rich (``console``) are imported by the
commands that use them.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.exceptions import TyperException

from nexus_cli import __version__
from nexus_cli.errors import NexusError, UsageError

if TYPE_CHECKING:
    from nexus_cli.api import ProgressReporter, Project

HELP_OPTION_NAMES = ["-h", "--help"]

app = typer.Typer(
    name="nexus",
    help="Tie model weights to git commits: store, list, load, roll back and verify them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help: Rich's markup mode would eat "[default: ...]" and costs startup time
    rich_markup_mode=None,
    context_settings={"help_option_names": HELP_OPTION_NAMES},
)

# Options every command shares, declared once and added by @command.
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")]
MetaOpt = Annotated[
    Path | None,
    typer.Option(
        "--meta",
        metavar="PATH",
        help="Metadata file [default: .nexus_meta.json at the git root].",
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", metavar="PATH", help="Config file [default: .nexusrc beside --meta]."),
]
ModelArg = Annotated[
    str,
    typer.Argument(metavar="MODEL_NAME", help="Model name, like prod_model.", show_default=False),
]
OptionalModelArg = Annotated[
    str | None,
    typer.Argument(metavar="MODEL_NAME", help="Only this model's versions.", show_default=False),
]
CommitOpt = Annotated[
    str | None,
    typer.Option("--commit", metavar="SHA", help="Commit hash or prefix [default: the latest]."),
]


# how a command reports ------------------------------------------------------------------


@dataclass
class Reply:
    """What a command body returns: the JSON payload and its rendering for a person.

    ``error`` makes the command fail after its payload is shown (``verify`` reports its
    results and then exits with the code of what it found).
    """

    payload: Any
    human: Callable[[], None] = lambda: None
    error: NexusError | None = None


@dataclass
class Output:
    """How a command reports: JSON for machines or Rich for people."""

    json: bool
    debug: bool

    @property
    def progress(self) -> ProgressReporter:
        if self.json:
            from nexus_cli.api import silent_progress

            return silent_progress
        from nexus_cli import console

        return console.progress_bar

    def emit(self, reply: Reply) -> None:
        if self.json:
            payload = reply.payload
            if reply.error is not None:
                payload = {**payload, "error": _error_object(reply.error)}
            sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
        else:
            reply.human()
        if reply.error is not None:
            from nexus_cli import console

            console.error(str(reply.error))
            raise typer.Exit(reply.error.exit_code)

    def fail(self, code: str, message: str, exit_code: int) -> typer.Exit:
        if self.json:
            error = {"error": {"code": code, "message": message}}
            sys.stdout.write(json.dumps(error) + "\n")
        from nexus_cli import console

        console.error(message)
        return typer.Exit(exit_code)


def _error_object(error: NexusError) -> dict[str, str]:
    return {"code": error.code, "message": str(error)}


@dataclass
class Invocation:
    """What every command body gets: the output and the shared options."""

    out: Output
    meta: Path | None = None
    config: Path | None = None
    _project: Project | None = field(default=None, repr=False)

    def project(self, *, require_meta: bool = True) -> Project:
        """The project the options name; a ``--meta`` that does not exist is refused
        unless the command creates it (``require_meta=False``)."""
        from nexus_cli.api import Project

        if self._project is None:
            self._project = Project.open(
                self.meta, self.config, require_meta=require_meta, on_wait=_say_waiting
            )
        return self._project


def _say_waiting(lock_path: Path) -> None:
    from nexus_cli import console

    console.note(
        "waiting for another nexus command to finish (it holds {lock}) ...", lock=lock_path
    )


def _run(out: Output, action: Callable[[], Reply]) -> None:
    """Run a command body and show its reply, turning every error into one line and an
    exit code (rendering included: a failure while printing is still one line)."""
    try:
        out.emit(action())
    except typer.Exit:
        raise
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


def command(name: str | None = None, *, on_project: bool = True) -> Callable:
    """Register ``body(invocation, **arguments) -> Reply`` as a command.

    Adds ``--json`` and ``--debug`` (and ``--meta``/``--config`` when ``on_project``) to
    the options Typer sees, builds the ``Invocation``, and maps errors to exit codes.
    """

    def register(body: Callable[..., Reply]) -> Callable[..., Reply]:
        own = list(inspect.signature(body, eval_str=True).parameters.values())[1:]
        shared = [("json_", JsonOpt), ("debug", DebugOpt)]
        if on_project:
            shared += [("meta", MetaOpt), ("config", ConfigOpt)]
        parameters = own + [
            inspect.Parameter(
                key,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=annotation,
                default=None if key in ("meta", "config") else False,
            )
            for key, annotation in shared
        ]

        def invoke(**arguments: Any) -> None:
            out = Output(arguments.pop("json_"), arguments.pop("debug"))
            invocation = Invocation(out)
            if on_project:
                invocation.meta, invocation.config = arguments.pop("meta"), arguments.pop("config")
            _run(out, lambda: body(invocation, **arguments))

        invoke.__name__ = body.__name__
        invoke.__doc__ = body.__doc__
        invoke.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        invoke.__annotations__ = {p.name: p.annotation for p in parameters}
        app.command(name)(invoke)
        return body

    return register


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"nexus {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Tie model weights to git commits: store, list, load, roll back and verify them."""


# helpers --------------------------------------------------------------------------------


def _relative(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


def _quoted(path: Path) -> str:
    """A path as a shell word: quoted when it holds anything a shell would split or expand."""
    text = _relative(path)
    return text if re.fullmatch(r"[\w./@%+=:,-]+", text) else "'" + text.replace("'", "'\\''") + "'"


def _commit_hint(paths: list[Path], summary: str) -> None:
    """Tell how to commit ``paths``; a link is named by its target, the file that changed
    (``git add`` of the link would stage nothing)."""
    from nexus_cli import console

    console.say(
        'Commit the metadata: [bold]git add {paths} && git commit -m "{summary}"[/]',
        paths=" ".join(_quoted(p.resolve() if p.is_symlink() else p) for p in paths),
        summary=summary,
    )


def _parse_metrics(pairs: list[str]) -> dict[str, float]:
    from nexus_cli.names import shown

    metrics = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            metrics[name.strip()] = float(value)
        except ValueError:
            raise UsageError(
                f"--metric {shown(pair)}: write it as name=number, like acc=0.93"
            ) from None
    return metrics


DURATION_RE = re.compile(r"([0-9]{1,6})([smhdw])")
DURATION_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """``30m``, ``12h``, ``1d``, ``2w`` as a ``timedelta``."""
    from nexus_cli.names import shown

    match = DURATION_RE.fullmatch(text.strip())
    if not match:
        raise UsageError(
            f"--older-than {shown(text)}: give a number and a unit (s, m, h, d, w), like 12h or 2w"
        )
    return timedelta(**{DURATION_UNITS[match.group(2)]: int(match.group(1))})


def _validate_model_name(name: str | None) -> None:
    if name is not None:
        from nexus_cli.names import validate_model_name

        validate_model_name(name)


def _release_transfer_buffers() -> None:
    from nexus_cli.transfer import release_freed_buffers_early

    release_freed_buffers_early()


# commands -------------------------------------------------------------------------------


@command(on_project=False)
def init(
    run: Invocation,
    provider: Annotated[str, typer.Option(help="local, s3, minio or gcs.")] = "local",
    bucket: Annotated[str, typer.Option(help="Bucket (s3, minio, gcs).")] = "",
    prefix: Annotated[str, typer.Option(help="Key prefix inside the bucket.")] = "",
    endpoint_url: Annotated[str, typer.Option(help="S3-compatible endpoint (minio).")] = "",
    region: Annotated[str, typer.Option(help="Region (s3, minio).")] = "",
    path: Annotated[str, typer.Option("--path", help="Local store folder.")] = ".nexus/store",
    force: Annotated[bool, typer.Option(help="Overwrite an existing .nexusrc.")] = False,
    meta: MetaOpt = None,
    config: ConfigOpt = None,
) -> Reply:
    """Write .nexusrc, an empty .nexus_meta.json and .gitattributes; git-ignore a local store."""
    from nexus_cli.api import MERGE_DRIVER_SETUP, init_project
    from nexus_cli.config import resolve_config
    from nexus_cli.gitrepo import worktree_root

    values = {"provider": provider, "bucket": bucket, "prefix": prefix, "path": path,
              "endpoint_url": endpoint_url, "region": region}  # fmt: skip
    settings = resolve_config(values, environ={})
    meta_path = meta.absolute() if meta else worktree_root() / ".nexus_meta.json"
    result = init_project(
        meta_path.parent, settings, force=force, meta_path=meta_path, config_path=config
    )
    written = [result.config_path, result.meta_path]
    if result.gitattributes_path is not None:
        written.append(result.gitattributes_path)

    def human() -> None:
        from nexus_cli import console

        console.say(
            "Wrote {files} ({where}).",
            files=", ".join(_relative(path) for path in written),
            where=settings.describe(),
        )
        console.say(
            "Enable the merge driver for .nexus_meta.json once per clone: [bold]{setup}[/]",
            setup=MERGE_DRIVER_SETUP,
        )
        _commit_hint(written, "nexus init")

    return Reply(
        {
            "config": str(result.config_path),
            "meta": str(result.meta_path),
            "gitattributes": str(result.gitattributes_path or "") or None,
            "provider": settings.provider,
            "merge_driver_setup": MERGE_DRIVER_SETUP,
        },
        human,
    )


@command()
def store(
    run: Invocation,
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="The weights file to store.", show_default=False),
    ],
    model_name: ModelArg,
    message: Annotated[
        str, typer.Option("-m", "--message", metavar="TEXT", help="A note for this version.")
    ] = "",
    metric: Annotated[
        list[str] | None,
        typer.Option("--metric", metavar="NAME=NUMBER", help="A metric; repeat for more."),
    ] = None,
    signature: Annotated[
        str | None, typer.Option("--signature", metavar="JSON", help="Inputs and outputs.")
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option("--input-shape", metavar="DIMS", help="One sample's shape, like 3,224,224."),
    ] = None,
    allow_dirty: Annotated[
        bool, typer.Option("--allow-dirty", help="Store even with uncommitted changes.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace other bytes stored at this commit; repair a damaged object."
        ),
    ] = False,
    no_latest: Annotated[
        bool, typer.Option("--no-latest", help="Record the version without making it latest.")
    ] = False,
) -> Reply:
    """Upload FILE as MODEL_NAME's version at the current git commit."""
    from nexus_cli.signature import parse_signature_json, signature_from_input_shape

    _validate_model_name(model_name)
    if signature is not None and input_shape is not None:
        raise UsageError("give --signature or --input-shape, not both")
    parsed_signature = None
    if signature is not None:
        parsed_signature = parse_signature_json(signature)
    elif input_shape is not None:
        parsed_signature = signature_from_input_shape(input_shape)
    metrics = _parse_metrics(metric or [])
    project = run.project(require_meta=False)
    _release_transfer_buffers()
    result = project.store(
        file, model_name, message=message, metrics=metrics, signature=parsed_signature,
        allow_dirty=allow_dirty, force=force, make_latest=not no_latest,
        progress=run.out.progress,
    )  # fmt: skip
    record = result.record

    def human() -> None:
        from nexus_cli import console

        console.say(
            "{verb} {model}@{commit}{latest}, {size}, {format}, sha256 {sha}\n  {arrow} {where}",
            verb="Stored" if result.uploaded else "Already stored (nothing uploaded):",
            model=record.model_name,
            commit=record.short_commit,
            latest=" (latest)" if record.is_latest else "",
            size=console.human_size(record.size_bytes),
            format=record.format,
            sha=record.sha256[:12],
            arrow=console.symbol("→", "->"),
            where=f"{project.store_backend.describe()}/{record.storage_uri}",
        )
        _commit_hint([project.meta_path], f"nexus: store {model_name}@{record.short_commit}")

    return Reply({**record.to_dict(), "uploaded": result.uploaded}, human)


@command("list")
def list_(run: Invocation, model_name: OptionalModelArg = None) -> Reply:
    """Show recorded versions, newest first."""
    _validate_model_name(model_name)
    versions = run.project().list_versions(model_name)

    def human() -> None:
        from nexus_cli import console

        if versions:
            console.versions_table(versions)
        else:
            console.say("No model versions recorded yet: run `nexus store FILE MODEL_NAME`.")

    return Reply([record.to_dict() for record in versions], human)


@command()
def load(
    run: Invocation,
    model_name: ModelArg,
    commit: CommitOpt = None,
    output: Annotated[
        str | None,  # not Path: a trailing "/" (a folder to create) must survive
        typer.Option(
            "-o",
            "--output",
            metavar="PATH",
            help="Where to write the file: a file, or a folder (one that exists, or ends in /).",
        ),
    ] = None,
) -> Reply:
    """Download a version, verified by size and sha256 before it appears."""
    _validate_model_name(model_name)
    project = run.project()
    _release_transfer_buffers()
    result = project.load(model_name, commit=commit, output=output, progress=run.out.progress)

    def human() -> None:
        from nexus_cli import console

        console.say(
            "Loaded {model}@{commit} {arrow} {path} ({size}, sha256 verified)",
            model=result.model_name,
            commit=result.commit_hash[:7],
            arrow=console.symbol("→", "->"),
            path=_relative(result.path),
            size=console.human_size(result.size_bytes),
        )

    return Reply(
        {
            "model_name": result.model_name,
            "commit_hash": result.commit_hash,
            "path": str(result.path),
            "sha256": result.sha256,
            "size_bytes": result.size_bytes,
        },
        human,
    )


@command()
def rollback(
    run: Invocation,
    model_name: ModelArg,
    to: Annotated[
        str | None,
        typer.Option("--to", metavar="SHA", help="Commit hash or prefix [default: the previous]."),
    ] = None,
) -> Reply:
    """Make the previous version (or --to) the latest. Uploads nothing."""
    _validate_model_name(model_name)
    project = run.project()
    result = project.rollback(model_name, to=to)

    def human() -> None:
        from nexus_cli import console

        console.say(
            "{model}: latest is now {to} (was {was})",
            model=result.model_name,
            to=result.to_commit[:7],
            was=result.from_commit[:7],
        )
        _commit_hint(
            [project.meta_path], f"nexus: roll {model_name} back to {result.to_commit[:7]}"
        )

    return Reply(
        {
            "model_name": result.model_name,
            "from_commit": result.from_commit,
            "to_commit": result.to_commit,
        },
        human,
    )


@command()
def verify(run: Invocation, model_name: OptionalModelArg = None) -> Reply:
    """Re-check every stored object against its record, by its bytes."""
    from nexus_cli.errors import IntegrityError, NotFoundError

    _validate_model_name(model_name)
    project = run.project()
    _release_transfer_buffers()
    results = project.verify(model_name, progress=run.out.progress)
    counts = {status: sum(r.status == status for r in results)
              for status in ("ok", "missing", "mismatch")}  # fmt: skip
    error: NexusError | None = None
    if counts["mismatch"]:
        error = IntegrityError(
            f"{counts['mismatch']} stored object(s) do not match their records"
            + (f" and {counts['missing']} are missing" if counts["missing"] else ""),
            hint="`nexus store FILE MODEL --force` at the version's commit re-uploads one",
        )
    elif counts["missing"]:
        error = NotFoundError(f"{counts['missing']} stored object(s) are missing from the store")

    def human() -> None:
        from nexus_cli import console

        if not results:
            console.say("No model versions recorded yet: nothing to verify.")
            return
        console.verify_table(results)
        console.say(
            "{ok} ok, {missing} missing, {mismatch} mismatched",
            ok=counts["ok"],
            missing=counts["missing"],
            mismatch=counts["mismatch"],
        )

    payload = {
        "ok": error is None,
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
    return Reply(payload, human, error)


@command()
def gc(
    run: Invocation,
    older_than: Annotated[
        str,
        typer.Option(
            "--older-than", metavar="DURATION", help="Only what is older, like 30m, 12h, 1d, 2w."
        ),
    ] = "1d",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")
    ] = False,
) -> Reply:
    """Remove what interrupted uploads left in the store. Never a stored version."""
    age = parse_duration(older_than)
    result = run.project().gc(age, dry_run=dry_run)

    def human() -> None:
        from nexus_cli import console

        if not result.leftovers:
            console.say("Nothing to clean up older than {age}.", age=older_than)
            return
        console.gc_table(result.leftovers, dry_run=dry_run)
        console.say(
            "{count} leftover(s), {size}{note}",
            count=len(result.leftovers),
            size=console.human_size(result.total_bytes),
            note=" (dry run: nothing removed)" if dry_run else " removed",
        )

    return Reply(
        {
            "dry_run": dry_run,
            "older_than": older_than,
            "count": len(result.leftovers),
            "bytes": result.total_bytes,
            "leftovers": [
                {
                    "kind": leftover.kind,
                    "name": leftover.name,
                    "size": leftover.size,
                    "started_at": leftover.started_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "upload_id": leftover.upload_id,
                }
                for leftover in result.leftovers
            ],
        },
        human,
    )


@command("merge-driver", on_project=False)
def merge_driver(
    run: Invocation,
    base: Annotated[Path, typer.Argument(metavar="BASE", help="The common ancestor (git's %O).")],
    ours: Annotated[
        Path, typer.Argument(metavar="OURS", help="Our side, where the result goes (%A).")
    ],
    theirs: Annotated[Path, typer.Argument(metavar="THEIRS", help="Their side (%B).")],
) -> Reply:
    """Git merge driver for .nexus_meta.json: union of versions, one latest per model."""
    from nexus_cli.api import merge_metadata_files

    merged = merge_metadata_files(base, ours, theirs)
    return Reply({"models": {name: len(v) for name, v in merged.models.items()}})


def _tolerate_unencodable_output() -> None:
    """Have stdout and stderr replace what their encoding cannot write (``PYTHONIOENCODING
    =ascii``) instead of failing halfway through a command."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None and getattr(stream, "errors", "strict") == "strict":
            try:
                reconfigure(errors="replace")
            except (ValueError, OSError):
                continue


#: how the command line's plain types are read, without Typer's pydantic adapters
_PLAIN_TYPES: dict[Any, Callable[[Any], Any]] = {
    str: str,
    bool: bool,
    Path: Path,
    list[str]: lambda values: [str(value) for value in values],
}


def _skip_pydantic_coercion(command: Any) -> None:
    """Read ``str``, ``bool``, ``Path`` and ``list[str]`` parameters without pydantic.

    Typer 0.29 coerces every parameter through a pydantic ``TypeAdapter``, and importing
    pydantic for that is a third of what `nexus list` costs (~0.1 s on 2 cores). Our
    parameters are plain types, so each gets a converter of its own. This leans on
    Typer internals (``_runtime_param``); where they differ it changes nothing and Typer
    coerces as usual, only slower: any error while installing the converters stops the
    installation (each parameter holds either its converter or Typer's own).
    """
    with contextlib.suppress(Exception):  # Typer's internals changed: keep its coercion
        _install_plain_converters(command)


def _install_plain_converters(command: Any) -> None:
    from typer._click import Context
    from typer._coercion import RuntimeParam
    from typer.core import _TyperParameter

    @dataclass(frozen=True)
    class PlainParam(RuntimeParam):
        convert: Callable[[Any], Any]

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            return self.convert(value)

    pending = [command]
    while pending:
        current = pending.pop()
        pending.extend(getattr(current, "commands", {}).values())
        # the help option is made (and cached) per command when first asked for
        context = Context(current, help_option_names=HELP_OPTION_NAMES)
        for param in current.get_params(context):
            descriptor = getattr(param, "type_descriptor", None)
            if (
                not isinstance(param, _TyperParameter)
                or getattr(param, "_runtime_param", False) is not None
                or descriptor is None
                or descriptor.file_annotation is not None
                or descriptor.parameter_info.parser is not None
            ):
                continue
            convert = _PLAIN_TYPES.get(descriptor.annotation)
            if convert is not None:
                param._runtime_param = PlainParam(
                    descriptor.parameter_info, descriptor.annotation, convert
                )


def main() -> None:
    """Console-script entry point: like ``app()``, but usage errors also speak JSON."""
    _tolerate_unencodable_output()
    try:
        command = typer.main.get_command(app)
        _skip_pydantic_coercion(command)
        code = command(standalone_mode=False)
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        from nexus_cli import console

        console.error("interrupted")
        code = 130
    except TyperException as exc:  # a usage error found while parsing the command line
        message = exc.format_message().strip()
        if not message:  # `nexus` alone: the help was shown
            sys.exit(getattr(exc, "exit_code", 2))
        if "--json" in sys.argv[1:]:
            error = {"error": {"code": "usage_error", "message": message}}
            sys.stdout.write(json.dumps(error) + "\n")
        from nexus_cli import console

        console.error(message)
        context = getattr(exc, "ctx", None)
        if context is not None:
            console.usage(context.get_usage())
        code = getattr(exc, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 0)


#: what writing to stdout fails with when the output cannot go anywhere: a full disk, a
#: reader that went away (`nexus list | head -1`), a broken device
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EPIPE, errno.EIO}


def run() -> NoReturn:
    """The ``nexus`` executable: ``main()``, then the end of the process, at once.

    When ``main`` is done, so is the command: files are closed, the metadata lock is
    released and every thread pool has been joined. What is left is the interpreter's
    teardown, which frees every module and object one by one and took ~50 ms of each
    command once boto3 was loaded (as long as the upload's own bookkeeping at 64 MiB).
    So the output is flushed and the process ends without it.
    """
    try:
        main()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRNOS:
            raise
        _say_output_failed(exc)
        code = 120
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    if "logging" in sys.modules:  # boto3 and google-cloud-storage load it
        sys.modules["logging"].shutdown()
    for stream in (sys.stdout, sys.stderr):  # stderr last: it may report stdout's failure
        try:
            stream.flush()
        except (OSError, ValueError) as exc:  # as Python's own exit would: status 120
            code = code or 120
            if stream is sys.stdout:
                _say_output_failed(exc)
    os._exit(code)


def _say_output_failed(exc: Exception) -> None:
    reason = getattr(exc, "strerror", None) or exc
    with contextlib.suppress(OSError, ValueError):  # stderr may be the broken one
        sys.stderr.write(f"error: cannot write the output: {reason}\n")


if __name__ == "__main__":
    run()
