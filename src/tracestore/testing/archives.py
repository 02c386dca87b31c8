"""Archives in the old pipeline's layouts, at any shape, and hostile ones, for tests and benchmarks.

Good archives (../shared/DESIGN.md "Input archives"): `write_record_archive` (a pickled list of trace
records: id under `id`/`question_id`/`trace_id`, `hidden_states` [L, D] or [L, T, D], optional `graphs` as L
PyG `Data`, optional `score`), `write_batch_archive` (a batch dict), `write_legacy_pt` (a preprocessed
float16 `.pt`), `write_scores_csv`. Values come from `synthetic_sequences` (heavy-tailed, with massive
activation dimensions), so trace i is the same whatever file it lands in.

Hostile archives: `write_hostile_archive(path, kind)` for each kind in HOSTILE_KINDS; it returns the
error class the converter must raise and words its message must contain.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .pickles import write_pickle
from .seed import seed_records
from .synthetic import synthetic_graphs, synthetic_ids, synthetic_scores, synthetic_sequences


def per_token_states(n: int, num_layers: int, hidden_size: int, tokens: int, seed: int = 0, *,
                     start: int = 0) -> list[np.ndarray]:
    """Per-token hidden states [L, T, D] float32 for traces start.., deterministic in (seed, trace)."""
    out = []
    for k in range(n):
        rng = np.random.default_rng([seed, 3, start + k])
        out.append(rng.standard_t(5, size=(num_layers, tokens, hidden_size)).astype(np.float32))
    return out


def make_records(n: int, num_layers: int, hidden_size: int, *, seed: int = 0, start: int = 0,
                 tokens: int | None = None, graphs: bool = False, hidden_states: bool = True,
                 scores: bool = True, id_key: str = "id", int_ids: bool = False, tensors: bool = False,
                 edge_attr_size: int = 1) -> list[dict[str, Any]]:
    """Trace records as the old pipeline pickled them.

    tokens: per-token hidden_states [L, T, D] (None: pooled [L, D]). graphs: add a list of L PyG `Data`
    per record. hidden_states=False with graphs=True: graph-only records. tensors: torch tensors instead of
    numpy arrays (plain-pickled tensors exercise the torch path of the unpickler)."""
    L, D = num_layers, hidden_size
    ids: list[Any] = list(range(start, start + n)) if int_ids else synthetic_ids(n, start)
    seqs = per_token_states(n, L, D, tokens, seed, start=start) if tokens else \
        list(synthetic_sequences(n, L, D, seed, start=start))
    sc = synthetic_scores(start + n, seed)[start:]
    gs = synthetic_graphs(n, L, D, seed, start=start, edge_attr_size=edge_attr_size) if graphs else None
    recs: list[dict[str, Any]] = []
    for k in range(n):
        rec: dict[str, Any] = {id_key: ids[k]}
        if hidden_states:
            rec["hidden_states"] = _maybe_tensor(seqs[k], tensors)
        if gs is not None:
            rec["graphs"] = [gs[k].to_pyg(layer) for layer in range(L)]
        if scores:
            rec["score"] = float(sc[k])
        recs.append(rec)
    return recs


def _maybe_tensor(a: np.ndarray, tensors: bool) -> Any:
    if not tensors:
        return a
    import torch

    return torch.from_numpy(np.ascontiguousarray(a))


def write_record_archive(path: str | os.PathLike[str], n: int, num_layers: int, hidden_size: int, *,
                         compresslevel: int | None = 1, protocol: int = 4, **kwargs: Any) -> list[str]:
    """Write a list of n records (see make_records for kwargs); returns their ids as strings."""
    recs = make_records(n, num_layers, hidden_size, **kwargs)
    key = kwargs.get("id_key", "id")
    write_pickle(path, recs, compresslevel=compresslevel, protocol=protocol)
    return [str(r[key]) for r in recs]


def write_batch_archive(path: str | os.PathLike[str], n: int, num_layers: int, hidden_size: int, *, seed: int = 0,
                        start: int = 0, tokens: int | None = None, compresslevel: int | None = 1,
                        protocol: int = 4, scores: bool = True) -> list[str]:
    """Write a batch dict {'ids', 'hidden_states' [n, L, D] (or [n, L, T, D]), 'scores'}; returns the ids."""
    ids = synthetic_ids(n, start)
    if tokens:
        hs = np.stack(per_token_states(n, num_layers, hidden_size, tokens, seed, start=start))
    else:
        hs = synthetic_sequences(n, num_layers, hidden_size, seed, start=start)
    obj: dict[str, Any] = {"ids": ids, "hidden_states": hs}
    if scores:
        obj["scores"] = synthetic_scores(start + n, seed)[start:]
    write_pickle(path, obj, compresslevel=compresslevel, protocol=protocol)
    return ids


def write_legacy_pt(path: str | os.PathLike[str], n: int, num_layers: int, hidden_size: int, *, seed: int = 0,
                    start: int = 0, with_ids: bool = True, score_key: str = "scores") -> list[str]:
    """Write a preprocessed `.pt` as preprocess_for_training.py did: {'sequences' float16 [n, L, D],
    'scores' (or 'labels'), 'ids'}. Returns the ids (as the converter names them when the file has none)."""
    import torch

    ids = synthetic_ids(n, start)
    seq = torch.from_numpy(synthetic_sequences(n, num_layers, hidden_size, seed, start=start)).half()
    obj: dict[str, Any] = {"sequences": seq, score_key: torch.from_numpy(synthetic_scores(start + n, seed)[start:])}
    if with_ids:
        obj["ids"] = ids
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, p)
    return ids if with_ids else [f"{p.name}#{i}" for i in range(n)]


def write_scores_csv(path: str | os.PathLike[str], ids: list[str], scores: Any, *,
                     header: tuple[str, str] | None = ("id", "score"), delimiter: str = ",",
                     extra: dict[str, float] | None = None) -> Path:
    """A ground_truth_scores.csv: one row per id (plus `extra` rows for ids with no trace)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = [f"{i}{delimiter}{float(s)!r}" for i, s in zip(ids, np.asarray(scores).tolist(), strict=True)]
    rows += [f"{i}{delimiter}{float(s)!r}" for i, s in (extra or {}).items()]
    lines = ([delimiter.join(header)] if header else []) + rows
    p.write_text("\n".join(lines) + "\n")
    return p


