"""``nexus-proxy`` / ``python -m proxy``: settings -> app -> uvicorn.

A SIGTERM or Ctrl-C first marks the proxy draining (new requests get 503, ``/readyz``
turns 503 so load balancers stop sending), then uvicorn stops accepting connections,
waits for the requests in flight, and the lifespan drains the batcher.
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="nexus-proxy",
        description="NexusML batching proxy. Configured by NEXUS_* environment variables "
        "(NEXUS_MODEL_SERVER_URL, NEXUS_MAX_BATCH_SIZE, NEXUS_MAX_WAIT_MS, NEXUS_PORT, ...); "
        "see the README.",
    )
    parser.parse_args(argv)

    from proxy.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"nexus-proxy: {exc}", file=sys.stderr)
        raise SystemExit(2) from None

    import uvicorn

    from proxy.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(message)s", stream=sys.stderr)
    app = create_app(settings)
    service = app.state.service

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:  # type: ignore[override]
            service.begin_drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        timeout_keep_alive=30,
    )
    DrainingServer(config).run()


if __name__ == "__main__":
    main()
