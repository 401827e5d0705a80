"""docs/agents.md's examples, run as written: each is the first Python block after its
section's heading, and names the module file it is saved as on its first line."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

from app import settings as settings_mod
from app.engine import registry
from app.settings import Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "agents.md"


def example_source(section: str, module: str) -> str:
    """The first Python block after ``## <section>``; it must start ``# <module>.py``."""
    after = DOC.read_text().split(f"## {section}", 1)[1]
    source = re.search(r"```python\n(.*?)```", after, re.S).group(1)
    assert source.startswith(f"# {module}.py\n")
    return source


def register_example(
    settings: Settings, tmp_path: Path, monkeypatch, section: str, module: str
) -> Iterator[None]:
    """For a fixture (``yield from``): the example saved as ``<module>.py``, named in
    OUTLAST_AGENTS and registered before the worker starts (a worker takes the steps of
    the versions it has then); forgotten afterwards."""
    (tmp_path / f"{module}.py").write_text(example_source(section, module))
    monkeypatch.syspath_prepend(str(tmp_path))
    settings_mod.configure(settings.replace(agents=(*settings.agents, module)))
    registry.load()
    yield
    sys.modules.pop(module, None)
