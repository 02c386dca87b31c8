"""Issue 11 items 21 and 22: extras depend on what the code imports; bars off a terminal are lines."""

from __future__ import annotations

import io
import re
import tomllib
from pathlib import Path

from tracestore import progress

ROOT = Path(__file__).resolve().parents[1]
# distribution name -> the module it provides, for the extras' packages
IMPORT_NAME = {"obstore": "obstore", "fsspec": "fsspec", "s3fs": "s3fs"}


def _dist_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].strip().lower()


def test_s3_extra_lists_only_what_the_code_imports() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "tracestore").rglob("*.py"))
    for req in extras["s3"]:
        module = IMPORT_NAME.get(_dist_name(req), _dist_name(req).replace("-", "_"))
        assert re.search(rf"^\s*(import {module}\b|from {module}\b)", source, re.M), (
            f"the s3 extra requires {req!r} but no module of tracestore imports {module}")


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_bar_is_one_line_at_the_end() -> None:
    out = io.StringIO()
    bar = progress.bar(1000, "capture", "text", file=out)
    for _ in range(100):
        bar.update(10)
        bar.set_postfix_str("x")
    bar.note("archive a.pkl done")
    bar.close()
    bar.close()  # twice is harmless
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("capture: archive a.pkl done (")
    assert lines[1].startswith("capture: 1000 of 1000 text in ")
    assert lines[1].endswith(", x")


def test_not_leave_prints_nothing_at_close_off_a_terminal() -> None:
    out = io.StringIO()
    with progress.bar(10, "epoch 1", "batch", file=out, leave=False) as bar:
        bar.update(10)
    assert out.getvalue() == ""


def test_on_a_terminal_it_is_tqdm() -> None:
    out = _FakeTTY()
    bar = progress.bar(10, "convert", "B", file=out, unit_scale=True)
    bar.update(5)
    bar.note("half")
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "convert: half" in text
