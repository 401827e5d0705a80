"""``research``: fetches each URL in its own step, then answers with ``ctx.llm``."""

from __future__ import annotations

from typing import Any

from app.agents.builtin.schemas import HTTP_URL
from app.engine.context import StepContext
from outlast.sdk import Outcome, agent

INPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "question": {"type": "string"},
        "urls": {"type": "array", "items": HTTP_URL, "minItems": 1, "maxItems": 50},
    },
    "required": ["question", "urls"],
    "additionalProperties": False,
}

# How much of each page the model is shown (the fetch itself is capped separately).
EXCERPT_CHARS = 2000

SYSTEM_PROMPT = (
    "You answer the user's question using only the sources provided. Cite sources by "
    "their number, like [1]. Say so when the sources do not contain the answer."
)


@agent("research", input_schema=INPUT_SCHEMA)
def research(ctx: StepContext, state: Any) -> Outcome:
    """Fetch every URL (one step each), then write an answer from what was found."""
    urls = ctx.input["urls"]
    sources = list((state or {}).get("sources", []))
    if len(sources) < len(urls):
        page = ctx.tool("http_get", url=urls[len(sources)])
        sources.append(
            {
                "url": urls[len(sources)],
                "title": page.get("title"),
                "status": page.get("status"),
                "error": page.get("error"),
                "excerpt": (page.get("text") or "")[:EXCERPT_CHARS],
            }
        )
        ctx.progress(len(sources), len(urls) + 1, f"fetched {len(sources)} of {len(urls)}")
        return ctx.next({"sources": sources})
    reply = ctx.llm(
        [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": _prompt(ctx.input["question"], sources)},
        ]
    )
    ctx.progress(len(urls) + 1, len(urls) + 1, "answered")
    return ctx.done(
        {
            "answer": reply.get("content") or "",
            "sources": [
                {k: s[k] for k in ("url", "title", "status")}
                | ({"error": s["error"]} if s.get("error") else {})
                for s in sources
            ],
        }
    )


def _prompt(question: str, sources: list[dict[str, Any]]) -> str:
    lines = [f"Question: {question}", "", "Sources:"]
    for number, source in enumerate(sources, 1):
        if source.get("error"):
            lines.append(f"[{number}] {source['url']} (unavailable: {source['error']})")
        else:
            lines.append(f"[{number}] {source.get('title') or source['url']} ({source['url']})")
            lines.append(source.get("excerpt") or "")
    return "\n".join(lines)
