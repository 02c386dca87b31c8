#!/usr/bin/env python3
"""Issue 13 --balance: positive-class weight vs oversampling the minority (a label-balanced sampler) vs
nothing, on skewed synthetic sets (20% positives), LSTM probe, 3 seeds; test metrics at the validation
Youden threshold, and at the default 0.5 (where imbalance bites).

    .venv/bin/python benchmarks/bench_balance.py [OUT_DIR]    # ~3-5 minutes on 2 cores; results/balance.md
"""
import sys
from pathlib import Path

import numpy as np

import tracestore
import tracestore.train.trainer as T
from tracestore.train import TrainConfig, train

out = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench_balance")
out.mkdir(parents=True, exist_ok=True)
N, L, D = 900, 4, 32
rng = np.random.default_rng(0)
seq = rng.normal(size=(N, L, D)).astype(np.float32)
w = rng.normal(size=D)
w /= np.linalg.norm(w)
z = seq[:, 2] @ w + 0.8 * rng.normal(size=N)
scores = (z > np.quantile(z, 0.8)).astype(np.float32)  # 20% positives
url = str(out / "s.zarr")
with tracestore.create(url, num_layers=L, hidden_size=D, overwrite=True) as wr:
    wr.append([f"t{i:04d}" for i in range(N)], seq, scores)
orig = T.make_split
def oversample_split(*a, **k):
    s = orig(*a, **k)
    lab = dict(zip([f"t{i:04d}" for i in range(N)], scores.tolist(), strict=True))
    pos = [i for i in s.train_ids if lab[i] == 1]
    neg = [i for i in s.train_ids if lab[i] == 0]
    reps = len(neg) // len(pos)
    s.train_ids = sorted(neg + pos * reps)
    return s
res = {}
for mode in ("none", "weight", "oversample"):
    for seed in range(3):
        if mode == "oversample":
            T.make_split = oversample_split
        else:
            T.make_split = orig
        sm = train(TrainConfig(store=url, out=str(out / f"{mode}{seed}"), model="lstm", epochs=40, patience=5,
                               batch_size=32, lr=1e-3, hidden=32, seed=seed, split_seed=0, progress=False,
                               balance="none" if mode == "oversample" else mode))
        res.setdefault(mode, []).append({k: sm[k] for k in ("test_auroc", "test_f1", "test_recall", "test_precision", "best_val_auroc", "epochs_done", "wall_s")})
T.make_split = orig
for mode, rs in res.items():
    agg = {k: (np.mean([r[k] for r in rs]), np.std([r[k] for r in rs], ddof=1)) for k in rs[0]}
    print(mode, " ".join(f"{k}={m:.3f}±{s:.3f}" for k, (m, s) in agg.items()))
