"""Logging: one JSON object per line, or one short line for a person at a terminal.

``OUTLAST_LOG_FORMAT`` picks: ``json`` for log drains, ``console`` for people
(``15:04:05 worker INFO  tsk_… step 0: message``), ``auto`` (the default) console when
stdout is a terminal, else json. Both name the process (``web``, ``worker``, ``beat``, ``flower``).

Every line carries the fields bound in the current context (a ``contextvars`` dict, so
each thread and each request or Celery task has its own):

- worker lines: ``task_id`` and ``step`` (bound from a ``outlast.run_step`` message by the
  ``task_prerun`` signal), ``agent`` and ``attempt`` (bound by the step runner once it has
  loaded the task: :func:`bind`), ``celery_task`` and ``celery_id`` on every task;
- web lines: ``request_id`` (the caller's ``X-Request-Id`` when it is sane, else a new
  one; returned as ``X-Request-Id``), and the access line of every request with method,
  path, status and duration (gunicorn's access log through :class:`GunicornLogger`).

Every handler made here redacts credentials (:mod:`app.ops.redaction`) before
formatting: no API key, webhook secret or ``Authorization`` value reaches a line.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from app.ops.redaction import RedactionFilter, redact
from app.settings import Settings

_context: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "outlast_log_context", default=MappingProxyType({})
)

REQUEST_ID_HEADER = "X-Request-Id"
# Accept a caller's (or Heroku router's) request id only if it is short and plain.
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")

_FIELDS = "%(levelname)s %(name)s %(message)s"
_RENAME = {"levelname": "level", "name": "logger"}


# --- the context ----------------------------------------------------------------------------


def bind(**fields: Any) -> None:
    """Add ``fields`` to every log line of the current context (task, request, thread).

    ``None`` values are left out. The step runner calls
    ``logs.bind(agent=..., attempt=...)`` after loading the task.
    """
    current = dict(_context.get())
    # Redacted here too: a formatter may print the context without going through a record.
    current.update({k: redact(v) for k, v in fields.items() if v is not None})
    _context.set(current)


def clear() -> None:
    """Forget every bound field (end of a task or a request)."""
    _context.set({})


def current_context() -> dict[str, Any]:
    """The fields bound now (a copy)."""
    return dict(_context.get())


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record (the JSON formatter emits them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def process_name(argv: list[str] | None = None) -> str:
    """What this process is in the stack, from its command line: ``web`` (gunicorn),
    ``worker``, ``beat``, ``flower`` (celery), ``up`` (``outlast up``), else the program."""
    argv = sys.argv if argv is None else argv
    program = os.path.basename(argv[0]) if argv else "python"
    if program.startswith("gunicorn"):
        return "web"
    if program.startswith("celery"):
        return next((w for w in argv[1:] if w in ("worker", "beat", "flower")), "celery")
    if program in ("outlast", "__main__.py") and len(argv) > 1:
        return argv[1]  # outlast up, python -m app.cli web
    return program


def resolve_format(log_format: str) -> str:
    """``json`` or ``console``: ``auto`` is console when stdout is a terminal."""
    if log_format == "auto":
        try:
            return "console" if sys.stdout.isatty() else "json"
        except (AttributeError, ValueError):  # no stdout, or a closed one
            return "json"
    return log_format


def formatter(log_format: str, process: str | None = None) -> logging.Formatter:
    """The formatter of ``log_format`` (``auto`` resolved) for ``process`` (default:
    :func:`process_name`)."""
    process = process or process_name()
    if resolve_format(log_format) == "json":
        from pythonjsonlogger.json import JsonFormatter

        # "time": ISO 8601 in UTC, the form log pipelines parse without configuration.
        return JsonFormatter(
            _FIELDS, rename_fields=_RENAME, timestamp="time", static_fields={"process": process}
        )
    return ConsoleFormatter(process)


def _formatter(settings: Settings) -> logging.Formatter:
    return formatter(settings.log_format)


class ConsoleFormatter(logging.Formatter):
    """One short line per event: local time, process, level, the task's id (and step)
    when the line belongs to a task, the message (``15:04:05 worker INFO  tsk_… step 0: …``)."""

    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        message = _short_celery_message(record) or record.getMessage()
        duration = getattr(record, "duration_ms", None)
        if record.name == "gunicorn.access" and duration is not None:
            message = f"{message} {duration:.0f}ms"
        task_id = getattr(record, "task_id", None)
        if task_id:
            step = getattr(record, "step", None)
            message = (
                f"{task_id} step {step}: {message}" if step is not None else f"{task_id} {message}"
            )
        line = f"{clock} {self.process:<6} {record.levelname:<5} {message}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        elif record.exc_text:  # already rendered (and redacted) by RedactionFilter
            line = f"{line}\n{record.exc_text}"
        elif record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


def _short_celery_message(record: logging.LogRecord) -> str | None:
    """Celery's "Task <name>[<message id>] received/succeeded in 0.335853385s: ..." for a
    person: without the message id (the task's id says whose it is), a rounded time."""
    if record.name not in ("celery.app.trace", "celery.worker.strategy"):
        return None
    args = record.args
    if not isinstance(args, Mapping) or "id" not in args or not isinstance(record.msg, str):
        return None
    fields = dict(args)
    if isinstance(fields.get("runtime"), float):
        fields["runtime"] = round(fields["runtime"], 3)
    try:
        return record.msg.replace("Task ", "", 1).replace("[%(id)s]", "") % fields
    except (KeyError, TypeError, ValueError):
        return None


# --- levels: Celery's per-message lines about sweeps are DEBUG ------------------------------

SWEEP_PREFIX = "outlast.sweep."
# Celery logs each message it schedules (beat), receives and finishes (worker) at INFO:
# for the sweeps, a dozen lines every few seconds that say nothing happened.
CELERY_MESSAGE_LOGGERS = ("celery.beat", "celery.worker.strategy", "celery.app.trace")
# outlast.run_step's argsrepr (app.store.messages): "task <task id> step <n>".
_STEP_ARGSREPR = re.compile(r"^task (\S+) step (\d+)$")


def _celery_task_name(record: logging.LogRecord) -> str | None:
    """The Celery task a per-message line is about: beat's ``Sending due task %s (%s)``
    names it second; the worker's received/succeeded lines carry it in ``data``."""
    data = getattr(record, "data", None)
    if isinstance(data, Mapping):
        return data.get("name")
    if record.name == "celery.beat" and isinstance(record.args, tuple) and len(record.args) == 2:
        return str(record.args[1])
    return None


class CeleryMessageLines(logging.Filter):
    """On Celery's per-message loggers: a sweep's lines become DEBUG (dropped unless the
    level is DEBUG), and a step's "received" line carries the task id like its others."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = _celery_task_name(record)
        if not name:
            return True
        if name.startswith(SWEEP_PREFIX) and record.levelno == logging.INFO:
            if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return True
        data = getattr(record, "data", None)
        if isinstance(data, Mapping) and not hasattr(record, "task_id"):
            found = _STEP_ARGSREPR.match(str(data.get("args") or ""))
            if found:
                record.task_id, record.step = found.group(1), int(found.group(2))
        return True


_CELERY_MESSAGE_LINES = CeleryMessageLines()


def configure(settings: Settings) -> None:
    """Configure the root logger for this process from ``settings``.

    Also connects the Celery signals that bind a task's fields (harmless in processes
    that run no tasks).
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(settings))
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactionFilter())  # last: it sees the context fields too
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    for name in CELERY_MESSAGE_LOGGERS:
        logging.getLogger(name).addFilter(_CELERY_MESSAGE_LINES)
    # Warnings (a deprecation, Celery's "running as root") become log lines too.
    logging.captureWarnings(True)
    _connect_celery_signals()


