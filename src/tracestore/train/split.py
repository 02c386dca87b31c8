"""The train/validation split of a run: deterministic in (ids, seed, fraction), independent of store order,
stratified by label for classification, optionally by group (traces of one prompt -- several sampled
answers, or the true and false versions of one fact -- stay on one side, or validation would score
near-duplicates of training traces), and recorded in RUN_DIR/split.json so a resumed run (or a reader of
the results) sees exactly the traces each side held."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, TrainConfigError

__all__ = ["Split", "make_split", "SPLIT_NAME"]

SPLIT_NAME = "split.json"


@dataclass
class Split:
    """Train and validation ids of a run, and how they were drawn."""

    seed: int
    val_fraction: float
    stratified: bool
    train_ids: list[str]
    val_ids: list[str]
    #: ids left out because their score is unknown (NaN)
    unscored_ids: list[str]
    #: how ids were grouped (a regular expression), or None
    group_pattern: str | None = None

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


def make_split(ids: Any, scores: Any, *, val_fraction: float, seed: int, labels: Any | None = None,
               group_pattern: str | None = None) -> Split:
    """Split traces into train and validation by id.

    Ids are sorted first, so the split depends only on the set of ids, the seed and the fraction, not on
    the order traces were written. With `labels` (classification) each class is split separately so both
    sides keep the class balance. Traces with a NaN score are left out of both sides.

    Parameters
    ----------
    ids, scores : array-like
        One per trace.
    val_fraction : float
        Share of traces in validation, in (0, 1).
    seed : int
        Seed of the permutation.
    labels : array-like, optional
        Class of each trace, for stratification (ignored with groups: groups are the units then).
    group_pattern : str, optional
        A regular expression whose first group, matched at the start of an id, names the trace's group;
        all traces of a group land on the same side.
    """
    if not 0.0 < val_fraction < 1.0:
        raise TrainConfigError(f"val_fraction={val_fraction}: must lie strictly between 0 and 1 (e.g. 0.2)")
    ids_arr = np.asarray(ids).astype(str)
    sc = np.asarray(scores, dtype=np.float64)
    known = ~np.isnan(sc)
    unscored = sorted(ids_arr[~known].tolist())
    if group_pattern is not None:
        return _group_split(ids_arr[known], group_keys(ids_arr[known], group_pattern), val_fraction=val_fraction,
                            seed=seed, unscored=unscored, pattern=group_pattern)
    strata = np.zeros(len(ids_arr), dtype=np.int64) if labels is None else np.asarray(labels).astype(np.int64)
    rng = np.random.default_rng([seed, 0x5EED])
    train: list[str] = []
    val: list[str] = []
    for s in np.unique(strata[known]):
        members = np.sort(ids_arr[known & (strata == s)])
        perm = rng.permutation(len(members))
        n_val = int(round(len(members) * val_fraction))
        if len(members) >= 2:  # keep at least one trace on each side of every class
            n_val = min(max(n_val, 1), len(members) - 1)
        val.extend(members[perm[:n_val]].tolist())
        train.extend(members[perm[n_val:]].tolist())
    if not train or not val:
        raise TrainConfigError(f"{int(known.sum())} scored traces cannot be split into train and validation with "
                               f"val_fraction={val_fraction}; the store needs at least 2 traces with a known score")
    return Split(seed=seed, val_fraction=val_fraction, stratified=labels is not None, train_ids=sorted(train),
                 val_ids=sorted(val), unscored_ids=unscored)


def _group_split(ids: np.ndarray, keys: np.ndarray, *, val_fraction: float, seed: int, unscored: list[str],
                 pattern: str) -> Split:
    uniq = np.array(sorted(set(keys.tolist())), dtype=object)
    if uniq.size < 2:
        raise TrainConfigError(f"--group-pattern {pattern!r} puts all {ids.size} scored traces in {uniq.size} group(s); "
                               f"a split needs at least 2 groups")
    rng = np.random.default_rng([seed, 0x5EED])
    perm = rng.permutation(uniq.size)
    n_val = min(max(int(round(uniq.size * val_fraction)), 1), uniq.size - 1)
    val_groups = set(uniq[perm[:n_val]].tolist())
    in_val = np.array([k in val_groups for k in keys], dtype=bool)
    return Split(seed=seed, val_fraction=val_fraction, stratified=False, train_ids=sorted(ids[~in_val].tolist()),
                 val_ids=sorted(ids[in_val].tolist()), unscored_ids=unscored, group_pattern=pattern)
