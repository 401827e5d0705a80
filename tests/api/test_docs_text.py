"""What /docs shows is Markdown people can read: Swagger UI renders every summary and
description of /openapi.json as Markdown (CommonMark, raw HTML allowed)."""

from __future__ import annotations

import re
from collections.abc import Iterator

# reStructuredText that Markdown shows as litter: ``literal`` and :role:`target`.
_RST = re.compile(r"``|:(?:mod|func|class|meth|attr|data|exc|obj|ref):`")
# A bare <word ...> outside a code span is taken for an HTML tag and vanishes.
_TAG_LIKE = re.compile(r"<[A-Za-z][^<>`]*>")


def _texts(node: object, path: str = "") -> Iterator[tuple[str, str]]:
    """(where, text) of every summary and description in the document."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}/{key}"
            if key in ("summary", "description") and isinstance(value, str):
                yield here, value
            yield from _texts(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _texts(value, f"{path}[{i}]")


def _outside_code_spans(text: str) -> str:
    return re.sub(r"`[^`]*`", "", text)


def test_the_docs_say_which_header_every_v1_request_needs_with_its_placeholder(client):
    info = client.get("/openapi.json").get_json()["info"]["description"]

    assert "`Authorization: Bearer <api key>`" in info


def test_every_summary_and_description_is_markdown_without_rst_or_swallowed_tags(client):
    texts = list(_texts(client.get("/openapi.json").get_json()))
    assert len(texts) > 20  # the walk reaches the operations, not only the info

    rst = [(where, text) for where, text in texts if _RST.search(text)]
    swallowed = [(w, t) for w, t in texts if _TAG_LIKE.search(_outside_code_spans(t))]
    assert rst == [] and swallowed == []
    summaries = [text for where, text in texts if where.endswith("/summary")]
    assert "Read a task; `?wait=N` long-polls for a change of status or step." in summaries


def test_the_checks_find_rst_and_a_swallowed_placeholder():
    # A check that cannot fail proves nothing.
    assert _RST.search("Read a task; ``?wait=N`` long-polls")
    assert _RST.search("built with :mod:`app.store`")
    assert _TAG_LIKE.search(_outside_code_spans("needs Authorization: Bearer <api key>."))
    assert not _TAG_LIKE.search(_outside_code_spans("needs `Authorization: Bearer <api key>`."))
