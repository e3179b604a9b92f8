"""Throughput and peak memory of a word_kd training step, online and from a top-k teacher cache.

One run, the same data, student and batches for every configuration:

  S        student-only step (fairseq's label_smoothed_cross_entropy)
  S_fused  the same loss through the plugin's fused student loss (seq_kd_interp with alpha 0), to
           separate the KD term's own cost from the plugin's cheaper handling of the NLL
  F        teacher forward alone (fp32 and the --teacher-precision auto choice)
  online   word_kd step with the teacher in fp32, and in auto precision
  cached   word_kd step from top-k teacher log-probs (k=8), no teacher in memory

A step is forward + backward + Adam update. Each configuration runs in its own subprocess so that
its peak resident memory (ru_maxrss) is its own; the script prints a table and writes JSON. With
``--cuda`` everything runs on the GPU (student in fp32, the teacher in its precision, fp16 in
``auto``), steps are timed after ``torch.cuda.synchronize()`` and the peak memory is
``torch.cuda.max_memory_allocated()`` (benchmarks/gpu_check.py runs it so).

    python benchmarks/kd_throughput.py --teacher T/checkpoint_best.pt --spm T/spm.model \
        --dict T/dict.txt --data data/multi30k --out benchmarks/results/kd_throughput.json

The teacher's dictionary (one joined dict.txt) and sentencepiece model define the vocabulary; the
student is a 2+2-layer transformer (d=128, ffn 512) with the same vocabulary.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

CONFIGS = ["S", "S_fused", "F_fp32", "F_auto", "online_fp32", "online_auto", "cached"]
STUDENT_ARCH = [
    "--arch", "transformer", "--share-all-embeddings", "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-embed-dim", "128", "--decoder-embed-dim", "128", "--encoder-ffn-embed-dim", "512",
    "--decoder-ffn-embed-dim", "512", "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--dropout", "0.1",
]


def add_data_arguments(parser, sentences: int) -> None:
    """The teacher, its vocabulary, the training pairs to batch and the threads (shared with
    teacher_memory.py)."""
    parser.add_argument("--teacher", required=True, help="teacher checkpoint")
    parser.add_argument("--spm", required=True, help="the teacher's sentencepiece model")
    parser.add_argument("--dict", required=True, help="the teacher's joined fairseq dictionary (dict.txt)")
    parser.add_argument("--data", default="data/multi30k", help="directory with train.en / train.de")
    parser.add_argument("--src", default="en")
    parser.add_argument("--tgt", default="de")
    parser.add_argument("--sentences", type=int, default=sentences, help="training sentences to batch")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_arguments(parser, sentences=2000)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--topk", type=int, default=8, help="k of the cached configuration")
    parser.add_argument("--out", default="benchmarks/results/kd_throughput.json", help="JSON result file")
    parser.add_argument("--cuda", action="store_true",
                        help="run on the GPU; memory figures are then peak CUDA memory (max_memory_allocated)")
    parser.add_argument("--config", choices=CONFIGS + ["save_topk"], help=argparse.SUPPRESS)  # one configuration (subprocess)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    return parser.parse_args()


def prepare(args, workdir):
    """Encode the sentences with the teacher's sentencepiece model into raw fairseq-ready text."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=args.spm)
    for lang in (args.src, args.tgt):
        with open(os.path.join(args.data, f"train.{lang}"), encoding="utf-8") as f:
            lines = [next(f).rstrip("\n") for _ in range(args.sentences)]
        with open(os.path.join(workdir, f"train.{lang}"), "w", encoding="utf-8") as out:
            out.writelines(" ".join(sp.encode(line, out_type=str)) + "\n" for line in lines)
    for lang in (args.src, args.tgt):
        with open(args.dict, encoding="utf-8") as src, open(os.path.join(workdir, f"dict.{lang}.txt"), "w") as dst:
            dst.write(src.read())


