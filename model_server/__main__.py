"""``nexus-model-server`` and ``python -m model_server``: settings -> app -> uvicorn.

Settings are checked before torch is imported: a bad variable is one line on stderr and
exit status 2, in a fraction of a second. Everything after that (no metadata, a store
that cannot be reached, a refused format) keeps the process up with ``/readyz`` at 503.
"""

from __future__ import annotations

import signal

# SIGHUP means "reload" once the app runs; until then (a second or more of imports) its
# default action would end the process: a config reloader's HUP during a start killed it
if hasattr(signal, "SIGHUP"):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

import logging  # noqa: E402 - after the SIGHUP guard, which must come first
import os  # noqa: E402
import sys  # noqa: E402

from model_server.settings import Settings, SettingsError  # noqa: E402


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"nexus-model-server: {exc}", file=sys.stderr)
        sys.exit(2)

    from model_server.memory import one_malloc_arena

    one_malloc_arena(os.environ)

    import uvicorn

    from model_server.app import create_app

    logging.getLogger("model_server").info(
        "starting on http://%s:%d (metadata %s, device %s, cache %s)",
        settings.host, settings.port, settings.meta_path, settings.device, settings.cache_dir,
    )  # fmt: skip
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