# -- hostile archives ----------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs `gadget` (builtins.exec by default) to create the file `marker`. Never load an
    archive holding it with plain pickle."""

    def __init__(self, marker: str, gadget: str = "exec") -> None:
        self.marker = marker
        self.gadget = gadget

    def __reduce__(self) -> tuple[Any, ...]:
        code = f"open({self.marker!r}, 'w').write('pwned')"
        if self.gadget == "exec":
            return (exec, (code,))
        if self.gadget == "eval":
            return (eval, (code,))
        if self.gadget == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.gadget == "subprocess":
            import subprocess

            return (subprocess.call, (["touch", self.marker],))
        raise ValueError(f"unknown gadget {self.gadget!r}")


class NestedTorchPayload:
    """A 'tensor storage' whose bytes are a malicious pickle: loaded through torch.storage._load_from_bytes,
    which calls torch.load(weights_only=False) on them, it would run the Payload."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import torch.storage

        return (torch.storage._load_from_bytes, (pickle.dumps(Payload(self.marker)),))


class NotAllowed:
    """A harmless class that is simply not on the allow-list."""

    def __init__(self) -> None:
        self.value = 1


class Reduce:
    """Pickles as `func(*args)` (then BUILD `state`, if given): how a hostile pickle calls an allowed
    constructor with arguments no honest pickler writes."""

    def __init__(self, func: Any, args: tuple[Any, ...], state: Any = None) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.func, self.args) if self.state is None else (self.func, self.args, self.state)


