"""Decoding speed of a recipe's teacher and students, measured one after the other in one run.

    python speed.py --models models.tsv --data BIN --subset test2 --reference REF --beam 5 \
        --batch-sizes 1,128 [--max-len-a 0 --max-len-b 200] --out speed.json

For the teacher and the first seed of each student method (models.tsv), each checkpoint is loaded
once and translates the speed split at every batch size with fairseq's SequenceGenerator (the
beam search fairseq-generate runs), batches of the given number of sentences, nothing dropped.
One batch is translated first, untimed, to warm up; the time is then that of the generation calls
alone (as fairseq-generate's own "sentences/s"), not loading or batching. Every sentence of the
split must come back. Writes a JSON file: {"device", "threads", "sentences", "beam",
"batch_sizes", "sentences_per_second": {model: {batch size: speed}}}.
"""

import argparse
import csv
import json
import platform
import sys
import time

import torch
from fairseq import checkpoint_utils, utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq.tasks.translation import TranslationConfig, TranslationTask

import fairseq_kd  # noqa: F401  (lets torch.load read fairseq checkpoints safely)


def measured_models(models_tsv):
    """(name, checkpoint directory) of the teacher and of the first seed of each student group."""
    seen, models = set(), []
    with open(models_tsv, encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            if row["group"] not in seen:
                seen.add(row["group"])
                models.append((row["name"], row["dir"]))
    return models


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sentences_per_second(task, subset, models, gen_cfg, batch_size, device):
    """Translate every sentence of ``subset`` in batches of ``batch_size``; sentences per second of
    the generation calls, after one untimed warm-up batch."""
    dataset = task.dataset(subset)
    generator = task.build_generator(models, gen_cfg)
    batches = dataset.batch_by_size(dataset.ordered_indices(), max_sentences=batch_size,
                                    required_batch_size_multiple=1)
    samples = [dataset.collater([dataset[i] for i in batch]) for batch in batches]
    if device.type == "cuda":
        samples = [utils.move_to_cuda(sample, device=device) for sample in samples]
    task.inference_step(generator, models, samples[0])  # warm-up
    seconds, translated = 0.0, 0
    for sample in samples:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        translated += len(task.inference_step(generator, models, sample))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
    if translated != len(dataset):
        sys.exit(f"{translated} of the {len(dataset)} sentences of {subset} came back at batch size {batch_size}")
    return translated / seconds


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", required=True, help="models.tsv written by recipe_lib.sh")
    parser.add_argument("--data", required=True, help="binarized data directory")
    parser.add_argument("--subset", required=True, help="binarized split to translate")
    parser.add_argument("--reference", required=True, help="that split's raw target side (its line count is checked)")
    parser.add_argument("--beam", type=int, required=True)
    parser.add_argument("--batch-sizes", required=True, help="comma-separated, e.g. 1,128")
    parser.add_argument("--max-len-a", type=float, default=0, help="as fairseq-generate's")
    parser.add_argument("--max-len-b", type=int, default=200, help="as fairseq-generate's")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    # fairseq fills the last three fields from its global config; set here explicitly
    task = TranslationTask.setup_task(TranslationConfig(
        data=args.data, dataset_impl=None, train_subset="train", required_seq_len_multiple=1))
    task.load_dataset(args.subset)
    with open(args.reference, "rb") as f:
        sentences = sum(1 for _ in f)
    if len(task.dataset(args.subset)) != sentences:
        sys.exit(f"{args.subset} holds {len(task.dataset(args.subset))} sentences, {args.reference} {sentences}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen_cfg = GenerationConfig(beam=args.beam, max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    speeds = {}
    for name, directory in measured_models(args.models):
        models, _ = checkpoint_utils.load_model_ensemble([f"{directory}/checkpoint_best.pt"], task=task)
        for model in models:
            model.to(device).eval()
        speeds[name] = {}
        for batch_size in batch_sizes:
            speeds[name][str(batch_size)] = sentences_per_second(task, args.subset, models, gen_cfg, batch_size, device)
            print(f"{name}, batch {batch_size}: {speeds[name][str(batch_size)]:.1f} sentences/s", flush=True)
    result = {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "sentences": sentences,
        "beam": args.beam,
        "batch_sizes": batch_sizes,
        "sentences_per_second": speeds,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
