"""How much do fairseq-kd-cache-teacher's batch settings change a cache? Builds the cache of one
split once per precision and batch setting and counts the rows (target positions) that differ
from the first setting's: any value, the top-k ids (their set or order), and the largest
log-probability difference. docs/teacher-cache.md ("Batch settings") reports its output.

    python benchmarks/cache_batch_settings.py DATA --teacher-path teacher.pt --split train \\
        --work work/cache-batch-settings
"""

import argparse
import os

import numpy as np

from fairseq_kd.cli.cache_teacher import cache_teacher, get_parser

SETTINGS = {
    "--max-tokens 300": ["--max-tokens", "300"],
    "--max-tokens 4096": ["--max-tokens", "4096"],
    "--batch-size 1": ["--batch-size", "1", "--max-tokens", "4096"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--teacher-path", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--k", default="8")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--work", required=True, help="directory for the caches (one per setting)")
    args = parser.parse_args()
    for precision in args.precisions.split(","):
        arrays = {}
        for name, flags in SETTINGS.items():
            out = os.path.join(args.work, f"{args.split}-{precision}-{name.strip('-').replace(' ', '')}")
            cache_teacher(get_parser().parse_args([
                "--teacher-path", args.teacher_path, args.data, "--split", args.split, "--k", args.k,
                "--destdir", out, "--cpu", "--teacher-precision", precision, *flags,
            ]))
            arrays[name] = (np.load(os.path.join(out, "ids.npy")), np.load(os.path.join(out, "lprobs.npy")))
        first, (ids, lprobs) = next(iter(arrays.items()))
        for name, (other_ids, other_lprobs) in list(arrays.items())[1:]:
            ids_differ = (ids != other_ids).any(axis=1)
            rows_differ = ids_differ | (lprobs != other_lprobs).any(axis=1)
            largest = float(np.abs(lprobs.astype(np.float32) - other_lprobs.astype(np.float32)).max())
            print(f"{precision}: {first} vs {name}: {rows_differ.sum():,} of {len(ids):,} rows differ "
                  f"({100 * rows_differ.mean():.2f}%), ids in {ids_differ.sum():,} "
                  f"({100 * ids_differ.mean():.1f}%), largest log-probability difference {largest:.4g}")


if __name__ == "__main__":
    main()