_PLACEHOLDER = "__TRACESTORE_HOSTILE_PLACEHOLDER__"


def _pickle_with(obj: Any, opcodes: bytes) -> bytes:
    """Pickle `obj` (protocol 2: no frames to keep consistent) with the one string _PLACEHOLDER in it replaced
    by raw opcodes that push one object."""
    data = pickle.dumps(obj, protocol=2)
    s = _PLACEHOLDER.encode()
    old = b"X" + struct.pack("<I", len(s)) + s
    assert data.count(old) == 1
    return data.replace(old, opcodes)


#: opcodes that push PyG's DataEdgeAttr class and BUILD an attribute `tracestore_pwn` onto the class itself (not
#: an instance); it has no __setstate__, so pickle's BUILD sets the attribute on the class
CLASS_BUILD_OPCODES = b"ctorch_geometric.data.data\nDataEdgeAttr\nN}X\x0e\x00\x00\x00tracestore_pwnX\x05\x00\x00\x00pwneds\x86b"


HOSTILE_KINDS = ("truncated_gzip", "not_a_pickle", "disallowed_class", "reduce_payload", "nested_torch_payload",
                 "gzip_bomb", "inconsistent_shapes", "duplicate_ids", "nan", "overflow", "attention_out_of_range",
                 "attention_wrong_shape", "attention_nan", "tokens_mismatch",
                 # allowed constructors asked to build big or uninitialised things from a few bytes
                 "uninitialised_array", "ndarray_call", "short_object_array", "bytearray_bomb", "expanded_tensor",
                 "expanded_tensor_pt", "shared_rows", "class_build")


@dataclass(frozen=True)
class HostileCase:
    kind: str
    path: Path
    error: type[Exception]
    mentions: tuple[str, ...]  # words the one-line error must contain (besides the file name)
    marker: Path | None = None  # a file that must NOT exist after the converter refused the archive


def write_gzip_bomb(path: str | os.PathLike[str], decompressed_bytes: int) -> Path:
    """A .pkl.gz that is a valid pickle of `decompressed_bytes` zero bytes (BINBYTES8), gzip level 9:
    about 1000:1."""
    p = Path(path)
    block = bytes(1 << 20)
    with open(p, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(b"\x80\x04\x8e" + struct.pack("<Q", decompressed_bytes))
        left = decompressed_bytes
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)
        f.write(b".")
    return p


