"""``fairseq-kd-distill-data --engine ctranslate2``: the teacher's beam search in CTranslate2.

The teacher checkpoint is converted once (:func:`fairseq_kd.ct2_export.export`, safe loading,
dictionaries checked against DATA's) into ``DESTDIR/SPLIT.kd.ct2-teacher/`` and reused by every
later run and worker of the split. Everything else is the fairseq engine's: the same batches (one
CTranslate2 call per fairseq batch, so that fairseq's per-batch length limit carries over), shards,
selection, filters, merge and resume rules. The split's ``args.json`` records the engine with the
teacher's SHA-256 and the quantization, so a resume with another engine, quantization or teacher
file is refused.

float32 gives fairseq's translations (:mod:`fairseq_kd.ct2_translate` lists what differs: the
scores are higher by a per-sentence constant where fairseq forbids EOS at the first step);
int8/int16 are faster on CPU and change some translations.
"""

import logging
from typing import Dict, Iterator, List

import numpy as np
import torch

from fairseq_kd.cli.errors import UserError
from fairseq_kd.ct2_export import export, read_record, require_ctranslate2
from fairseq_kd.fileio import file_sha256
from fairseq_kd.ct2_translate import (DecodingSettings, check_settings, load_translator, source_units,
                                      translate_batches)
from fairseq_kd.distill_bitext.selection import Hypothesis
from fairseq_kd.distill_bitext.shards import DistillDataError, split_state_path
from fairseq_kd.distill_bitext.translate import SplitTranslator
from fairseq_kd.teacher import split_teacher_paths

logger = logging.getLogger(__name__)

ENGINES = ("fairseq", "ctranslate2")


def engine_record(args, nbest: int) -> Dict:
    """What the engine contributes to the split's ``args.json``; for ctranslate2 the teacher's
    SHA-256 and the quantization (the converted teacher depends on both). Refuses, before any
    work, the settings CTranslate2 cannot reproduce."""
    if args.engine == "fairseq":
        return {"name": "fairseq"}
    try:
        require_ctranslate2()
        check_settings(decoding_settings(args, nbest), args.unkpen)
    except (UserError, ValueError) as e:
        raise DistillDataError(f"--engine ctranslate2: {e}") from e
    try:
        paths = split_teacher_paths(args.teacher_path)
    except (ValueError, FileNotFoundError) as e:
        raise DistillDataError(str(e)) from e
    if len(paths) > 1:
        raise DistillDataError(
            f"--engine ctranslate2 decodes one teacher, but --teacher-path names {len(paths)} checkpoints (an "
            "ensemble, whose averaged probabilities CTranslate2 cannot compute); use --engine fairseq"
        )
    if args.fp16:
        raise DistillDataError("--fp16 is the fairseq engine's; with --engine ctranslate2 choose --ct2-quantization")
    return {"name": "ctranslate2", "quantization": args.ct2_quantization, "teacher_sha256": file_sha256(paths[0])}


def decoding_settings(args, nbest: int, max_target_positions: int = 1024) -> DecodingSettings:
    return DecodingSettings(beam=args.beam, nbest=nbest, lenpen=args.lenpen, max_len_a=args.max_len_a,
                            max_len_b=args.max_len_b, min_len=args.min_len,
                            max_target_positions=max_target_positions)


def converted_teacher(args, task, engine: Dict) -> Dict:
    """The split's converted teacher: reused when its ``export.json`` is of this teacher file and
    quantization, else converted (replacing only an earlier conversion). Returns its record."""
    model_dir = split_state_path(args.destdir, args.split, "ct2-teacher")
    record = read_record(model_dir)
    if record and (record["checkpoint"]["sha256"], record["quantization"]) == (
        engine["teacher_sha256"], engine["quantization"]
    ):
        logger.info(f"reusing the converted teacher in {model_dir} ({record['quantization']})")
        return record
    logger.info(f"converting the teacher to CTranslate2 ({engine['quantization']}) into {model_dir}")
    try:
        return export(args.teacher_path, args.data, model_dir, engine["quantization"], task.cfg.source_lang,
                      task.cfg.target_lang, dict_dir=args.teacher_dict_dir, replace=record is not None,
                      require_dictionaries=True)
    except UserError as e:
        raise DistillDataError(str(e)) from e


class Ct2TeacherTranslator(SplitTranslator):
    """Beam search with a CTranslate2 teacher over chosen sentences of a loaded split, batched as
    the fairseq engine batches them (see :class:`SplitTranslator`)."""

    def __init__(self, task, split: str, model_dir: str, record: Dict, settings: DecodingSettings,
                 max_tokens, batch_size, device: str, skip_too_long: bool = False):
        from fairseq import utils

        max_source_positions = utils.resolve_max_positions(
            task.max_positions(), (record["max_source_positions"], record["max_target_positions"])
        )[0]
        super().__init__(task, split, max_tokens, batch_size, max_source_positions, skip_too_long)
        self.settings = settings
        # On a CPU, one batch per thread at a time, the same translations as one worker: the demo's distillation
        # (int8, beam 5, 29,000 sentences in batches of 64) took 200 s with two one-thread workers, where one
        # worker took 287-376 s on one thread (examples/multi30k-en-de/README.md).
        on_cpu = device == "cpu"
        self.translator = load_translator(model_dir, threads=1 if on_cpu else None, device=device,
                                          workers=torch.get_num_threads() if on_cpu else 1)
        self.device = device

    @property
    def workers(self) -> int:
        """Batches decoded at a time."""
        return self.translator.num_translators

    def translate_batches(self, batches: List[np.ndarray]) -> Iterator[Dict[int, List[Hypothesis]]]:
        src_dict, tgt_dict = self.task.source_dictionary, self.task.target_dictionary
        sources = ([source_units(src_dict, self.dataset.src[i]) for i in batch] for batch in batches)
        for batch, results in zip(batches, translate_batches(self.translator, sources, self.settings)):
            yield {
                int(i): [
                    Hypothesis(tgt_dict.string(torch.tensor([tgt_dict.index(u) for u in units])), score, rank)
                    for rank, (units, score) in enumerate(nbest)
                ]
                for i, nbest in zip(batch, results)
            }


def build_translator(args, task, nbest: int, use_cuda: bool, engine: Dict) -> Ct2TeacherTranslator:
    """Convert (or reuse) the teacher and return the translator ``distill-data`` runs."""
    record = converted_teacher(args, task, engine)
    device = "cuda" if use_cuda and require_ctranslate2().get_cuda_device_count() > 0 else "cpu"
    return Ct2TeacherTranslator(
        task, args.split, split_state_path(args.destdir, args.split, "ct2-teacher"), record,
        decoding_settings(args, nbest, record["max_target_positions"]), args.max_tokens, args.batch_size, device,
        skip_too_long=args.skip_too_long,
    )