# --- Celery: a task's fields on every line it logs ----------------------------------------------

RUN_STEP = "outlast.run_step"


def _task_prerun(task_id: str | None = None, task: Any = None, args: Any = None, **_: Any) -> None:
    clear()
    name = getattr(task, "name", None)
    bind(celery_task=name, celery_id=task_id)
    # outlast.run_step(task_id, step): the ids are in the message itself.
    if name == RUN_STEP and isinstance(args, list | tuple) and len(args) >= 2:
        bind(task_id=args[0], step=args[1])


def _task_postrun(**_: Any) -> None:
    clear()


def _connect_celery_signals() -> None:
    from celery.signals import task_postrun, task_prerun

    task_prerun.connect(_task_prerun, weak=False, dispatch_uid="outlast.logs.prerun")
    task_postrun.connect(_task_postrun, weak=False, dispatch_uid="outlast.logs.postrun")


# --- Flask: a request id on every web line --------------------------------------------------------


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def init_app(flask_app: Any) -> None:
    """Give each request a request id: bound for its log lines, answered as X-Request-Id."""
    from flask import g, request

    @flask_app.before_request
    def _bind_request_id() -> None:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = incoming if _SANE_REQUEST_ID.match(incoming) else new_request_id()
        clear()
        bind(request_id=g.request_id)

    @flask_app.after_request
    def _answer_request_id(response: Any) -> Any:
        request_id = g.get("request_id")
        if request_id:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    @flask_app.teardown_request
    def _unbind(_exc: BaseException | None) -> None:
        clear()


# --- gunicorn: its own lines (start-up, access) as JSON too -------------------------------------

try:
    from gunicorn.glogging import Logger as _GunicornBase
except ImportError:  # pragma: no cover - gunicorn is a dependency; web only
    _GunicornBase = object  # type: ignore[assignment,misc]


class GunicornLogger(_GunicornBase):  # type: ignore[misc,valid-type]
    """``gunicorn --logger-class app.ops.logs.GunicornLogger``: gunicorn's error and access
    logs in Outlast's format; each access line is one object with the request's fields."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        from app import settings

        formatter = _formatter(settings.current())
        for logger in (self.error_log, self.access_log):
            for handler in logger.handlers:
                handler.setFormatter(formatter)
                handler.addFilter(ContextFilter())
                handler.addFilter(RedactionFilter())  # the access line's query string too

    def access(self, resp: Any, req: Any, environ: Mapping[str, Any], request_time: Any) -> None:
        if not self.access_log_enabled:
            return
        status = resp.status.split(None, 1)[0] if isinstance(resp.status, str) else resp.status
        request_id = next(
            (v for k, v in resp.headers if k.lower() == REQUEST_ID_HEADER.lower()), None
        )
        fields = {
            "method": environ.get("REQUEST_METHOD"),
            "path": environ.get("PATH_INFO"),
            "query": environ.get("QUERY_STRING") or None,
            "status": int(status),
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000, 3),
            "remote_addr": environ.get("REMOTE_ADDR"),
            "request_id": request_id,
        }
        try:
            self.access_log.info(
                "%s %s %s",
                fields["method"],
                fields["path"],
                fields["status"],
                extra={k: v for k, v in fields.items() if v is not None},
            )
        except Exception:  # gunicorn's own convention: an access line never fails a request
            self.exception("access log failed")
