"""Largest relative error of the keep factor 1 − A after a storage round trip, per keep range:
float16, the linear uint8 of formats 1-2 (round(255 · A)) and the log-keep uint8 of format 3.

The keep factor scales every masked update, so its relative error is what a storage dtype
changes in training. 200,000 log-uniform keeps per range, seed 0.
Run: python bench/codec_error.py --out results/bench_codec_error.json
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import print_table, write_json
from softmask_format import codec

RANGES = [(0.5, 1.0), (0.1, 0.5), (0.01, 0.1), (1e-3, 1e-2), (1e-4, 1e-3), (2e-5, 1e-4)]


def round_trips(a: np.ndarray) -> dict[str, np.ndarray]:
    linear = np.round(a * np.float32(codec.LINEAR_UINT8_SCALE)).astype(np.uint8)
    return {
        "float16": codec.decode(codec.encode(a, "float16")),
        "uint8_linear": codec.decode(linear, linear_uint8=True),
        "uint8_log_keep": codec.decode(codec.encode(a, "uint8")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results/bench_codec_error.json")
    parser.add_argument("--samples", type=int, default=200_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for lo, hi in RANGES:
        keep = np.exp(rng.uniform(np.log(lo), np.log(hi), args.samples))
        a = (1.0 - keep).astype(np.float32)
        true = 1.0 - a.astype(np.float64)
        row: dict = {"keep_range": f"[{lo:g}, {hi:g}]"}
        for name, decoded in round_trips(a).items():
            err = np.abs((1.0 - decoded.astype(np.float64)) - true) / true
            row[name] = float(err.max())
        rows.append(row)
    print_table(rows, ["keep_range", "float16", "uint8_linear", "uint8_log_keep"])
    write_json(args.out, "codec_error", rows)


if __name__ == "__main__":
    main()
