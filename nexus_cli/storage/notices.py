"""One-line notices from the storage layer (a retry under way) for a person at a terminal.

Backends log them to the ``nexus_cli.storage`` logger at WARNING. Unless the
application configures logging itself, they are written to stderr when stderr is a
terminal, and dropped otherwise: stdout stays clean for ``--json``, and a CI log or a
test that expects exactly one error line on stderr sees only the error.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("nexus_cli.storage")


class TerminalNotices(logging.Handler):
    """Writes each record as ``nexus: <message>`` to stderr, only when it is a terminal.

    ``sys.stderr`` is looked up at each record, so a progress display that redirects it
    (Rich does) prints the notice above its bars.
    """

    def emit(self, record: logging.LogRecord) -> None:
        stream = sys.stderr
        try:
            if stream is None or not stream.isatty():
                return
            stream.write(f"nexus: {record.getMessage()}\n")
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr: nowhere to say it
            pass


if not logger.handlers:
    logger.addHandler(TerminalNotices(logging.WARNING))


def notice(message: str) -> None:
    """Tell a person at the terminal what is happening (one line, no newlines)."""
    logger.warning(" ".join(message.split()))
