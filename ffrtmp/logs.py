"""Logging setup for every subcommand: text or one JSON object per line, stderr or a file."""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# LogRecord attributes that are not caller-supplied `extra=` fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
# C0 and C1 controls, DEL, and the Unicode line/paragraph separators: anything that could end a
# line or drive a terminal. Names and error texts from the network pass through log messages.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# What json.dumps(ensure_ascii=False) leaves raw of those (it escapes C0 itself).
_JSON_RAW = re.compile("[\x7f-\x9f\u2028\u2029]")


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def escape(text: str) -> str:
    """text with control characters written repr-style (\\n, \\x1b, \\u2028): one line."""
    return _CONTROL.sub(_escape_char, text)


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT with the message escaped, so a record is exactly one line; a traceback or
    stack follows on lines indented by four spaces (escaped too), so only a record's own line
    starts at column 0 and untrusted text cannot forge one."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        """The record as one escaped line, plus an indented traceback if any."""
        record.message = escape(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        out = self.formatMessage(record)
        blocks = []
        if record.exc_info:
            blocks.append(self.formatException(record.exc_info))
        elif record.exc_text:
            blocks.append(record.exc_text)
        if record.stack_info:
            blocks.append(self.formatStack(record.stack_info))
        for block in blocks:
            out += "".join(f"\n    {escape(line)}" for line in block.split("\n"))
        return out


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601 UTC), level, logger, msg, pid, plus any `extra=`
    fields and the formatted exception, so a log shipper needs no parsing rules."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc)
            .isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        text = json.dumps(out, default=str, ensure_ascii=False)
        return _JSON_RAW.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def setup(level: str = "info", fmt: str = "text", path: str | None = None) -> None:
    """Configure the root logger once: level name, 'text' or 'json', stderr or a file.

    A file is opened with WatchedFileHandler, so logrotate can move it away (no copytruncate):
    the next record reopens the path.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler: logging.Handler
    if path:
        from logging.handlers import WatchedFileHandler  # only with --log-file

        handler = WatchedFileHandler(path, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
