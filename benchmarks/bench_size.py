"""Store size: a tracestore store vs float32 .npy and float16 .pt (torch.save, the old pipeline) of the same
traces, plus what lossless compression of the inner chunks would have bought (zarr, same layout, blosc
zstd-5 + byte shuffle: the best ratio in ../shared/notes/zarr-and-torch.md 1.5) and how fast it reads back.

Traces are tracestore.testing.synthetic_sequences: heavy-tailed (Student-t), per-layer scales and a few
massive-activation dimensions, like real LLM hidden states, so the compression figures are meaningful.

    .venv/bin/python benchmarks/bench_size.py            # 512 traces of [32, 4096] (128 MiB float16)
    .venv/bin/python benchmarks/bench_size.py --smoke
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import base_parser, dir_bytes, markdown_table, scratch_dir, time_best, write_result  # noqa: E402


def run(n: int, num_layers: int, hidden_size: int, *, keep: str | None = None, shard_bytes: int | None = None) -> str:
    import torch
    import zarr
    from zarr.codecs import BloscCodec, BytesCodec

    import tracestore
    from tracestore.testing import synthetic_ids, synthetic_scores, synthetic_sequences

    L, D = num_layers, hidden_size
    with scratch_dir(keep) as tmp:
        x32 = np.empty((n, L, D), np.float32)
        for a in range(0, n, 64):
            x32[a:a + 64] = synthetic_sequences(min(64, n - a), L, D, seed=0, start=a)
        x16 = x32.astype(np.float16)
        ids, scores = synthetic_ids(n), synthetic_scores(n)

        np.save(tmp / "f32.npy", x32)
        del x32
        torch.save({"sequences": torch.from_numpy(x16), "scores": torch.from_numpy(scores), "ids": ids}, tmp / "f16.pt")

        url = str(tmp / "store.zarr")
        t0 = time.perf_counter()
        with tracestore.create(url, num_layers=L, hidden_size=D, shard_bytes=shard_bytes) as w:
            for a in range(0, n, 128):
                w.append(ids[a:a + 128], x16[a:a + 128], scores[a:a + 128])
        t_write = time.perf_counter() - t0
        store = tracestore.open(url)
        rows = store._seq.direct.meta.rows_per_shard
        buf = np.empty_like(x16)
        t_read = time_best(lambda: store.read_sequences(np.arange(n), out=buf))
        np.testing.assert_array_equal(buf, x16)

        # the same layout with compressed inner chunks, for the record
        zurl = str(tmp / "blosc.zarr")
        z = zarr.create_array(zurl, shape=x16.shape, dtype="float16", chunks=(1, L, D), shards=(rows, L, D),
                              serializer=BytesCodec(endian="little"),
                              compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=2)],
                              filters=None)
        t0 = time.perf_counter()
        z[...] = x16
        t_zwrite = time.perf_counter() - t0
        t_zread = time_best(lambda: z[...], repeats=2)

        f16 = n * L * D * 2
        sizes = {
            "float32 .npy": dir_bytes(tmp / "f32.npy"),
            "float16 .pt (torch.save, old pipeline)": dir_bytes(tmp / "f16.pt"),
            "tracestore store (uncompressed, crc32c)": dir_bytes(url),
            "zarr, same layout, blosc zstd-5 shuffle": dir_bytes(zurl),
        }
        speed = {
            "tracestore store (uncompressed, crc32c)": f"write {f16 / t_write / 1e9:.2f} GB/s, read {f16 / t_read / 1e9:.2f} GB/s",
            "zarr, same layout, blosc zstd-5 shuffle": f"write {f16 / t_zwrite / 1e9:.2f} GB/s, read {f16 / t_zread / 1e9:.2f} GB/s (zarr-python)",
        }
    pt = sizes["float16 .pt (torch.save, old pipeline)"]
    npy = sizes["float32 .npy"]
    rows_ = [[k, f"{v:,}", f"{v / f16:.4f}", f"{v / npy:.4f}", f"{v / pt:.4f}", speed.get(k, "-")]
             for k, v in sizes.items()]
    head = (f"{n} synthetic traces of [{L}, {D}] ({f16:,} bytes of float16 values), ids and scores included in "
            f"every format.")
    return head + "\n\n" + markdown_table(["format", "bytes", "/ raw float16", "/ float32 .npy", "/ float16 .pt",
                                           "speed (local, warm cache)"], rows_)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=512)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--shard-bytes", type=int, default=None, help="default: config.SHARD_BYTES")
    a = p.parse_args(argv)
    if a.smoke:
        # small shards: with the default size a shard's index (16 bytes per slot, up to 16384 slots) would
        # dwarf a few KB of traces
        a.n, a.layers, a.hidden, a.shard_bytes = 12, 4, 64, 4 * 4 * 64 * 2
    text = run(a.n, a.layers, a.hidden, keep=a.keep, shard_bytes=a.shard_bytes)
    print(text)
    write_result(a.out, "Store size: tracestore vs float32 .npy vs float16 .pt", text, script=__file__, argv=argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
