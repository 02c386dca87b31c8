"""The train/validation/test split of a run: deterministic in (ids, seed, fractions), independent of store
order, stratified by label for classification, optionally by group (traces of one prompt -- several sampled
answers, or the true and false versions of one fact -- stay on one side, or validation and test would score
near-duplicates of training traces), and recorded in RUN_DIR/split.json so a resumed run (or a reader of
the results) sees exactly the traces each side held.

The default of `tracestore train` is the seed pipeline's 70/15/15: the model is selected on validation and
reported on test, which it never saw."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, TrainConfigError

__all__ = ["Split", "make_split", "group_keys", "SPLIT_NAME"]

SPLIT_NAME = "split.json"


@dataclass
class Split:
    """Train, validation and test ids of a run, and how they were drawn."""

    seed: int
    val_fraction: float
    stratified: bool
    train_ids: list[str]
    val_ids: list[str]
    #: ids left out because their score is unknown (NaN)
    unscored_ids: list[str]
    #: how ids were grouped (a regular expression), or None
    group_pattern: str | None = None
    #: share of traces held out for the final test (0: a train/validation split only)
    test_fraction: float = 0.0
    test_ids: list[str] = field(default_factory=list)
    #: the store field that named the groups, or None
    group_field: str | None = None

    def save(self, run_dir: str | os.PathLike[str]) -> Path:
        path = Path(run_dir) / SPLIT_NAME
        tmp = path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> Split:
        path = Path(run_dir) / SPLIT_NAME
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: cannot read the run's split ({e}); it is written at the start of a "
                                  f"run, so this directory was not made by `tracestore train`") from e

    def sides(self) -> tuple[list[str], list[str], list[str]]:
        """(train, validation, test) ids."""
        return self.train_ids, self.val_ids, self.test_ids


def group_keys(ids: Any, pattern: str) -> np.ndarray:
    """The group of every id: the first capture group of `pattern` matched at the start of the id (the
    whole match when the pattern has no group). An id it does not match is an error naming it."""
    import re

    rx = re.compile(pattern)
    keys = []
    for i in np.asarray(ids).astype(str):
        m = rx.match(i)
        if m is None:
            raise TrainConfigError(f"id {i!r} does not match --group-pattern {pattern!r}; give a pattern that matches "
                                   f"the start of every id, e.g. '^(q\\d+)_' for ids like 'q00017_sample3'")
        keys.append(m.group(1) if rx.groups else m.group(0))
    return np.asarray(keys, dtype=object)


def _cut(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """How many of n units go to validation and to test: the rounded shares, with at least one unit on every
    side that has a positive share while enough units remain (train keeps at least one)."""
    n_val = int(round(n * val_fraction))
    n_test = int(round(n * test_fraction))
    sides = 2 + (test_fraction > 0)
    if n >= sides:
        n_val = max(n_val, 1)
        if test_fraction > 0:
            n_test = max(n_test, 1)
    elif n >= 2:  # two units, three sides: validation before test
        n_val, n_test = 1, 0
    while n_val + n_test > n - 1 and n_val + n_test > 0:
        if n_test >= n_val and n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    return n_val, n_test


def make_split(ids: Any, scores: Any, *, val_fraction: float, seed: int, labels: Any | None = None,
               group_pattern: str | None = None, groups: Any | None = None, group_field: str | None = None,
               test_fraction: float = 0.0) -> Split:
    """Split traces into train, validation and (with `test_fraction`) test by id.

    Ids are sorted first, so the split depends only on the set of ids, the seed and the fractions, not on
    the order traces were written. With `labels` (classification) each class is split separately so every
    side keeps the class balance; with groups, the groups are the units, stratified by their label (a group
    whose traces disagree is its own stratum). Traces with a NaN score are left out of every side.

    Parameters
    ----------
    ids, scores : array-like
        One per trace.
    val_fraction, test_fraction : float
        Shares of traces (or groups) in validation and test; val_fraction in (0, 1), test_fraction in
        [0, 1), their sum below 1.
    seed : int
        Seed of the permutation.
    labels : array-like, optional
        Class of each trace, for stratification.
    group_pattern : str, optional
        A regular expression whose first group, matched at the start of an id, names the trace's group;
        all traces of a group land on the same side.
    groups : array-like, optional
        Instead of a pattern, the group of every trace (e.g. a store field such as `question_id`, named by
        `group_field` in the record).
    """
    if not 0.0 < val_fraction < 1.0:
        raise TrainConfigError(f"val_fraction={val_fraction}: must lie strictly between 0 and 1 (e.g. 0.15)")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise TrainConfigError(f"test_fraction={test_fraction} with val_fraction={val_fraction}: the test share must "
                               f"lie in [0, 1) and leave traces to train on (e.g. 0.15 and 0.15)")
    if group_pattern is not None and groups is not None:
        raise TrainConfigError("--group-pattern and --group-field both name the groups; give one of them")
    ids_arr = np.asarray(ids).astype(str)
    sc = np.asarray(scores, dtype=np.float64)
    known = ~np.isnan(sc)
    unscored = sorted(ids_arr[~known].tolist())
    k_ids = ids_arr[known]
    strata = (np.zeros(len(ids_arr), dtype=np.int64) if labels is None
              else np.asarray(labels).astype(np.int64))[known]
    if group_pattern is not None or groups is not None:
        keys = (group_keys(k_ids, group_pattern) if group_pattern is not None
                else np.asarray(groups).astype(str)[known].astype(object))
        units = np.array(sorted(set(keys.tolist())), dtype=object)
        if units.size < 2:
            how = f"--group-pattern {group_pattern!r}" if group_pattern is not None else f"group field {group_field!r}"
            raise TrainConfigError(f"{how} puts all {k_ids.size} scored traces in {units.size} group(s); a split "
                                   f"needs at least 2 groups")
        # a group's stratum: its label when all its traces agree, else its own "mixed" stratum
        first: dict[str, int] = {}
        for k, s in zip(keys.tolist(), strata.tolist(), strict=True):
            first[k] = s if first.get(k, s) == s else -2
        unit_strata = np.array([first[u] for u in units.tolist()], dtype=np.int64)
    else:
        keys = k_ids.astype(object)
        order = np.argsort(k_ids, kind="stable")
        units = k_ids[order].astype(object)
        unit_strata = strata[order]
    rng = np.random.default_rng([seed, 0x5EED])
    side_of: dict[str, int] = {}  # unit -> 0 train, 1 validation, 2 test
    for s in np.unique(unit_strata):
        members = units[unit_strata == s]
        perm = rng.permutation(len(members))
        n_val, n_test = _cut(len(members), val_fraction, test_fraction)
        for j, u in enumerate(members[perm].tolist()):
            side_of[u] = 1 if j < n_val else 2 if j < n_val + n_test else 0
    side = np.array([side_of[k] for k in keys.tolist()], dtype=np.int64)
    train, val, test = (sorted(k_ids[side == i].tolist()) for i in range(3))
    if not train or not val:
        raise TrainConfigError(f"{int(known.sum())} scored traces cannot be split into train and validation with "
                               f"val_fraction={val_fraction}; the store needs at least 2 traces with a known score")
    return Split(seed=seed, val_fraction=val_fraction, stratified=labels is not None, train_ids=train, val_ids=val,
                 unscored_ids=unscored, group_pattern=group_pattern, test_fraction=test_fraction, test_ids=test,
                 group_field=group_field)