def build(args, workdir, config):
    """(task, student, criterion, batches) for one configuration, batches on CPU, fixed order."""
    from fairseq import options, tasks
    from fairseq.data import Dictionary, LanguagePairDataset
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import fairseq_kd  # noqa: F401

    if config == "S" or config.startswith("F"):
        criterion = ["--criterion", "label_smoothed_cross_entropy"]
    elif config == "S_fused":
        criterion = ["--criterion", "seq_kd_interp", "--alpha", "0"]
    else:
        criterion = ["--criterion", "word_kd", "--alpha", "0.5", "--temperature", "1"]
    precision = "fp32" if config.endswith("fp32") else "auto"
    argv = [workdir, "--task", "translation_distill", "-s", args.src, "-t", args.tgt, *STUDENT_ARCH, *criterion,
            "--label-smoothing", "0.1", "--optimizer", "adam", "--lr", "5e-4"] + ([] if args.cuda else ["--cpu"])
    if config == "cached":
        argv += ["--teacher-cache", workdir]  # the batches carry the cached top-k, see save_topk
    elif not config.startswith("S"):
        argv += ["--teacher-path", args.teacher, "--teacher-dict-dir", workdir, "--teacher-precision", precision]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(1)
    student = task.build_model(cfg.model)
    crit = task.build_criterion(cfg.criterion)
    d = task.source_dictionary

    def encode(lang):
        with open(os.path.join(workdir, f"train.{lang}"), encoding="utf-8") as f:
            return [d.encode_line(line, add_if_not_exist=False).long() for line in f]

    src, tgt = encode(args.src), encode(args.tgt)
    dataset = LanguagePairDataset(src, torch.tensor([len(s) for s in src]), d, tgt,
                                  torch.tensor([len(t) for t in tgt]), task.target_dictionary, shuffle=False)
    batches, batch, tokens = [], [], 0
    for i in dataset.ordered_indices():
        n = max(len(src[i]), len(tgt[i]))
        if batch and (len(batch) + 1) * max(tokens, n) > args.max_tokens:
            batches.append(dataset.collater([dataset[j] for j in batch]))
            batch, tokens = [], 0
        batch.append(int(i))
        tokens = max(tokens, n)
    if batch:
        batches.append(dataset.collater([dataset[j] for j in batch]))
    if len(batches) <= args.warmup:
        raise SystemExit(f"kd_throughput.py: --sentences {args.sentences} make {len(batches)} batches of at most "
                         f"--max-tokens {args.max_tokens}, none left to time after --warmup {args.warmup}: "
                         "give more sentences, fewer --max-tokens or fewer --warmup")
    return cfg, task, student, crit, batches[: args.warmup + args.batches]


def device_of(args) -> torch.device:
    """The device the benchmark runs on; refuses --cuda where torch sees no GPU."""
    if not args.cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit(f"kd_throughput.py: --cuda, but torch {torch.__version__} sees no CUDA device")
    return torch.device("cuda")


def on_device(batch, device):
    from fairseq import utils

    return utils.move_to_cuda(batch, device=device) if device.type == "cuda" else batch


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory_key(args) -> str:
    """The result field the memory budget is checked on: peak CUDA memory on the GPU, else peak RSS."""
    return "peak_cuda_mb" if args.cuda else "peak_rss_mb"


def save_topk(args, workdir):
    """Run the teacher once over the batches and save its top-k (ids, log-probs at T=1, the
    log-probs rounded to fp16 as a cache stores them), as fairseq-kd-cache-teacher would."""
    from fairseq_kd.teacher_cache import teacher_topk

    _, task, _, _, batches = build(args, workdir, "F_fp32")
    device = device_of(args)
    teacher = task.teacher(device)
    topk = []
    for b in batches:
        ids, lprobs = teacher_topk(teacher, on_device(b, device), args.topk)
        topk.append((ids.cpu(), lprobs.half().cpu()))  # as a --teacher-cache batch holds them
    torch.save(topk, os.path.join(workdir, "topk.pt"))


def run_config(args):
    """Time one configuration in this process and print one JSON line."""
    from fairseq_kd.data.batch_keys import TEACHER_TOPK_IDS, TEACHER_TOPK_LPROBS

    torch.set_num_threads(args.threads)
    config, workdir = args.config, args.workdir
    cfg, task, student, crit, batches = build(args, workdir, config)
    device = device_of(args)
    if config == "cached":  # the batches carry the teacher, no teacher in memory
        for batch, (ids, lprobs) in zip(batches, torch.load(os.path.join(workdir, "topk.pt"))):
            batch[TEACHER_TOPK_IDS], batch[TEACHER_TOPK_LPROBS] = ids, lprobs
    batches = [on_device(batch, device) for batch in batches]
    student.to(device)
    crit.to(device)
    base_rss = peak_rss_mb()
    optimizer = torch.optim.Adam(student.parameters(), lr=5e-4)
    teacher = task.teacher(device) if config.startswith("F") else None
    times, tokens = [], 0
    for i, batch in enumerate(batches):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if teacher is not None:
            ni = batch["net_input"]
            teacher.logits(ni["src_tokens"], ni["src_lengths"], ni["prev_output_tokens"])
        else:
            student.train()
            optimizer.zero_grad()
            loss, _, _ = crit(student, batch)
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            times.append(elapsed)
            tokens += batch["ntokens"]
    loaded = teacher or (task.teacher() if task.teacher_loaded else None)
    print(json.dumps({
        "config": config, "step_s": sum(times) / len(times), "tokens_per_s": tokens / sum(times),
        "peak_rss_mb": peak_rss_mb(), "rss_before_steps_mb": base_rss, "device": str(device),
        "peak_cuda_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "precision": getattr(loaded, "resolved_precision", None),
        "teacher_weights_mb": sum(p.numel() * p.element_size() for m in loaded.models for p in m.parameters()) / 2**20
        if loaded is not None else None,
        "teacher_distribution_mb": max(b["target"].numel() for b in batches) * len(task.target_dictionary) * 4 / 2**20,
        "batches": len(times),
    }))


