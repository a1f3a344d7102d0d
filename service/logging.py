"""Structured logs: structlog and stdlib loggers (uvicorn, grpc, ...) rendered alike to stderr.

Every line carries ``timestamp`` (ISO 8601, UTC), ``level``, ``event``, ``logger`` and the
keys bound to it, as one JSON object (``json``) or a human-readable line (``console``).
uvicorn installs handlers of its own unless started with ``log_config=None``.
"""

from __future__ import annotations

import logging
import sys
from typing import Final

import structlog
from structlog.typing import Processor

__all__ = ["FORMATS", "LEVELS", "configure_logging"]

LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS: Final = ("json", "console")

# Libraries that may have attached handlers of their own: their records go to the root.
_ADOPTED: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", "grpc", "asyncio", "py.warnings")


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (as ``logging.lastResort``
    does), so a replaced stream (a test's capture, a closed pipe) is never written after."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def configure_logging(level: str, fmt: str) -> None:
    """Send every log record, structlog's and the stdlib's, to stderr as ``fmt`` lines at
    ``level`` or above. Calling it again replaces the previous setup."""
    threshold = LEVELS.get(level.lower())
    if threshold is None:
        raise ValueError(f"log level must be one of {list(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {list(FORMATS)}, got {fmt!r}")

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # The structlog side is the same for every level and format, so loggers cached before a
    # reconfiguration stay right: filtering and rendering happen in the root handler below.
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.PositionalArgumentsFormatter(),
            structlog.processors.StackInfoRenderer(),
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    renderer: list[Processor]
    if fmt == "json":
        renderer = [
            structlog.processors.format_exc_info,
            structlog.processors.UnicodeDecoder(),
            structlog.processors.JSONRenderer(),
        ]
    else:
        renderer = [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *renderer],
        )
    )

    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(threshold)
    for name in _ADOPTED:
        adopted = logging.getLogger(name)
        adopted.handlers.clear()
        adopted.propagate = True
        adopted.setLevel(logging.NOTSET)
    logging.captureWarnings(True)
