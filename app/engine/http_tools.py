"""The built-in HTTP tools: ``http_get`` (research) and ``http_post`` (calls), and the
``DELETE`` that the ``calls`` agent's undos send (:func:`http_delete`).

Both send the call's key as ``Idempotency-Key``. URLs an agent calls come from the
task's own input, and the runtime contract puts no address limit on them (the `calls`
agent is commonly pointed at a service on the same host), so by default any http(s)
URL is called; ``OUTLAST_TOOLS_DENY_PRIVATE=1`` applies the SSRF guard of
:mod:`app.webhooks.urlguard` to every URL and every redirect target, before the call and
again at connect time (the session resolves the name itself and connects only to an
address it checked, as webhooks do). Proxy variables and netrc are ignored unless
``OUTLAST_TOOLS_TRUST_ENV=1`` (a proxy would hide the real destination from the guard).
"""

from __future__ import annotations

import html
import re
import time
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin

import requests

from app import settings as settings_mod
from app.ops.redaction import redact_text
from app.webhooks import urlguard
from outlast.backoff import Backoff
from outlast.sdk import AgentError, ToolCall, TransientToolError, tool

USER_AGENT = "Outlast/0.1 (+https://github.com/outlast)"
GET_TIMEOUT_SECONDS = 10.0
GET_MAX_BYTES = 2 * 1024 * 1024
GET_MAX_REDIRECTS = 5
TEXT_MAX_CHARS = 20_000  # what the log keeps of a page's text
POST_TIMEOUT_SECONDS = 10.0
POST_ATTEMPTS = 4  # in-step tries of a POST on 5xx / connection errors, same key
POST_BACKOFF_SECONDS = 0.25  # doubles per try
POST_RETRY = Backoff(base=POST_BACKOFF_SECONDS, cap=30.0)
BODY_MAX_CHARS = 4000

TEXT_TYPES = (
    "text/plain",
    "text/markdown",
    "text/csv",
    "application/json",
    "application/xml",
    "text/xml",
)


def _guard(url: str) -> str:
    deny_private = settings_mod.current().tools_deny_private
    return urlguard.check_url(url, allow_private=not deny_private)


def _session() -> requests.Session:
    """The session one tool call uses: the connect-time guard when private addresses are
    denied, and the environment's proxies only when the operator says so."""
    cfg = settings_mod.current()
    session = urlguard.guarded_session(allow_private=not cfg.tools_deny_private)
    # With a proxy the guard sees the proxy, not the destination: only check_url's
    # look-up before each call applies then (docs/operations.md, Security).
    session.trust_env = cfg.tools_trust_env
    return session


# --- http_get -----------------------------------------------------------------------------