def write_hostile_archive(path: str | os.PathLike[str], kind: str, *, num_layers: int = 3, hidden_size: int = 8,
                          marker: str | os.PathLike[str] | None = None,
                          bomb_bytes: int = 64 * 2**20) -> HostileCase:
    """Write an archive of one hostile kind (HOSTILE_KINDS) and say how the converter must refuse it.

    marker: for the code-running kinds, the file their payload would create (default: next to `path`).
    bomb_bytes: decompressed size of the gzip bomb (convert it with a smaller max_archive_bytes)."""
    from ..errors import (
        DuplicateIdError,
        Float16OverflowError,
        InputFormatError,
        InputTooLargeError,
        NonFiniteValueError,
        ShapeMismatchError,
        UnsafeInputError,
    )

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    L, D = num_layers, hidden_size
    mk = Path(marker) if marker is not None else p.with_name(p.name + ".PWNED")
    if kind == "truncated_gzip":
        write_record_archive(p, 8, L, D)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) * 2 // 3])
        return HostileCase(kind, p, InputFormatError, ("truncated",))
    if kind == "not_a_pickle":
        p.write_bytes(b"id,score\nq1,0.5\nq2,0.25\n" * 10)
        return HostileCase(kind, p, InputFormatError, ("not a pickle",))
    if kind == "disallowed_class":
        write_pickle(p, [{"id": "q0", "hidden_states": np.zeros((L, D), np.float32), "meta": NotAllowed()}])
        return HostileCase(kind, p, UnsafeInputError, ("NotAllowed", "allow-list"))
    if kind == "reduce_payload":
        write_pickle(p, [{"id": "q0", "hidden_states": np.zeros((L, D), np.float32), "x": Payload(str(mk))}])
        return HostileCase(kind, p, UnsafeInputError, ("exec", "allow-list"), marker=mk)
    if kind == "nested_torch_payload":
        write_pickle(p, [{"id": "q0", "hidden_states": np.zeros((L, D), np.float32), "x": NestedTorchPayload(str(mk))}])
        return HostileCase(kind, p, UnsafeInputError, ("weights_only",), marker=mk)
    if kind == "gzip_bomb":
        write_gzip_bomb(p, bomb_bytes)
        return HostileCase(kind, p, InputTooLargeError, ("decompresses to more than",))
    if kind in ("uninitialised_array", "ndarray_call", "short_object_array", "bytearray_bomb", "class_build"):
        from numpy._core.multiarray import _reconstruct

        x: Any = _PLACEHOLDER
        raw = None
        error: type[Exception]
        mentions: tuple[str, ...]
        if kind == "uninitialised_array":  # the memory of an earlier archive would show through
            x = Reduce(_reconstruct, (np.ndarray, (L, D), b"b"))
            error, mentions = UnsafeInputError, ("_reconstruct", "uninitialised")
        elif kind == "ndarray_call":
            x = Reduce(np.ndarray, ((L, D),))
            error, mentions = UnsafeInputError, ("numpy.ndarray", "uninitialised")
        elif kind == "short_object_array":  # numpy would read 1000 pointers from a list of one: a crash
            x = Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (1000,), np.dtype(object), False, ["a"]))
            error, mentions = UnsafeInputError, ("object array", "1,000")
        elif kind == "bytearray_bomb":
            x = Reduce(bytearray, (2**40,))
            error, mentions = UnsafeInputError, ("bytearray(1099511627776", "not in the file")
        else:
            raw = CLASS_BUILD_OPCODES
            error, mentions = UnsafeInputError, ("torch_geometric.data.data.DataEdgeAttr", "BUILD on a class")
        rec = {"id": "q0", "hidden_states": np.zeros((L, D), np.float32), "x": x}
        data = pickle.dumps([rec], protocol=2) if raw is None else _pickle_with([rec], raw)
        with open(p, "wb") as raw_f, gzip.GzipFile(fileobj=raw_f, mode="wb", mtime=0) as f:
            f.write(data)
        return HostileCase(kind, p, error, mentions)
    if kind in ("expanded_tensor", "expanded_tensor_pt"):
        import torch

        # 20,000 traces declared over one trace's values: 400 bytes of storage
        hs = torch.zeros(1, L, D).expand(20_000, L, D)
        batch = {"hidden_states": hs, "ids": [f"q{i}" for i in range(3)]}
        if kind == "expanded_tensor_pt":
            p = p.with_name(p.name.split(".")[0] + ".pt")
            torch.save(batch, p)
        else:
            write_pickle(p, batch)
        return HostileCase(kind, p, InputFormatError, ("stride (0,", "overlapping strides", ".contiguous()"))
    if kind == "shared_rows":
        row = [0.5] * 512
        mid = [row] * 512  # 2 MiB as an array, from 512 references
        write_pickle(p, [{"id": "q0", "hidden_states": [mid] * 512}])  # 1 GiB from 1,024 references
        return HostileCase(kind, p, InputTooLargeError, ("np.asarray would materialise", "refer to the same objects"))
    recs = make_records(6, L, D)
    if kind == "inconsistent_shapes":
        recs[3]["hidden_states"] = np.zeros((L + 1, D), np.float32)
        write_pickle(p, recs)
        return HostileCase(kind, p, ShapeMismatchError, (repr(recs[3]["id"]), f"({L + 1}, {D})", f"({L}, {D})"))
    if kind == "duplicate_ids":
        recs[4]["id"] = recs[1]["id"]
        write_pickle(p, recs)
        return HostileCase(kind, p, DuplicateIdError, (repr(recs[1]["id"]), "twice"))
    if kind == "nan":
        recs[2]["hidden_states"][1, 5 % D] = np.nan
        write_pickle(p, recs)
        return HostileCase(kind, p, NonFiniteValueError, (repr(recs[2]["id"]), "layer 1", "NaN", "allow_nan"))
    if kind == "overflow":
        recs[5]["hidden_states"][2 % L, 3 % D] = 1e6
        write_pickle(p, recs)
        return HostileCase(kind, p, Float16OverflowError, (repr(recs[5]["id"]), f"layer {2 % L}", "1e+06", "clip"))
    if kind.startswith("attention") or kind == "tokens_mismatch":
        srecs = seed_records(3, L, D, num_heads=2, tokens=5)
        tid = repr(srecs[1]["question_id"])
        if kind == "attention_out_of_range":
            srecs[1]["attentions"][1][0, 3, 2] = 1.5
            write_pickle(p, srecs)
            return HostileCase(kind, p, InputFormatError, (tid, "layer 1", "1.5", "[0, 1]"))
        if kind == "attention_wrong_shape":
            srecs[1]["attentions"][2] = srecs[1]["attentions"][2][:, :4, :4]
            write_pickle(p, srecs)
            return HostileCase(kind, p, ShapeMismatchError, (tid, "layer 2", "(2, 4, 4)", "5 tokens"))
        if kind == "attention_nan":
            srecs[1]["attentions"][0][1, 4, 0] = np.nan
            write_pickle(p, srecs)
            return HostileCase(kind, p, NonFiniteValueError, (tid, "layer 0", "NaN"))
        srecs[1]["tokens"] = srecs[1]["tokens"][:4]
        write_pickle(p, srecs)
        return HostileCase(kind, p, ShapeMismatchError, (tid, "'tokens' has 4 ids", "5 tokens"))
    raise ValueError(f"unknown hostile kind {kind!r}; one of {HOSTILE_KINDS}")


