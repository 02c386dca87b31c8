"""The allow-list unpickler and the .pt loader: what loads, what is refused, and that nothing runs."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracestore.convert.pickle_stream import load_pickle
from tracestore.convert.safe_unpickle import SafeUnpickler, allowed_globals, load_torch
from tracestore.errors import InputFormatError, InputTooLargeError, UnsafeInputError
from tracestore.testing.archives import NestedTorchPayload, NotAllowed, Payload, write_gzip_bomb, write_pickle

CAP = 1 << 30


_TMP: list[Path] = []


@pytest.fixture(autouse=True, params=["c", "streaming"])
def unpickler(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Every test of the allow-list runs through both unpicklers: SafeUnpickler (whole objects) and the
    streaming one that archives are read with (both pure Python, sharing the allow-list and its checks)."""
    _TMP[:] = [tmp_path]
    _KIND[:] = [request.param]
    yield request.param


_KIND: list[str] = ["c"]


def _loads(data: bytes) -> object:
    if _KIND[0] == "c":
        return SafeUnpickler(io.BytesIO(data), name="test.pkl").load()
    p = _TMP[0] / "test.pkl"
    p.write_bytes(data)
    return load_pickle(p, max_bytes=CAP, name="test.pkl")[0]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_numpy_arrays_and_scalars_load_in_every_protocol(protocol):
    obj = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "h": np.ones(3, np.float16), "s": np.float32(2.5),
           "i": np.int64(7), "ids": ["q1", 2]}
    got = _loads(pickle.dumps(obj, protocol=protocol))
    np.testing.assert_array_equal(got["a"], obj["a"])
    assert got["a"].dtype == np.float32 and got["h"].dtype == np.float16
    assert got["s"] == np.float32(2.5) and got["i"] == 7 and got["ids"] == ["q1", 2]


def test_numpy1_module_names_load():
    # numpy < 2 wrote numpy.core.multiarray; protocol 2 names globals as text, so the bytes can be edited
    data = pickle.dumps(np.arange(5, dtype=np.float32), protocol=2)
    assert b"numpy._core.multiarray" in data
    got = _loads(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    np.testing.assert_array_equal(got, np.arange(5, dtype=np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plain_pickled_torch_tensors_load(dtype):
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dtype)
    got = _loads(pickle.dumps({"hidden_states": t}))["hidden_states"]
    assert got.dtype == dtype and torch.equal(got, t)


def test_pyg_data_loads():
    from torch_geometric.data import Data

    d = Data(x=torch.randn(4, 3), edge_index=torch.tensor([[0, 1], [1, 2]]), edge_attr=torch.rand(2))
    got = _loads(pickle.dumps([d]))[0]
    assert torch.equal(got.x, d.x) and torch.equal(got.edge_index, d.edge_index)


def test_a_class_outside_the_allow_list_is_refused_by_name():
    with pytest.raises(UnsafeInputError, match=r"test\.pkl: .*tracestore\.testing\.archives\.NotAllowed.*allow-list"):
        _loads(pickle.dumps([NotAllowed()]))


@pytest.mark.parametrize("gadget", ["exec", "eval", "system", "subprocess"])
def test_reduce_payloads_never_run(tmp_path, gadget):
    marker = tmp_path / "PWNED"
    data = pickle.dumps({"hidden_states": np.zeros(3), "x": Payload(str(marker), gadget)})
    with pytest.raises(UnsafeInputError, match="allow-list"):
        _loads(data)
    assert not marker.exists()


def test_nested_payload_in_tensor_storage_bytes_never_runs(tmp_path):
    # torch.storage._load_from_bytes calls torch.load(weights_only=False) on bytes from the pickle
    marker = tmp_path / "PWNED"
    path = write_pickle(tmp_path / "nested.pkl.gz", [{"id": "a", "x": NestedTorchPayload(str(marker))}])
    with pytest.raises(UnsafeInputError, match=r"nested\.pkl\.gz: .*weights_only"):
        load_pickle(path, max_bytes=CAP)
    assert not marker.exists()


def test_codecs_encode_is_limited_to_latin1():
    # protocol 2 stores bytes as _codecs.encode(text, 'latin1'); any other codec is refused
    evil = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    with pytest.raises((pickle.UnpicklingError, UnsafeInputError), match="latin-1"):
        _loads(evil)
    assert "_codecs.encode" in allowed_globals()


def test_gzip_bomb_stops_at_the_cap(tmp_path):
    bomb = write_gzip_bomb(tmp_path / "bomb.pkl.gz", 64 * 2**20)
    assert bomb.stat().st_size < 2**20
    with pytest.raises(InputTooLargeError, match=r"bomb\.pkl\.gz: decompresses to more than 8,388,608 bytes"):
        load_pickle(bomb, max_bytes=8 * 2**20)


def test_a_length_field_claiming_gigabytes_is_refused_before_allocating(tmp_path):
    p = tmp_path / "claims.pkl"
    p.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 8 * 2**30) + b"\x00" * 16)  # BINBYTES8 of 8 GiB
    with pytest.raises(InputFormatError, match=r"claims\.pkl: .*asks for 8,589,934,592 bytes.*truncated"):
        load_pickle(p, max_bytes=CAP)