def child(cmd) -> str:
    """Run one configuration's process and return its stdout; its failure ends this one with the
    child's own message (on stderr) and exit status."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(proc.returncode)
    return proc.stdout


def main():
    args = parse_args()
    if args.config == "save_topk":
        save_topk(args, args.workdir)
        return
    if args.config:
        run_config(args)
        return
    with tempfile.TemporaryDirectory() as workdir:
        prepare(args, workdir)
        child([sys.executable, __file__, *sys.argv[1:], "--config", "save_topk", "--workdir", workdir])
        results = {}
        for config in CONFIGS:
            out = child([sys.executable, __file__, *sys.argv[1:], "--config", config, "--workdir", workdir])
            results[config] = json.loads(out.strip().splitlines()[-1])
            print(f"{config:12s} {results[config]['step_s'] * 1000:8.1f} ms/step  {peak_memory_key(args)} "
                  f"{results[config][peak_memory_key(args)]:.0f}", flush=True)
    s, f_fp32, f_auto = results["S"]["step_s"], results["F_fp32"]["step_s"], results["F_auto"]["step_s"]
    ratios = {
        "online_fp32 / (S + F_fp32)": results["online_fp32"]["step_s"] / (s + f_fp32),
        "online_auto / (S + F_auto)": results["online_auto"]["step_s"] / (s + f_auto),
        "online_auto / S": results["online_auto"]["step_s"] / s,
        "cached / S": results["cached"]["step_s"] / s,
        "S_fused / S": results["S_fused"]["step_s"] / s,
        "cached / S_fused": results["cached"]["step_s"] / results["S_fused"]["step_s"],
        "online_fp32 / (S_fused + F_fp32)": results["online_fp32"]["step_s"] / (results["S_fused"]["step_s"] + f_fp32),
        "online_auto / (S_fused + F_auto)": results["online_auto"]["step_s"] / (results["S_fused"]["step_s"] + f_auto),
    }
    # online peak memory target: the student-only peak + the teacher's weights + one batch of the
    # teacher's distribution (float32, the largest batch)
    peak = peak_memory_key(args)
    memory = {
        config: {
            peak: results[config][peak],
            "budget_mb": results["S"][peak] + results[config]["teacher_weights_mb"]
            + results[config]["teacher_distribution_mb"],
        }
        for config in ("online_fp32", "online_auto")
    }
    print("\nratios (targets: cached / S <= 1.10, online / (S + F) <= 1.10):")
    for name, value in ratios.items():
        print(f"  {name:28s} {value:.3f}")
    print("online peak memory (target: <= S peak + teacher weights + one batch of teacher distribution):")
    for config, m in memory.items():
        print(f"  {config:12s} {m[peak]:.0f} MB, budget {m['budget_mb']:.0f} MB")
    write_summary(args, ("config", "workdir"), results=results, ratios=ratios, online_memory=memory)


def write_summary(args, internal_arguments, **parts) -> None:
    """Write args.out: the machine, the settings (all arguments but ``internal_arguments``), ``parts``."""
    summary = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "python": platform.python_version(),
                    **({"gpu": torch.cuda.get_device_name()} if getattr(args, "cuda", False) else {})},
        "settings": {k: v for k, v in vars(args).items() if k not in internal_arguments},
        **parts,
    }
    from fairseq_kd.fileio import atomic_output

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_output(args.out) as tmp, open(tmp, "w") as f:  # never a half-written result
        json.dump(summary, f, indent=2)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
