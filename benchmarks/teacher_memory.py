"""Resident memory of the teacher's forward pass over every batch shape of a training set, twice.

fairseq batches come in many shapes. In bf16 on CPU, torch's oneDNN backend builds and caches one
primitive (with its generated code and buffers) per operand shape, so the process grows with every new batch
shape until the cache is full; the plugin caps that cache for a bf16 teacher (fairseq_kd.teacher).
This script runs the teacher alone over all batches of the first --sentences training pairs, two
passes in the same order, in three processes:

  fp32          --teacher-precision fp32
  bf16          --teacher-precision bf16, the plugin's cache cap
  bf16_uncapped the same with ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 (oneDNN's own default)

and prints the resident set before and after each pass, the peak, and the seconds per pass.

    python benchmarks/teacher_memory.py --teacher T/teacher.pt --spm T/spm8k.model --dict T/dict.txt \
        --out benchmarks/results/teacher_memory.json
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import kd_throughput
from fairseq_kd.teacher import ONEDNN_CACHE_VARIABLE

MODES = {"fp32": ("fp32", None), "bf16": ("bf16", None), "bf16_uncapped": ("bf16", "1024")}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kd_throughput.add_data_arguments(parser, sentences=29000)  # all of Multi30k
    parser.add_argument("--out", default="benchmarks/results/teacher_memory.json", help="JSON result file")
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # one mode (subprocess)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args()


def resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_mode(args):
    """Two passes of the teacher over all batches in this process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    precision = MODES[args.mode][0]
    args.batches, args.warmup = sys.maxsize, 0  # every batch (build's slice)
    _, task, _, _, batches = kd_throughput.build(args, args.workdir, "F_" + precision)
    teacher = task.teacher(torch.device("cpu"))
    passes = []
    for _ in range(2):
        before, start = resident_mb(), time.perf_counter()
        for batch in batches:
            ni = batch["net_input"]
            teacher.logits(ni["src_tokens"], ni["src_lengths"], ni["prev_output_tokens"])
        passes.append({"rss_before_mb": before, "rss_after_mb": resident_mb(), "seconds": time.perf_counter() - start})
    shapes = {tuple(b["net_input"]["src_tokens"].shape) + tuple(b["net_input"]["prev_output_tokens"].shape) for b in batches}
    print(json.dumps({
        "mode": args.mode, "precision": teacher.resolved_precision, "batches": len(batches), "batch_shapes": len(shapes),
        "onednn_primitive_cache_capacity": os.environ.get(ONEDNN_CACHE_VARIABLE),
        "passes": passes, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }))


def main():
    args = parse_args()
    if args.mode:
        run_mode(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as workdir:
        kd_throughput.prepare(args, workdir)
        for mode, (_, capacity) in MODES.items():
            env = {k: v for k, v in os.environ.items() if k != ONEDNN_CACHE_VARIABLE}
            if capacity is not None:
                env[ONEDNN_CACHE_VARIABLE] = capacity
            cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--workdir", workdir]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
            r = results[mode] = json.loads(out.strip().splitlines()[-1])
            first, second = r["passes"]
            print(f"{mode:14s} {r['batches']} batches ({r['batch_shapes']} shapes), oneDNN cache "
                  f"{r['onednn_primitive_cache_capacity']}: RSS {first['rss_before_mb']:.0f} -> {first['rss_after_mb']:.0f} MB "
                  f"(pass 1, {first['seconds']:.1f} s) -> {second['rss_after_mb']:.0f} MB (pass 2, {second['seconds']:.1f} s), "
                  f"peak {r['peak_rss_mb']:.0f} MB", flush=True)
    kd_throughput.write_summary(args, ("mode", "workdir"), results=results)


if __name__ == "__main__":
    main()
