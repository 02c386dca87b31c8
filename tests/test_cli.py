"""The `tracestore` command line (in-process through main()) and the tools/convert shim (as a script)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracestore.cli import COMMANDS, main
from tracestore.testing.archives import write_archive_set, write_record_archive

ROOT = Path(__file__).resolve().parent.parent
L, D = 3, 16


@pytest.fixture
def store(tmp_path):
    write_archive_set(tmp_path / "in", files=2, traces_per_file=5, num_layers=L, hidden_size=D)
    rc = main(["convert", str(tmp_path / "in"), "-o", str(tmp_path / "s.zarr"), "--scores",
               str(tmp_path / "in" / "ground_truth_scores.csv"), "--workers", "0", "--no-progress", "-q"])
    assert rc == 0
    return tmp_path / "s.zarr"


def test_subcommands_are_a_list_that_can_grow():
    assert [c.name for c in COMMANDS][:3] == ["convert", "info", "verify"]


def test_convert_prints_a_summary(tmp_path, capsys):
    write_archive_set(tmp_path / "in", files=2, traces_per_file=4, num_layers=L, hidden_size=D)
    rc = main(["convert", str(tmp_path / "in" / "traces_0001.pkl.gz"), str(tmp_path / "in" / "traces_0000.pkl.gz"),
               "-o", str(tmp_path / "s.zarr"), "--scores", str(tmp_path / "in" / "ground_truth_scores.csv"),
               "--workers", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    for part in ("converted 2 archive(s)", "traces 8, layers 3, hidden size 16", "bytes in", "out/in", "time",
                 "sequences: float16: max |x|", "scores from ground_truth_scores.csv: 8 traces scored",
                 "verified: sample"):
        assert part in out, part


def test_info(store, capsys):
    assert main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "10 traces x 3 layers x 16 hidden" in out and "scores: 10 known, 0 missing" in out
    assert "from 2 archive(s): traces_0000.pkl.gz, traces_0001.pkl.gz" in out
    assert main(["info", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_traces"] == 10 and info["float16_report"]["sequences"]["values"] == 10 * L * D


def test_verify_ok_and_corrupt(store, capsys):
    assert main(["verify", str(store)]) == 0
    assert "ok:" in capsys.readouterr().out
    shard = store / "sequences" / "c" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[3 * L * D * 2 + 4 + 10] ^= 0xFF  # a byte inside inner chunk 3 (each chunk: L*D float16 + crc32c)
    shard.write_bytes(bytes(data))
    assert main(["verify", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "array 'sequences' chunk 3 of sequences/c/0/0/0" in err[0] and "crc32c" in err[0]


def test_verify_names_a_corrupt_small_array_and_an_unfinished_store(store, capsys, tmp_path):
    chunk = store / "scores" / "c" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    assert main(["verify", str(store)]) == 2
    assert "array 'scores' chunk 0" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nothing")]) == 2
    assert "no store here" in capsys.readouterr().err


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "x.pkl").write_bytes(b"not a pickle at all")
    assert main(["convert", str(tmp_path / "x.pkl"), "-o", str(tmp_path / "s.zarr"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("tracestore convert: error: x.pkl: not a pickle")


def test_tools_convert_runs_as_a_script(tmp_path):
    write_record_archive(tmp_path / "a.pkl.gz", 3, L, D)
    # with the venv's python named explicitly
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "convert"), str(tmp_path / "a.pkl.gz"), "-o",
                        str(tmp_path / "s.zarr"), "--workers", "0", "--no-progress"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "traces 3, layers 3" in r.stdout
    # as an executable, with the venv "activated" (its bin first on PATH: the shebang finds its python3)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    r = subprocess.run([str(ROOT / "tools" / "convert"), str(tmp_path / "a.pkl.gz"), "-o", str(tmp_path / "s.zarr")],
                       capture_output=True, text=True, timeout=300, env=env)
    # the same conversion again (issue 11 item 4): up to date, nothing written
    assert r.returncode == 0 and "is up to date (3 traces from 1 archives)" in r.stdout, r.stderr


def test_info_of_the_golden_stores(capsys):
    from pathlib import Path

    data = Path(__file__).resolve().parent / "data"
    for name in ("golden_v1", "golden_v2"):
        assert main(["info", str(data / name)]) == 0
        out = capsys.readouterr().out
        assert "from 1 archive(s): golden.pkl" in out and "tokens: 15" in out


def test_tools_convert_from_the_python_the_venv_was_made_from(tmp_path):
    # the venv's bin/python is a symlink to this very interpreter, which lacks the packages: tools/convert
    # must still find the checkout's venv (a review found "No module named zarr")
    base = Path(sys.base_prefix) / "bin" / "python3"
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve() or not base.exists():
        pytest.skip("needs the checkout's .venv and the python it was made from")
    probe = subprocess.run([str(base), "-c", "import zarr"], capture_output=True, env={"PATH": "/usr/bin:/bin"})
    if probe.returncode == 0:
        pytest.skip("the base python has zarr itself")
    write_record_archive(tmp_path / "a.pkl.gz", 3, L, D)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run([str(base), str(ROOT / "tools" / "convert"), str(tmp_path / "a.pkl.gz"), "-o",
                        str(tmp_path / "s.zarr"), "--workers", "0", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "traces 3, layers 3" in r.stdout