class _PageParser(HTMLParser):
    """Title and visible text of an HTML page (scripts, styles and markup dropped)."""

    SKIP = {"script", "style", "noscript", "template", "svg", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title: str | None = None
        self._in_title = False
        self._skip = 0
        self._parts: list[str] = []
        self._title_parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag == "title" and self.title is None:
            self._in_title = True
        elif tag in self.SKIP:
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self._in_title:
            self._in_title = False
            self.title = " ".join("".join(self._title_parts).split()) or None
        elif tag in self.SKIP and self._skip:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self._title_parts.append(data)
        elif not self._skip:
            self._parts.append(data)

    def text(self) -> str:
        return " ".join(" ".join(self._parts).split())


def _read_capped(response: requests.Response, max_bytes: int) -> tuple[bytes, bool]:
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(64 * 1024):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes:
            return b"".join(chunks)[:max_bytes], True
    return b"".join(chunks), False


def _decode(body: bytes, response: requests.Response) -> str:
    """The page's text, NUL characters made spaces (PostgreSQL's jsonb cannot store
    them, and a page's words stay apart)."""
    return _decode_raw(body, response).replace("\x00", " ")


def _decode_raw(body: bytes, response: requests.Response) -> str:
    charset = requests.utils.get_encoding_from_headers(response.headers)
    if (
        charset
        and charset.lower() == "iso-8859-1"
        and "charset" not in response.headers.get("content-type", "").lower()
    ):
        charset = None  # requests' default for text/*, usually wrong for modern pages
    if charset is None:
        meta = re.search(rb"<meta[^>]+charset=[\"']?([A-Za-z0-9_-]+)", body[:4096], re.I)
        charset = meta.group(1).decode() if meta else "utf-8"
    try:
        return body.decode(charset, errors="replace")
    except LookupError:
        return body.decode("utf-8", errors="replace")


def fetch(
    url: str,
    *,
    key: str | None = None,
    timeout: float = GET_TIMEOUT_SECONDS,
    max_bytes: int = GET_MAX_BYTES,
    max_redirects: int = GET_MAX_REDIRECTS,
) -> dict[str, Any]:
    """GET ``url`` and extract its title and text. Never raises for the page's sake:
    an unreachable, refused or unsupported page comes back with ``error`` set.

    Returns ``{"url", "final_url", "status", "content_type", "title", "text",
    "truncated", "error"}``.
    """
    page: dict[str, Any] = {
        "url": url,
        "final_url": url,
        "status": None,
        "content_type": None,
        "title": None,
        "text": "",
        "truncated": False,
        "error": None,
    }
    headers = {"User-Agent": USER_AGENT, "Accept": "text/html, text/plain;q=0.9, */*;q=0.5"}
    if key:
        headers["Idempotency-Key"] = key
    current = url
    session = _session()
    try:
        for _hop in range(max_redirects + 1):
            _guard(current)
            response = session.get(
                current, headers=headers, timeout=timeout, stream=True, allow_redirects=False
            )
            with response:
                if response.is_redirect and response.headers.get("location"):
                    current = urljoin(current, response.headers["location"])
                    continue
                page["final_url"] = current
                page["status"] = response.status_code
                content_type = (
                    response.headers.get("content-type", "").split(";")[0].strip().lower()
                )
                page["content_type"] = content_type or None
                if response.status_code >= 400:
                    page["error"] = f"HTTP {response.status_code}"
                    return page
                if content_type in ("text/html", "application/xhtml+xml") or not content_type:
                    body, page["truncated"] = _read_capped(response, max_bytes)
                    parser = _PageParser()
                    parser.feed(_decode(body, response))
                    parser.close()
                    page["title"] = parser.title
                    page["text"] = parser.text()
                elif content_type in TEXT_TYPES or content_type.startswith("text/"):
                    body, page["truncated"] = _read_capped(response, max_bytes)
                    page["text"] = " ".join(_decode(body, response).split())
                else:
                    page["error"] = f"unsupported content type {content_type}"
                    return page
                page["text"] = html.unescape(page["text"])[:TEXT_MAX_CHARS]
                return page
        page["error"] = f"more than {max_redirects} redirects"
    except urlguard.UnsafeUrl as exc:
        page["error"] = f"refused: {exc}"
    except requests.Timeout:
        page["error"] = f"timed out after {timeout:g}s"
    except requests.RequestException as exc:
        page["error"] = f"unreachable: {type(exc).__name__}"
    finally:
        session.close()
    return page


@tool("http_get")
def http_get(call: ToolCall, url: str, **options: Any) -> dict[str, Any]:
    """Fetch a page (timeout, size cap, redirect limit, content-type handling)."""
    return fetch(url, key=call.key, **options)


# --- http_post -----------------------------------------------------------------------------


@tool("http_post")
def http_post(
    call: ToolCall,
    url: str,
    json: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = POST_TIMEOUT_SECONDS,
    attempts: int = POST_ATTEMPTS,
) -> dict[str, Any]:
    """POST ``json`` with ``Idempotency-Key: <the call's key>``; 5xx answers and
    connection errors are retried here with the same key (then the step is retried).
    Returns ``{"status", "body"}``; a 4xx answer is returned, not raised."""
    return _send_keyed(call, "POST", url, json, headers, timeout, attempts)


def http_delete(
    call: ToolCall, url: str, json: Any = None, timeout: float = POST_TIMEOUT_SECONDS
) -> dict[str, Any]:
    """DELETE ``url`` with ``json`` and ``Idempotency-Key: <the call's key>`` (an undo,
    V2.md 10): retried like :func:`http_post` on 5xx answers and connection errors,
    then :class:`TransientToolError`. Returns ``{"status", "body"}`` for any answer
    below 500 (the caller decides what a 4xx means)."""
    return _send_keyed(call, "DELETE", url, json, None, timeout, POST_ATTEMPTS)


def _send_keyed(
    call: ToolCall,
    method: str,
    url: str,
    json: Any,
    headers: dict[str, str] | None,
    timeout: float,
    attempts: int,
) -> dict[str, Any]:
    """One keyed request, tried up to ``attempts`` times on 5xx answers and connection
    errors with the same key (the SSRF guard's refusals are final)."""
    shown = redact_text(url)  # errors are stored and logged: no credential in them
    refused = f"http_{method.lower()} refused {shown}"
    try:
        _guard(url)
    except urlguard.UnsafeUrl as exc:
        raise AgentError(f"{refused}: {exc}") from None
    sent_headers = {"User-Agent": USER_AGENT, **(headers or {}), "Idempotency-Key": call.key}
    problem = ""
    with _session() as session:
        for attempt in range(1, attempts + 1):
            call.check_cancelled()
            try:
                response = session.request(
                    method,
                    url,
                    json=json,
                    headers=sent_headers,
                    timeout=timeout,
                    allow_redirects=False,
                )
            except urlguard.UnsafeUrl as exc:  # the connect-time guard: final, not retried
                raise AgentError(f"{refused}: {exc}") from None
            except requests.RequestException as exc:
                problem = redact_text(f"{type(exc).__name__}: {exc}")
            else:
                if response.status_code < 500:
                    return {"status": response.status_code, "body": _body(response)}
                problem = f"HTTP {response.status_code}"
            if attempt < attempts:
                time.sleep(POST_RETRY.delay(attempt))
    raise TransientToolError(f"{method} {shown} failed {attempts} times: {problem}")


def _body(response: requests.Response) -> Any:
    if len(response.content) > BODY_MAX_CHARS:  # the log keeps outputs small
        return response.text[:BODY_MAX_CHARS]
    try:
        return response.json()
    except ValueError:
        return response.text[:BODY_MAX_CHARS]


# --- the assistant's http_tools -------------------------------------------------------------


# Said without the address the host resolved to (V2.md section 12a).
REFUSED_URL = (
    "the tool URL was refused: it is not a public http(s) address "
    "(private, loopback, link-local, multicast and reserved addresses are refused)"
)


class ToolAnswerError(AgentError):
    """The HTTP tool answered with a status that is its final word (3xx, 4xx): the
    model gets ``{"error": <message>}`` as the result."""


def post_declared_tool(
    call: ToolCall, url: str, arguments: Any, timeout: float = POST_TIMEOUT_SECONDS
) -> Any:
    """Call an HTTP tool declared in a task's input (V2.md section 9): ``POST`` the
    arguments as JSON to ``url`` with ``Idempotency-Key: <the call's key>``; its JSON
    answer is the result (a non-JSON body: its text).

    The webhook SSRF rules apply: the URL is checked again here (DNS may have changed
    since the submission) and the connection's peer address is checked when it is made
    (:func:`app.webhooks.urlguard.guarded_session`), unless
    ``OUTLAST_WEBHOOK_ALLOW_PRIVATE=1``. 5xx answers and connection errors are retried
    here with the same key, then raise :class:`TransientToolError` (the step is
    retried); a 3xx or 4xx answer raises :class:`ToolAnswerError`.
    """
    allow_private = settings_mod.current().webhook_allow_private
    try:
        urlguard.check_url(url, allow_private=allow_private)
    except urlguard.UnsafeUrl:
        raise ToolAnswerError(REFUSED_URL) from None
    headers = {"User-Agent": USER_AGENT, "Idempotency-Key": call.key}
    problem = ""
    with urlguard.guarded_session(allow_private=allow_private) as session:
        for attempt in range(1, POST_ATTEMPTS + 1):
            call.check_cancelled()
            try:
                response = session.post(
                    url, json=arguments, headers=headers, timeout=timeout, allow_redirects=False
                )
            except urlguard.UnsafeUrl:
                raise ToolAnswerError(REFUSED_URL) from None
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}"
            else:
                if response.status_code < 300:
                    return _body(response)
                if response.status_code < 500:
                    text = response.text[:500]
                    raise ToolAnswerError(
                        f"HTTP {response.status_code}" + (f": {text}" if text else "")
                    )
                problem = f"HTTP {response.status_code}"
            if attempt < POST_ATTEMPTS:
                time.sleep(POST_RETRY.delay(attempt))
    raise TransientToolError(
        f"the tool at {redact_text(url)} failed {POST_ATTEMPTS} times: {problem}"
    )
