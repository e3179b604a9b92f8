"""Decoding speed of a recipe's teacher and students, measured in turn in one run, in fairseq and as
the CTranslate2 model a user deploys.

    python speed.py --models models.tsv --data BIN --subset test2 --reference REF --beam 5 \
        --batch-sizes 1,64 [--max-len-a 0 --max-len-b 200] --threads 1 --rounds 3 \
        --bleu-test test_2016_flickr test RAW/test_2016_flickr.de [--bleu-test ...] --spm spm.model \
        --out speed.json

The teacher and the first seed of each student method (models.tsv) are loaded once, in fairseq and
exported to CTranslate2 (``fairseq-kd-export-ct2``'s conversion, in ``--ct2-quantization``, int8
by default); the CTranslate2 model translates every ``--bleu-test`` split once for its BLEU (the
quality of the deployed model, next to the fairseq model's BLEU in the report). Then, ``--rounds``
times, every model in turn translates the speed split at every batch size with fairseq's
SequenceGenerator (the beam search fairseq-generate runs) and with CTranslate2 (the same batches,
beam and length limit), nothing dropped. A model's speed is the median of its rounds: the models
are measured round-robin so that a machine whose speed drifts within the run (shared virtual
machines do) slows every model alike rather than the few measured at that moment. In both engines
one batch is translated first, untimed, to warm up; the time is then that of the translation calls
alone (as fairseq-generate's own "sentences/s"), not loading or batching. Every sentence of the
split must come back. Writes a JSON file: {"device", "threads", "sentences", "beam", "batch_sizes",
"rounds", "models", "sentences_per_second": {model: {batch size: median}},
"sentences_per_second_by_round": {model: {batch size: [speed of each round]}}, "ct2":
{"quantization", "version", "sentences_per_second", "sentences_per_second_by_round", "bleu":
{model: {test set: BLEU}}, "signature"}}.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import ctranslate2
import sentencepiece
import torch
from sacrebleu.metrics import BLEU
from fairseq import checkpoint_utils, utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq.tasks.translation import TranslationConfig, TranslationTask

import fairseq_kd  # noqa: F401  (lets torch.load read fairseq checkpoints safely)
from fairseq_kd.ct2_export import export as export_ct2
from fairseq_kd.ct2_translate import DecodingSettings, load_translator, source_units, translate_pieces
from model_list import measured_models


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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


def fairseq_batches(task, subset, batch_size, device):
    """The subset's samples in fairseq's batches of ``batch_size`` sentences (by length), on ``device``."""
    dataset = task.dataset(subset)
    batches = dataset.batch_by_size(dataset.ordered_indices(), max_sentences=batch_size,
                                    required_batch_size_multiple=1)
    samples = [dataset.collater([dataset[i] for i in batch]) for batch in batches]
    if device.type == "cuda":
        samples = [utils.move_to_cuda(sample, device=device) for sample in samples]
    return samples


def sentences_per_second(task, models, gen_cfg, samples, device):
    """Translate every sample of ``samples`` (from :func:`fairseq_batches`); sentences per second
    of the generation calls, after one untimed warm-up batch. Returns (sentences translated, speed)."""
    generator = task.build_generator(models, gen_cfg)
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
    return translated, translated / seconds


def source_tokens(task, subset):
    """The subset's source sentences as dictionary symbols, in fairseq's batching order (by length),
    without the end-of-sentence marker CTranslate2 adds itself. Returns (ids, token lists)."""
    dataset = task.dataset(subset)
    order = dataset.ordered_indices()
    return order, [source_units(task.src_dict, dataset.src[i]) for i in order]


def ct2_translate(translator, sources, batch_size, settings):
    """Translate ``sources`` in batches of ``batch_size``; (the best translation of each as a list of
    units, seconds of the translation calls after one untimed warm-up batch)."""
    batches = [sources[i:i + batch_size] for i in range(0, len(sources), batch_size)]
    translate_pieces(translator, batches[0], settings)
    seconds, outputs = 0.0, []
    for batch in batches:
        start = time.perf_counter()
        results = translate_pieces(translator, batch, settings)
        seconds += time.perf_counter() - start
        outputs += [hypotheses[0][0] for hypotheses in results]
    return outputs, seconds


def ct2_sentences_per_second(translator, sources, batch_size, settings, subset):
    """Sentences per second of CTranslate2 translating ``sources`` in batches of ``batch_size``."""
    outputs, seconds = ct2_translate(translator, sources, batch_size, settings)
    if len(outputs) != len(sources):
        sys.exit(f"CTranslate2 returned {len(outputs)} of {len(sources)} translations of {subset}")
    return len(outputs) / seconds


def export_and_translate(task, name, directory, args, settings, pieces, batch_size, workdir):
    """Export ``directory``'s checkpoint to CTranslate2 in ``workdir`` and load it; (the translator, its
    translations of each BLEU test set, detokenized by ``pieces``, in input order: {test set: lines})."""
    model_dir = os.path.join(workdir, name)
    export_ct2(f"{directory}/checkpoint_best.pt", args.data, model_dir, args.ct2_quantization)
    translator = load_translator(model_dir, threads=args.threads)
    translations = {}
    for test, subset, _ in args.bleu_test:
        order, bleu_sources = source_tokens(task, subset)
        outputs, _ = ct2_translate(translator, bleu_sources, batch_size, settings)
        by_id = dict(zip(order.tolist(), outputs))
        translations[test] = pieces.decode([by_id[i] for i in range(len(order))])
    return translator, translations


def medians(by_round):
    """{model: {batch size: [speeds]}} -> {model: {batch size: median}}."""
    return {name: {batch: statistics.median(speeds) for batch, speeds in by_batch.items()}
            for name, by_batch in by_round.items()}


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
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of both engines")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="times every model is measured, in turn; its speed is the median")
    parser.add_argument("--ct2-quantization", default="int8", choices=["int8", "int16", "float32"],
                        help="the CTranslate2 models' weights")
    parser.add_argument("--bleu-test", nargs=3, action="append", required=True, metavar=("NAME", "SUBSET", "REFERENCE"),
                        help="a test set the CTranslate2 models translate for BLEU: its name, binarized split and raw "
                             "target side (repeat for each test set)")
    parser.add_argument("--spm", required=True, help="sentencepiece model that detokenizes the translations")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # fairseq fills the last three fields from its global config; set here explicitly
    task = TranslationTask.setup_task(TranslationConfig(
        data=args.data, dataset_impl=None, train_subset="train", required_seq_len_multiple=1))
    task.load_dataset(args.subset)
    references = {}
    for test, subset, reference in args.bleu_test:
        task.load_dataset(subset)
        references[test] = open(reference, encoding="utf-8").read().splitlines()
    with open(args.reference, "rb") as f:
        sentences = sum(1 for _ in f)
    if len(task.dataset(args.subset)) != sentences:
        sys.exit(f"{args.subset} holds {len(task.dataset(args.subset))} sentences, {args.reference} {sentences}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen_cfg = GenerationConfig(beam=args.beam, max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    settings = DecodingSettings(beam=args.beam, max_len_a=args.max_len_a, max_len_b=args.max_len_b)
    pieces = sentencepiece.SentencePieceProcessor(model_file=args.spm)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    models = measured_models(args.models)
    names = [name for name, _ in models]
    fairseq_models, translators, ct2_bleu, metric = {}, {}, {}, BLEU()
    by_round = {engine: {name: {str(b): [] for b in batch_sizes} for name in names} for engine in ("fairseq", "ct2")}
    with tempfile.TemporaryDirectory(prefix="ct2-", dir=os.path.dirname(os.path.abspath(args.out))) as workdir:
        for name, directory in models:
            fairseq_models[name], _ = checkpoint_utils.load_model_ensemble([f"{directory}/checkpoint_best.pt"],
                                                                           task=task)
            for model in fairseq_models[name]:
                model.to(device).eval()
            translators[name], translations = export_and_translate(task, name, directory, args, settings, pieces,
                                                                   max(batch_sizes), workdir)
            ct2_bleu[name] = {}
            for test, hypotheses in translations.items():
                if len(hypotheses) != len(references[test]):
                    sys.exit(f"{len(hypotheses)} CTranslate2 translations for the {len(references[test])} lines of "
                             f"{test}'s reference")
                ct2_bleu[name][test] = metric.corpus_score(hypotheses, [references[test]]).score
        # the same batches for every model and round
        _, speed_sources = source_tokens(task, args.subset)
        samples = {batch_size: fairseq_batches(task, args.subset, batch_size, device) for batch_size in batch_sizes}
        for round_number in range(1, args.rounds + 1):
            for name in names:
                for batch_size in batch_sizes:
                    translated, speed = sentences_per_second(task, fairseq_models[name], gen_cfg, samples[batch_size],
                                                             device)
                    if translated != sentences:
                        sys.exit(f"{translated} of the {sentences} sentences of {args.subset} came back at batch "
                                 f"size {batch_size}")
                    ct2_speed = ct2_sentences_per_second(translators[name], speed_sources, batch_size, settings,
                                                         args.subset)
                    by_round["fairseq"][name][str(batch_size)].append(speed)
                    by_round["ct2"][name][str(batch_size)].append(ct2_speed)
                    print(f"round {round_number}, {name}, batch {batch_size}: {speed:.1f} sentences/s in fairseq, "
                          f"{ct2_speed:.1f} in CTranslate2 {args.ct2_quantization}", flush=True)
    result = {
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "sentences": sentences,
        "beam": args.beam,
        "batch_sizes": batch_sizes,
        "rounds": args.rounds,
        "models": names,
        "sentences_per_second": medians(by_round["fairseq"]),
        "sentences_per_second_by_round": by_round["fairseq"],
        "ct2": {
            "quantization": args.ct2_quantization,
            "version": ctranslate2.__version__,
            "sentences_per_second": medians(by_round["ct2"]),
            "sentences_per_second_by_round": by_round["ct2"],
            "bleu": ct2_bleu,
            "signature": str(metric.get_signature()),
        },
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
