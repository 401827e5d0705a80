"""Redaction: what a log line, an error body or a stored error may never carry.

V2.md section 12a: no API key, webhook secret or ``Authorization`` value. In any text:

- a credential-like parameter (``api_key=…``, ``access_token=…``, ``token``, ``key``,
  ``secret``, ``password``, ``signature``, and names ending in those words, such as
  ``client_secret`` or ``x-api-key``) keeps its name and loses its value;
- any value starting ``olk_`` (an Outlast API key) or ``whsec_`` (a webhook secret);
- an ``Authorization`` header's value, a ``Bearer``/``Basic`` credential, and the
  password of a ``scheme://user:password@host`` URL.

Each becomes ``[redacted]``. :class:`RedactionFilter` applies this to every log record
(its message and arguments, its extra fields, its traceback); :func:`redact` to any
JSON-like value (an error body).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[redacted]"

# Parameter names (the last word of a compound name) whose values are credentials.
_CREDENTIAL_WORDS = (
    r"api_?key|apikey|key|access_?token|token|secret|password|passwd|signature|sig|"
    r"auth|authorization|credentials?|cookie"
)
_NAME = rf"(?:[A-Za-z0-9]+[_.-])*(?:{_CREDENTIAL_WORDS})"

# name=value in a query string, a form body, a "k=v" log field or a shell line.
_PARAM = re.compile(rf"(?i)(?<![A-Za-z0-9_.-])({_NAME})=(?!\[redacted\])[^&\s\"'#;,)\]}}]*")
# "name": "value" and 'name': 'value' (JSON, a Python repr) and "Name: value" headers.
_QUOTED = re.compile(
    rf"(?i)([\"']?)(?<![A-Za-z0-9_.-])({_NAME})\1(\s*:\s*)([\"'])(?!\[redacted\]).*?(?<!\\)\4"
)
_HEADER = re.compile(
    r"(?i)(?<![A-Za-z0-9_-])((?:proxy-)?authorization|cookie|set-cookie|webhook-signature)"
    r"(\s*:[ \t]*)(?![\"'\s])(?!\[redacted\])[^\r\n,}\]]+"
)
_BEARER = re.compile(r"(?i)\b(bearer)(\s+|%20|\+)(?!\[redacted\])[A-Za-z0-9._~+/=-]{6,}")
# Outlast's own secrets, wherever they stand (glued to other text, URL-encoded or not).
_OUTLAST_SECRET = re.compile(r"olk_[A-Za-z0-9_-]*|whsec_(?:[A-Za-z0-9+/=]|%[0-9A-Fa-f]{2})*")
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*):(?!\[redacted\])[^/\s@]+@")

_CREDENTIAL_KEY = re.compile(rf"(?i)^{_NAME}$")

# Cheap pre-check: most log lines contain none of these, and skip the regexes.
_TRIGGERS = re.compile(rf"(?i)olk_|whsec_|{_CREDENTIAL_WORDS}|bearer|basic|cookie|://[^/\s]*@")


def redact_text(text: str) -> str:
    """``text`` with every credential replaced by ``[redacted]``."""
    if not text or not _TRIGGERS.search(text):
        return text
    text = _OUTLAST_SECRET.sub(REDACTED, text)
    text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    text = _HEADER.sub(rf"\1\2{REDACTED}", text)
    text = _QUOTED.sub(rf"\1\2\1\3\4{REDACTED}\4", text)
    text = _PARAM.sub(rf"\1={REDACTED}", text)
    text = _BEARER.sub(rf"\1\2{REDACTED}", text)
    return text


def is_credential_name(name: str) -> bool:
    """Whether a field called ``name`` holds a credential (``api_key``, ``Authorization``…)."""
    return bool(_CREDENTIAL_KEY.match(name.strip()))


def redact(value: Any, *, by_name: bool = True, _depth: int = 0) -> Any:
    """A copy of a JSON-like ``value`` with every credential redacted: strings as in
    :func:`redact_text`; with ``by_name``, also the whole value of a mapping key that
    names a credential (``{"api_key": …}``, ``{"Authorization": …}``)."""
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float) or _depth > 20:
        return value
    if isinstance(value, Mapping):
        return {
            k: (
                REDACTED
                if by_name and isinstance(k, str) and is_credential_name(k) and v not in (None, "")
                else redact(v, by_name=by_name, _depth=_depth + 1)
            )
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        items = [redact(v, by_name=by_name, _depth=_depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    # Any other object is logged through its text: redact that text when it needs it.
    try:
        text = str(value)
    except Exception:  # an object whose __str__ fails is left to the formatter
        return value
    redacted = redact_text(text)
    return value if redacted == text else redacted


# The attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_FORMATTER = logging.Formatter()


class RedactionFilter(logging.Filter):
    """Redacts a record before any formatter sees it: the message with its arguments,
    every extra field, the traceback (rendered here into ``exc_text``) and the stack."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            _redact_record(record)
        except Exception:  # never lose a line to redaction: lose its text instead
            record.msg, record.args = "[log line dropped by redaction]", ()
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def _redact_record(record: logging.LogRecord) -> None:
    if isinstance(record.msg, Mapping):
        record.msg = redact(record.msg)
        record.args = redact(record.args) if record.args else record.args
    else:
        _redact_message(record)
    if record.exc_info:
        # Rendered here so that every formatter (text or JSON) prints the redacted text.
        record.exc_text = redact_text(_FORMATTER.formatException(record.exc_info))
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    for name, value in list(record.__dict__.items()):
        if name in _RECORD_ATTRIBUTES or name.startswith("_"):
            continue
        if is_credential_name(name) and value not in (None, ""):
            setattr(record, name, REDACTED)
        elif not isinstance(value, bool | int | float) and value is not None:
            setattr(record, name, redact(value))


def _redact_message(record: logging.LogRecord) -> None:
    """Redact the arguments and keep them (formatters may read them, as the console
    formatter reads Celery's); when the message they make still needs redaction (a
    credential made of the format and an argument together), keep the rendered text."""
    if record.args:
        record.args = redact(record.args)
    try:
        message = record.getMessage()
    except Exception:  # arguments that do not fit the format: keep both, redacted
        record.msg, record.args = redact_text(f"{record.msg} {record.args!r}"), ()
        return
    redacted = redact_text(message)
    if redacted != message:
        record.msg, record.args = redacted, ()