def test_truncated_gzip_and_not_a_pickle(tmp_path):
    p = write_pickle(tmp_path / "t.pkl.gz", [{"id": "a", "hidden_states": np.random.rand(4, 64)}] * 20)
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(InputFormatError, match=r"t\.pkl\.gz: .*truncated"):
        load_pickle(p, max_bytes=CAP)
    q = tmp_path / "q.pkl"
    q.write_bytes(b"id,score\nq1,0.5\n")
    with pytest.raises(InputFormatError, match=r"q\.pkl: not a pickle"):
        load_pickle(q, max_bytes=CAP)


def test_load_pickle_reports_crc_and_sizes(tmp_path):
    import google_crc32c

    p = write_pickle(tmp_path / "a.pkl.gz", {"x": np.arange(100.0)})
    obj, info = load_pickle(p, max_bytes=CAP)
    raw = gzip.decompress(p.read_bytes())
    assert info == {"crc32c": f"{google_crc32c.value(p.read_bytes()):08x}", "bytes": p.stat().st_size,
                    "decompressed_bytes": len(raw)}
    np.testing.assert_array_equal(obj["x"], np.arange(100.0))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), compress=st.booleans())
def test_random_bytes_only_raise_our_errors(tmp_path, data, compress):
    p = tmp_path / "fuzz.pkl"
    p.write_bytes(gzip.compress(data) if compress else data)
    try:
        load_pickle(p, max_bytes=1 << 20)
    except (InputFormatError, UnsafeInputError, InputTooLargeError):
        pass


def test_pt_with_pyg_data_loads_and_leaves_torch_safe_globals_as_they_were(tmp_path):
    import torch.serialization as ts
    from torch_geometric.data import Data

    p = tmp_path / "g.pt"
    torch.save({"sequences": torch.zeros(2, 3, 4, dtype=torch.float16), "graphs": [Data(x=torch.ones(2, 4))]}, p)
    before = set(ts.get_safe_globals())
    obj, info = load_torch(p, max_bytes=CAP)
    assert set(ts.get_safe_globals()) == before  # the same entries (torch keeps them in a set: order may change)
    assert obj["sequences"].dtype == torch.float16 and torch.equal(obj["graphs"][0].x, torch.ones(2, 4))
    assert info["bytes"] == p.stat().st_size


def test_pt_with_a_payload_is_refused_without_fallback(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "evil.pt"
    torch.save({"sequences": torch.zeros(1, 2, 2), "x": Payload(str(marker))}, p)
    with pytest.raises(UnsafeInputError, match=r"evil\.pt: torch\.load\(weights_only=True\) refused it"):
        load_torch(p, max_bytes=CAP)
    assert not marker.exists()
