"""Decode with a CTranslate2 model (see :mod:`fairseq_kd.ct2_export`) the way ``fairseq-generate``
decodes the fairseq model it came from.

What makes the outputs fairseq's (measured on the test teacher and the shared Multi30k teacher):

* Sources are fed as their subword units **without** ``</s>``: the exported model appends it
  itself (``add_source_eos``); a second one changes the translations.
* fairseq's length limit is per batch: ``min(int(max_len_a * W + max_len_b), max_target_positions - 1)``
  tokens before EOS, with ``W`` the batch's widest source *including* its EOS. CTranslate2's
  ``max_decoding_length`` counts the same tokens, so one call per fairseq batch reproduces it.
* ``length_penalty`` is fairseq's ``lenpen``: both divide the hypothesis log-probability (EOS
  included) by ``length ** lenpen``, length counting EOS.
* ``max_input_length=0``: CTranslate2 would otherwise silently truncate sources at 1024 units.

Known differences: CTranslate2 applies the minimum-length rule (no EOS before ``min_len`` tokens)
by renormalising the distribution without EOS, fairseq by dropping EOS's probability. With the
default ``min_len`` 1 this is one constant term per sentence (all beams share the first step), so
the hypotheses are the same and their scores higher by ``-log(1 - p(EOS at step 1)) / length **
lenpen``; with ``min_len`` > 1 beam search ranks differently (greedy decoding does not), so
:func:`check_settings` refuses it. A hypothesis that reaches the length limit without EOS gets no
forced EOS score (fairseq adds one), which can reorder beams that all hit the limit. The two beam
searches stop by different rules, so below the best hypothesis an n-best list can differ: CTranslate2
then holds a better-scoring hypothesis that fairseq stopped before finishing.
"""

import collections
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch


def source_units(dictionary, ids: torch.Tensor) -> List[str]:
    """A binarized source sentence as its dictionary's symbols, without the end-of-sentence marker
    the exported model appends itself (see above)."""
    ids = ids.tolist()
    return [dictionary[t] for t in (ids[:-1] if ids and ids[-1] == dictionary.eos() else ids)]


@dataclass(frozen=True)
class DecodingSettings:
    """fairseq's generation flags, as far as CTranslate2 can reproduce them."""

    beam: int = 5
    nbest: int = 1
    lenpen: float = 1.0
    max_len_a: float = 0.0
    max_len_b: int = 200
    min_len: int = 1
    max_target_positions: int = 1024

    def max_length(self, source_width: int) -> int:
        """fairseq's ``SequenceGenerator`` limit for a batch whose widest source has
        ``source_width`` units including EOS."""
        return min(int(self.max_len_a * source_width + self.max_len_b), self.max_target_positions - 1)


def check_settings(settings: DecodingSettings, unkpen: float = 0.0) -> None:
    """Raise ``ValueError`` naming the flag when CTranslate2 cannot decode as fairseq would."""
    if unkpen != 0:
        raise ValueError("--unkpen has no CTranslate2 equivalent (it only has disable_unk); use --unkpen 0 "
                         "or the fairseq engine")
    if settings.min_len > 1 and settings.beam > 1:
        raise ValueError(
            "--min-len > 1 with --beam > 1: CTranslate2 renormalises the distribution when it forbids EOS, "
            "fairseq does not, and their beams rank differently (on the test teacher 66 of 100 translations "
            "differed at --min-len 10); use --min-len 1, --beam 1, or the fairseq engine"
        )
    if not 1 <= settings.nbest <= settings.beam:
        raise ValueError(f"--nbest must lie in [1, --beam={settings.beam}], got {settings.nbest}")


def load_translator(model_dir: str, threads: Optional[int] = None, device: str = "cpu", workers: int = 1):
    """A ``ctranslate2.Translator`` for ``model_dir`` in the quantization the model was exported
    with: ``workers`` batches decoded at once (CTranslate2's ``inter_threads``), each with
    ``threads`` intra-op threads (default: torch's, which follow ``OMP_NUM_THREADS``, so that both
    engines use the same number)."""
    from fairseq_kd.ct2_export import require_ctranslate2

    ctranslate2 = require_ctranslate2()
    return ctranslate2.Translator(model_dir, device=device, inter_threads=workers,
                                  intra_threads=threads or torch.get_num_threads())


def _decoding_options(sources: Sequence[Sequence[str]], settings: DecodingSettings) -> dict:
    max_length = settings.max_length(max(len(s) for s in sources) + 1)
    if settings.min_len > max_length:
        raise ValueError(f"--min-len {settings.min_len} exceeds the length limit {max_length} of this batch "
                         "(--max-len-a/--max-len-b)")
    return dict(beam_size=settings.beam, num_hypotheses=settings.nbest, length_penalty=settings.lenpen,
                max_decoding_length=max_length, min_decoding_length=settings.min_len, max_input_length=0,
                return_scores=True)


def _scored_hypotheses(result) -> List[Tuple[List[str], float]]:
    return list(zip(result.hypotheses, result.scores))


def translate_pieces(
    translator, sources: Sequence[Sequence[str]], settings: DecodingSettings
) -> List[List[Tuple[List[str], float]]]:
    """Translate one batch, as fairseq translates the batch of the same sentences.

    Args:
        translator: from :func:`load_translator`.
        sources: each source as its subword units, **without** ``</s>``.
        settings: the generation flags; the length limit follows from the batch's widest source.

    Returns:
        Per source, its ``settings.nbest`` hypotheses best first, each as (units without EOS,
        score: the natural-log probability divided by ``length ** lenpen``).
    """
    if not sources:
        return []
    results = translator.translate_batch([list(s) for s in sources], **_decoding_options(sources, settings))
    return [_scored_hypotheses(r) for r in results]


def translate_batches(
    translator, batches: Iterable[Sequence[Sequence[str]]], settings: DecodingSettings
) -> Iterator[List[List[Tuple[List[str], float]]]]:
    """Translate ``batches`` as :func:`translate_pieces` translates each, on all of the translator's
    workers at once: each batch is one CTranslate2 job (so its length limit stays its own), queued
    while the workers decode the ones before it, at most two per worker ahead. Yields each batch's
    results, in order."""
    ahead = 2 * translator.num_translators
    queued = collections.deque()

    def results(job):
        return [_scored_hypotheses(pending.result()) for pending in job]

    for sources in batches:
        queued.append(translator.translate_batch([list(s) for s in sources], asynchronous=True,
                                                 **_decoding_options(sources, settings)) if sources else [])
        if len(queued) > ahead:
            yield results(queued.popleft())
    while queued:
        yield results(queued.popleft())
