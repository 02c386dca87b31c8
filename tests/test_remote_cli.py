"""Every entry point takes an s3:// URL, with nothing but the standard AWS_* environment variables:
tools/convert -o s3://..., tracestore info / verify / train."""

from __future__ import annotations

import json

import numpy as np
import pytest

import tracestore
import tracestore.store.urls
from tracestore.cli import main
from tracestore.testing.archives import write_archive_set
from tracestore.testing.s3 import moto_s3

L, D = 3, 16


@pytest.fixture(scope="module")
def s3_env():
    with moto_s3() as ep, pytest.MonkeyPatch.context() as mp:
        for k, v in {"AWS_ENDPOINT_URL": ep.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                     "AWS_SECRET_ACCESS_KEY": "a-secret-never-printed", "AWS_REGION": "us-east-1",
                     "AWS_ALLOW_HTTP": "true"}.items():
            mp.setenv(k, v)
        yield ep


def test_convert_info_verify_train_on_s3(s3_env, tmp_path, capsys):
    paths, ids, csv = write_archive_set(tmp_path / "in", files=2, traces_per_file=20, num_layers=L, hidden_size=D)
    url = s3_env.url("cli/traces.zarr")
    assert main(["convert", str(tmp_path / "in"), "-o", url, "--scores", str(csv), "--workers", "0"]) == 0
    local = tmp_path / "local.zarr"
    assert main(["convert", str(tmp_path / "in"), "-o", str(local), "--scores", str(csv), "--workers", "0"]) == 0
    remote, ref = tracestore.open(url), tracestore.open(local)
    assert list(remote.ids) == list(ref.ids) == ids
    np.testing.assert_array_equal(remote.sequences[:], ref.sequences[:])
    np.testing.assert_array_equal(remote.scores, ref.scores)

    capsys.readouterr()
    assert main(["info", url]) == 0
    assert main(["verify", url]) == 0
    out = capsys.readouterr()
    assert "40" in out.out and "a-secret-never-printed" not in out.out + out.err

    run = tmp_path / "run"
    assert main(["train", "--store", url, "--model", "lstm", "--task", "regression", "--epochs", "1",
                 "--batch-size", "8", "--device", "cpu", "--out", str(run), "--no-progress"]) == 0
    assert "val_mse" in json.loads((run / "summary.json").read_text())


def test_convert_to_s3_refuses_to_overwrite_without_the_flag(s3_env, tmp_path, capsys):
    write_archive_set(tmp_path / "in", files=1, traces_per_file=5, num_layers=L, hidden_size=D)
    url = s3_env.url("cli/twice.zarr")
    assert main(["convert", str(tmp_path / "in"), "-o", url, "--workers", "0"]) == 0
    capsys.readouterr()
    # the same conversion again: up to date, nothing written
    assert main(["convert", str(tmp_path / "in"), "-o", url, "--workers", "0"]) == 0
    assert f"{url} is up to date (5 traces from 1 archives)" in capsys.readouterr().out
    # other options: refused without --overwrite, replaced with it (the swap by copies, on object storage)
    assert main(["convert", str(tmp_path / "in"), "-o", url, "--workers", "0", "--pool", "mean"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    gen = tracestore.open(url).attrs["generation"]
    assert main(["convert", str(tmp_path / "in"), "-o", url, "--workers", "0", "--pool", "mean", "--overwrite"]) == 0
    s = tracestore.open(url)
    assert len(s) == 5 and s.attrs["generation"] != gen
    assert main(["verify", url]) == 0
    assert list(tracestore.store.urls.resolve(url + ".tracestore-new").list()) == []
    assert list(tracestore.store.urls.resolve(url + ".tracestore-lock").list()) == []


def test_seed_archives_convert_to_s3_like_to_disk(s3_env, tmp_path):
    from tracestore.testing.seed import write_seed_raw_archive, write_seed_scores_csv

    ids = write_seed_raw_archive(tmp_path / "in" / "batch_0000.pkl.gz", 6, L, D, num_heads=2, tokens=(2, 9))
    ids += write_seed_raw_archive(tmp_path / "in" / "batch_0001.pkl.gz", 5, L, D, num_heads=2, tokens=(2, 9), start=6)
    csv = write_seed_scores_csv(tmp_path / "gt.csv", ids)
    url = s3_env.url("cli/seed.zarr")
    local = tmp_path / "seed.zarr"
    for dest in (url, str(local)):
        assert main(["convert", str(tmp_path / "in"), "-o", dest, "--scores", str(csv), "--workers", "1",
                     "--no-progress", "-q"]) == 0
    remote, ref = tracestore.open(url), tracestore.open(local)
    assert remote.ids.tolist() == ref.ids.tolist() == ids
    assert remote.fields["generated_answer_clean"].tolist() == ref.fields["generated_answer_clean"].tolist()
    for i in (0, 7, 10):
        a, b = remote[i], ref[i]
        np.testing.assert_array_equal(a.tokens.hidden, b.tokens.hidden)
        np.testing.assert_array_equal(a.tokens.ids, b.tokens.ids)
        assert a.tokens.text == b.tokens.text
        for layer in range(L):
            np.testing.assert_array_equal(a.graph.edge_index[layer], b.graph.edge_index[layer])
            np.testing.assert_array_equal(a.graph.edge_attr[layer], b.graph.edge_attr[layer])
    assert main(["verify", url]) == 0
    batch = next(iter(tracestore.TraceLoader(url, batch_size=4, with_graphs=True, graph_layer=1, device="cpu",
                                             shuffle=False)))
    assert batch.graph.num_graphs == 4 and batch.ids == ids[:4]
