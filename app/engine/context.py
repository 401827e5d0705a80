"""The step context: everything a step function may use to act on the world.

A step function receives a :class:`StepContext` and the previous step's state. Side
effects go through :meth:`StepContext.tool` and :meth:`StepContext.llm` so that they are
logged, replayed after a crash and stopped by a cancel; the return value (built with
:meth:`next`, :meth:`done`, :meth:`ask`, :meth:`sleep` or :meth:`fail`) says what comes
next. See docs/agents.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from app.engine import children as child_tasks
from app.engine.tools import call_key, get_tool
from app.ops import metrics
from app.store import budgets, db, tool_calls
from outlast.sdk import (
    NOT_FOUND,
    AgentError,
    Cancelled,
    Continue,
    Done,
    Fail,
    RetryableError,
    SleepUntil,
    Tool,
    ToolCall,
    TransientToolError,
    WaitForChildren,
    WaitForInput,
)

log = logging.getLogger(__name__)

# ctx.wait sleeps in slices this long between cancellation checks (RUNTIME.md: at least
# once a second).
WAIT_SLICE_SECONDS = 0.5


class Lease(Protocol):
    """The step's lease as the context needs it (kept by :mod:`app.engine.runner`)."""

    token: str

    def held(self) -> bool:
        """False once the task is cancelled, failed, or the lease otherwise lost."""

    def report_progress(self, progress: Mapping[str, Any]) -> bool:
        """Store progress, fenced on the lease; False when the lease is lost."""