def write_archive_set(folder: str | os.PathLike[str], *, files: int, traces_per_file: int, num_layers: int,
                      hidden_size: int, layout: str = "records", compresslevel: int | None = 1, seed: int = 0,
                      scores_csv: bool = True, **kwargs: Any) -> tuple[list[Path], list[str], Path | None]:
    """A folder of `files` archives of consecutive traces (`layout` 'records', 'batch' or 'pt') and a
    ground_truth_scores.csv for them. Returns (archive paths, all ids in order, csv path or None)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, ids = [], []
    for f in range(files):
        start = f * traces_per_file
        if layout == "records":
            p = folder / f"traces_{f:04d}.pkl.gz"
            ids += write_record_archive(p, traces_per_file, num_layers, hidden_size, seed=seed, start=start,
                                        compresslevel=compresslevel, **kwargs)
        elif layout == "batch":
            p = folder / f"traces_{f:04d}.pkl.gz"
            ids += write_batch_archive(p, traces_per_file, num_layers, hidden_size, seed=seed, start=start,
                                       compresslevel=compresslevel, **kwargs)
        elif layout == "pt":
            p = folder / f"preprocessed_batch_{f:04d}.pt"
            ids += write_legacy_pt(p, traces_per_file, num_layers, hidden_size, seed=seed, start=start, **kwargs)
        else:
            raise ValueError(f"layout must be 'records', 'batch' or 'pt', got {layout!r}")
        paths.append(p)
    csv = None
    if scores_csv:
        csv = write_scores_csv(folder / "ground_truth_scores.csv", ids, synthetic_scores(len(ids), seed + 1))
    return paths, ids, csv


__all__ = ["CLASS_BUILD_OPCODES", "HOSTILE_KINDS", "HostileCase", "NestedTorchPayload", "NotAllowed", "Payload", "Reduce",
           "make_records",
           "per_token_states", "write_archive_set", "write_batch_archive", "write_gzip_bomb", "write_hostile_archive",
           "write_legacy_pt", "write_pickle", "write_record_archive", "write_scores_csv"]

