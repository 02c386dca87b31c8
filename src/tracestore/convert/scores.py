"""Ground-truth scores from a CSV file, joined to traces by id.

The file has an id column and a score column. A header is detected (the first row's score cell is not a
number) and common names are recognised; `id_column` / `score_column` pick columns by name (or 0-based
index) otherwise. Without a header the first two columns are id and score.

An empty score cell (or 'nan', 'NA', 'null'...) means the file has no score for that id: a score the archive
carries for it is kept. The file must be UTF-8: ids are compared byte for byte, so undecodable bytes are an
error, not replaced (replacement would make distinct ids equal)."""

from __future__ import annotations

import csv
import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputFormatError

ID_NAMES = ("id", "trace_id", "question_id", "qid", "sample_id", "uid", "key")
SCORE_NAMES = ("score", "bleurt_score", "bleurt", "ground_truth_score", "ground_truth", "gt_score", "gt", "label", "target", "y", "value")


@dataclass
class ScoreTable:
    """Scores by id, with what the summary reports: which were used, which had no trace."""

    name: str
    scores: dict[str, float]
    sha256: str
    id_column: str
    score_column: str
    used: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.scores)

    def unused(self) -> list[str]:
        """Ids with a score but no trace (in file order)."""
        return [k for k in self.scores if k not in self.used]


#: score cells that mean "no score for this id in the file" (besides an empty cell)
_NO_SCORE = ("nan", "na", "n/a", "none", "null")


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _pick(header: list[str], wanted: str | None, names: tuple[str, ...], what: str, name: str, flag: str,
          default: int) -> int:
    low = [h.strip().lower() for h in header]
    if wanted is not None:
        if wanted.strip().lower() in low:
            return low.index(wanted.strip().lower())
        if wanted.isdigit() and int(wanted) < len(header):
            return int(wanted)
        raise InputFormatError(f"{name}: no column {wanted!r} (columns: {header}); pass {flag} with one of those "
                               f"names or a 0-based index")
    for n in names:
        if n in low:
            return low.index(n)
    if default < len(header):
        return default
    raise InputFormatError(f"{name}: cannot tell the {what} column (columns: {header}); pass {flag}")


def read_scores(path: str | os.PathLike[str], *, id_column: str | None = None,
                score_column: str | None = None) -> ScoreTable:
    """Read a scores CSV (see the module docstring). A row whose score cell is empty or 'nan' (also 'NA',
    'N/A', 'none', 'null') gives no score: the id is left out of `scores`, so an archive's own score for it
    stays.

    Raises InputFormatError naming the file and line for bytes that are not UTF-8, a missing column, a
    score that is not a number or an id given twice with different scores."""
    p = Path(path)
    name = p.name
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise InputFormatError(f"{path}: no such scores file; check the --scores path") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        bad = raw[e.start:e.end]
        raise InputFormatError(f"{name}: line {line} holds bytes that are not UTF-8 ({bad!r} at byte {e.start:,}); "
                               f"ids are matched exactly, so they cannot be guessed: save the file as UTF-8") from None
    try:
        dialect: type[csv.Dialect] | csv.Dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    rows = [r for r in csv.reader(text.splitlines(), dialect) if r and any(c.strip() for c in r)]
    if not rows:
        raise InputFormatError(f"{name}: the scores file is empty; expected an id column and a score column")
    first = rows[0]
    # a header row: its score cell is not a number, or a column was asked for by name
    has_header = len(first) < 2 or not _is_number(first[min(1, len(first) - 1)]) or any(
        c is not None and not c.isdigit() for c in (id_column, score_column))
    if has_header:
        header = [h.strip() for h in first]
        body, line0 = rows[1:], 2
    else:
        header = [str(i) for i in range(len(first))]
        body, line0 = rows, 1
    ic = _pick(header, id_column, ID_NAMES, "id", name, "--id-column", 0)
    sc = _pick(header, score_column, SCORE_NAMES, "score", name, "--score-column", 1 if ic != 1 else 0)
    if ic == sc:
        raise InputFormatError(f"{name}: the id and the score column are the same ({header[ic]!r}); pass "
                               f"--id-column and --score-column")
    scores: dict[str, float] = {}
    lines: dict[str, int] = {}
    for k, row in enumerate(body):
        line = line0 + k
        if max(ic, sc) >= len(row):
            raise InputFormatError(f"{name}: line {line} has {len(row)} columns; expected at least {max(ic, sc) + 1} "
                                   f"(id in column {header[ic]!r}, score in {header[sc]!r})")
        tid, cell = row[ic].strip(), row[sc].strip()
        if not tid:
            raise InputFormatError(f"{name}: line {line} has an empty id; give every row an id")
        if cell == "" or cell.lower() in _NO_SCORE:
            continue  # no score in the file for this id: the archive's, if any, stays
        try:
            value = float(cell)
        except ValueError:
            raise InputFormatError(f"{name}: line {line}: score {cell!r} for id {tid!r} is not a number; fix the "
                                   f"file or pick another column with --score-column") from None
        if math.isnan(value):  # e.g. '-nan', '+NaN': float() accepts more spellings than _NO_SCORE
            continue
        if tid in scores and scores[tid] != value:
            raise InputFormatError(f"{name}: id {tid!r} has score {scores[tid]} on line {lines[tid]} and {value} on "
                                   f"line {line}; keep one score per id")
        scores[tid] = value
        lines.setdefault(tid, line)
    return ScoreTable(name=name, scores=scores, sha256=hashlib.sha256(raw).hexdigest(), id_column=header[ic],
                      score_column=header[sc])