class StepContext:
    """What one run of one step sees.

    Attributes: ``task_id``; ``step`` (0-based index of this step); ``attempt`` (1 +
    lost workers so far); ``input`` (the task's input with schema defaults filled in);
    ``human_input`` (the answer to the previous step's :meth:`ask`, else ``None``).
    """

    def __init__(
        self,
        *,
        task_id: str,
        step: int,
        attempt: int,
        input: Mapping[str, Any],
        human_input: Any,
        lease: Lease,
        usage: Mapping[str, Any] | None = None,
        budget: Mapping[str, Any] | None = None,
    ):
        self.task_id = task_id
        self.step = step
        self.attempt = attempt
        self.input = input
        self.human_input = human_input
        self._lease = lease
        self._calls = 0
        self._spawns = 0  # ctx.spawn calls so far: the index in the child's spawn_key
        # The task's recorded usage (kept current from each completed call's row) and
        # budget (it changes only while the task waits for input): checked before calls.
        self.usage: dict[str, Any] = dict(usage or budgets.EMPTY_USAGE)
        self._budget = budget
        self.refused: BudgetExhausted | None = None  # the call the budget refused, if any
        # Set when a re-run asked a logged call with another tool or other arguments.
        self.nondeterministic: str | None = None

    # --- side effects -------------------------------------------------------------------

    @property
    def key(self) -> str:
        """The idempotency key the next :meth:`tool` or :meth:`llm` call will carry
        (stable across re-runs of this step)."""
        return call_key(self.task_id, self.step, self._calls)

    def tool(self, name: str, /, **args: Any) -> Any:
        """Call tool ``name`` with ``args`` through the tool-call log and return its
        output. Raises :class:`Cancelled` when the task was cancelled first."""
        return self._call(name, args)

    def call_as(self, name: str, tool: Tool, args: dict[str, Any]) -> Any:
        """Engine use (built-in agents): make a call logged, keyed, replayed and
        budgeted like :meth:`tool` under ``name``, but run by ``tool`` (an HTTP tool
        declared in the task's input, or a registered tool wrapped by the agent)."""
        return self._call(name, args, tool)

    def llm(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """A Chat Completions call (OpenAI format ``messages`` and ``tools``), logged and
        replayed like a tool call. Returns the assistant message: ``{"role":
        "assistant", "content": ..., "tool_calls": [...]}`` (no ``tool_calls`` key when
        the model called none)."""
        args: dict[str, Any] = {"messages": list(messages), **options}
        if tools:
            args["tools"] = list(tools)
        return self._call("llm", args)["message"]

    def progress(
        self, current: int | float, total: int | float | None = None, message: str | None = None
    ) -> None:
        """Report progress (a ``task.progress`` event)."""
        progress = {"current": current, "total": total, "message": message}
        if not self._lease.report_progress(progress):
            raise Cancelled("the task is no longer running this step")

    # --- child tasks (V2.md section 6) ---------------------------------------------------

    def spawn(
        self, agent: str, input: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
    ) -> str:
        """Create a child task of the same tenant running ``agent`` on ``input`` and
        return its id. The child exists (and starts) once this returns; a re-run of this
        step gets the same id back for the same call, with no second child. Raises
        :class:`~outlast.SpawnRefused` when the agent is unknown or refuses the input
        (uncaught: ``agent_error``), :class:`Cancelled` once the task is cancelled."""
        index = self._spawns
        self._spawns += 1
        self.check_cancelled()
        try:
            return child_tasks.spawn(
                parent_id=self.task_id,
                step=self.step,
                index=index,
                token=self._lease.token,
                agent_name=agent,
                input=input,
                metadata=metadata,
            )
        except child_tasks.SpawnMismatch as exc:
            self.nondeterministic = str(exc)
            raise NondeterministicReplay(self.nondeterministic) from None

    def wait_for(self, ids: Sequence[str], mode: str = "all", state: Any = None) -> WaitForChildren:
        """Return this to end the step and run the next one (with ``state``) once all
        (``mode="all"``) or any one (``"any"``) of the children ``ids`` are terminal.
        The task stays ``working`` and holds no worker meanwhile."""
        return WaitForChildren(tuple(ids) if not isinstance(ids, str) else ids, mode, state)

    def children(self, ids: Sequence[str] | None = None) -> list[dict[str, Any] | None]:
        """The current task representations (as ``GET /v1/tasks/{id}``) of this task's
        children ``ids``, in that order; every child in spawn order when ``ids`` is
        ``None``. A child deleted meanwhile is ``None``."""
        return child_tasks.children(self.task_id, ids)

    # --- cancellation -------------------------------------------------------------------

    def cancelled(self) -> bool:
        """True once the task was cancelled (or this step's lease was lost)."""
        return not self._lease.held()

    def check_cancelled(self) -> None:
        """Raise :class:`Cancelled` if :meth:`cancelled`."""
        if self.cancelled():
            raise Cancelled("the task is no longer running this step")

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds`` inside the step, checking for cancellation at least once a
        second. For long waits return :meth:`sleep` instead: it holds no worker."""
        end = time.monotonic() + max(0.0, float(seconds))
        while True:
            self.check_cancelled()
            remaining = end - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(WAIT_SLICE_SECONDS, remaining))

    # --- outcomes -----------------------------------------------------------------------

    def next(self, state: Any = None) -> Continue:
        """Checkpoint ``state`` and run the next step with it."""
        return Continue(state)

    def done(self, result: Any) -> Done:
        """Complete the task with ``result``."""
        return Done(result)

    def ask(
        self,
        prompt: str,
        schema: Mapping[str, Any],
        state: Any = None,
        *,
        reason: str | None = None,
    ) -> WaitForInput:
        """Wait for a human's answer matching JSON Schema ``schema``; the next step gets
        it as ``ctx.human_input`` and ``state`` as its state. ``reason`` (engine use,
        e.g. ``"ask_human"``) is shown in ``input_request.reason``."""
        if reason is not None:
            return WaitForInputWithReason(prompt, schema, state, reason)
        return WaitForInput(prompt, schema, state)

    def sleep(self, seconds: float, state: Any = None) -> SleepUntil:
        """Run the next step (with ``state``) ``seconds`` from now, holding no worker."""
        return SleepUntil(datetime.now(UTC) + timedelta(seconds=float(seconds)), state)

    def sleep_until(self, when: datetime, state: Any = None) -> SleepUntil:
        """Run the next step (with ``state``) at ``when`` (timezone-aware)."""
        return SleepUntil(when, state)

    def fail(self, message: str, type: str = "agent_error") -> Fail:
        """Fail the task with ``{"type": type, "message": message}``."""
        return Fail(message, type)

    # --- the log ------------------------------------------------------------------------

    def _call(self, name: str, args: dict[str, Any], tool: Tool | None = None) -> Any:
        spec = tool or get_tool(name)
        if spec is None:
            raise AgentError(f"no tool named {name!r} is registered")
        index = self._calls
        self._calls += 1
        key = call_key(self.task_id, self.step, index)
        self.check_cancelled()
        args_hash = tool_calls.args_hash(name, args)
        with db.transaction() as conn:
            row = tool_calls.get(conn, self.task_id, self.step, index)
        if row is not None:
            # Replaying would hand call `index` an output made for another call.
            self._check_same_call(row, name, args_hash, index)
        if row is not None and row["status"] == tool_calls.COMPLETED:
            log.info("replaying %s call %d of step %d", name, index, self.step)
            metrics.tool_call(name, "replayed")
            return row["output"]
        if row is not None and spec.reconcile is not None:
            found = spec.reconcile(key)
            if found is not NOT_FOUND:
                found = tool_calls.storable(found)
                with db.transaction() as conn:
                    self._count(tool_calls.complete(conn, self.task_id, self.step, index, found))
                metrics.tool_call(name, "reconciled")
                return found
        # A call that would go past the budget is not made (V2.md section 3).
        action = budgets.MODEL_CALL if name == budgets.MODEL_TOOL else budgets.TOOL_CALL
        refused = budgets.refusal(action, self._budget, self.usage)
        if refused is not None:
            self.refused = BudgetExhausted(*refused)  # sticky: an agent may not swallow it
            raise self.refused
        # A call that may be undone keeps its full arguments: its undo receives them.
        logged_args = spec.summarize(args) if spec.summarize and not spec.compensate else args
        with db.transaction() as conn:
            started = tool_calls.begin(
                conn,
                task_id=self.task_id,
                step=self.step,
                call_index=index,
                name=name,
                key=key,
                args=tool_calls.storable(logged_args),
                lease_token=self._lease.token,
                args_hash=args_hash,
                compensate=spec.compensate,
            )
            if started is None:
                again = tool_calls.get(conn, self.task_id, self.step, index)
        if started is None:
            if again is not None:
                self._check_same_call(again, name, args_hash, index)
            if again is not None and again["status"] == tool_calls.COMPLETED:
                return again["output"]  # a concurrent run of this step finished it
            raise Cancelled("the task is no longer running this step")
        call = ToolCall(
            task_id=self.task_id,
            step=self.step,
            index=index,
            key=key,
            attempt=started["attempts"],
            check_cancelled=self.check_cancelled,
        )
        try:
            # NUL characters and NaN (which jsonb refuses) are dropped: the side effect
            # happened, the task goes on with what can be stored.
            output = tool_calls.storable(spec.fn(call, **args))
            json.dumps(output)  # the log stores JSON; fail here, not at the checkpoint
        except Cancelled:
            raise
        except BaseException as exc:
            with db.transaction() as conn:
                tool_calls.fail(
                    conn,
                    self.task_id,
                    self.step,
                    index,
                    {"type": type(exc).__name__, "message": str(exc)[:2000]},
                )
            metrics.tool_call(name, "failed")
            if is_transient(exc) and not isinstance(exc, RetryableError):
                raise TransientToolError(f"{name}: {exc}") from exc
            raise
        with db.transaction() as conn:
            self._count(tool_calls.complete(conn, self.task_id, self.step, index, output))
        metrics.tool_call(name, "completed")
        return output

    def _count(self, usage: Mapping[str, Any] | None) -> None:
        if usage is not None:  # None: another run of this step completed (and counted) it
            self.usage = dict(usage)

    def _check_same_call(
        self, row: Mapping[str, Any], name: str, args_hash: str, index: int
    ) -> None:
        if row["name"] != name:
            self.nondeterministic = (
                f"call {index} of step {self.step} was {row['name']!r} and is now {name!r}; "
                "a step must make the same calls in the same order when it is re-run"
            )
        elif row["args_hash"] is not None and row["args_hash"] != args_hash:
            self.nondeterministic = (
                f"call {index} of step {self.step} ({name!r}) was made with other arguments; "
                "a step must make the same calls with the same arguments when it is re-run"
            )
        else:
            return
        raise NondeterministicReplay(self.nondeterministic)


@dataclasses.dataclass(frozen=True)
class WaitForInputWithReason(WaitForInput):
    """:class:`WaitForInput` whose ``input_request`` also says why it asks."""

    reason: str = ""


class BudgetExhausted(Exception):
    """A call or a step would go past the task's budget; the runner fails the task
    (``budget_exceeded``) or asks for more, as ``on_exhausted`` says."""

    def __init__(self, limit: str, value: int):
        super().__init__(budgets.message(limit, value))
        self.limit = limit
        self.value = value


class NondeterministicReplay(AgentError):
    """A re-run of a step asked a logged call index for another tool or with other
    arguments: the task fails with ``nondeterministic_replay`` (the stored output is
    never returned for a call it was not made for). The context remembers it, so an
    agent that catches the exception cannot carry on."""


def is_transient(exc: BaseException) -> bool:
    """A connection error or timeout (or the SDK's :class:`RetryableError`): worth
    re-running the step for."""
    import requests

    return isinstance(
        exc,
        RetryableError
        | requests.ConnectionError
        | requests.Timeout
        | ConnectionError
        | TimeoutError,
    )
