"""Export a fairseq translation checkpoint (a student, or a teacher for faster decoding) to a
CTranslate2 model directory.

CTranslate2 (https://github.com/OpenNMT/CTranslate2) runs transformer inference in C++ with
int8/int16 quantization; a student exported to it decodes several times faster on CPU than in
fairseq. The conversion itself is CTranslate2's own ``FairseqConverter``; this module adds what the
converter's command line does not do:

* **Safe loading.** The checkpoint is read with torch's ``weights_only`` unpickler; importing this
  plugin puts exactly the classes fairseq checkpoints hold on its allow-list
  (:mod:`fairseq_kd.safe_load`), so ``--unsafe_deserialization`` is never needed.
* **The converter sees a plain translation model.** It rebuilds the task named in the
  checkpoint's config; it is given a copy of the weights and config with the task set to
  ``translation`` and the languages resolved, so that the options of a ``translation_distill``
  student (teacher, kd-data, cache) play no part and no optimizer state is read again.
* **Supported options are checked first**, with a message naming the option that breaks the
  conversion (the converter either fails deep inside or, for some options, would silently write a
  model that decodes differently).
* **The vocabulary is checked**: the converter takes the dictionaries of ``data_dir``; when the
  checkpoint's own dictionaries can be found (next to it, or in the data directory it was trained
  on) they must be the same symbols in the same order.
* **Atomic output, never over foreign files**: the model is converted into a temporary directory
  next to ``output_dir`` and renamed into place; an existing ``output_dir`` is replaced only when it
  is empty or an earlier export (it holds ``export.json``).
* ``export.json`` records the source checkpoint's SHA-256 and size, the quantization, vocabulary
  sizes, languages, length limits, ctranslate2 version and the copied files.
"""

import argparse
import json
import logging
import os
import shutil
from typing import Dict, Optional, Sequence

import torch

import fairseq_kd  # noqa: F401  (the weights_only allow-list for fairseq checkpoints)
from fairseq_kd.cli.errors import UserError
from fairseq_kd.fileio import file_sha256, temporary_path
from fairseq_kd.safe_load import CheckpointError, check_checkpoint

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("float32", "int16", "int8")
RECORD = "export.json"
INSTALL_HINT = "pip install -e .[ct2] in the fairseq-kd checkout (or pip install 'ctranslate2>=4.5')"
# activations CTranslate2's fairseq converter maps (ctranslate2/converters/fairseq.py)
SUPPORTED_ACTIVATIONS = ("relu", "gelu", "gelu_accurate", "gelu_fast", "swish")


def require_ctranslate2():
    """The ``ctranslate2`` module, or a :class:`UserError` saying how to install it (an optional
    dependency: the plugin itself does not need it)."""
    try:
        import ctranslate2
    except ImportError as e:
        raise UserError(f"the ctranslate2 package is not installed ({e}): {INSTALL_HINT}") from None
    return ctranslate2


def load_checkpoint(path: str) -> dict:
    """The checkpoint's state, loaded with torch's ``weights_only`` unpickler (safe) after the plugin's
    checks of a complete checkpoint of bounded config size (:func:`fairseq_kd.safe_load.check_checkpoint`)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}; pass a fairseq checkpoint (e.g. student/checkpoint_best.pt)")
    try:
        check_checkpoint(path)
    except CheckpointError as e:  # a foreign pickle, a truncated file, a config too large
        raise UserError(str(e)) from None
    return torch.load(path, map_location="cpu", weights_only=True)


def model_args(state: dict, path: str) -> argparse.Namespace:
    """The model configuration of a loaded checkpoint as the converter reads it (a Namespace)."""
    args = state.get("args") or (state.get("cfg") or {}).get("model")
    if args is None or "model" not in state:
        raise UserError(f"{path} is not a fairseq model checkpoint (no model config or weights)")
    return args if isinstance(args, argparse.Namespace) else argparse.Namespace(**dict(args))


def unsupported_options(args: argparse.Namespace) -> list:
    """Why CTranslate2 cannot run this model, one line per offending option (empty: supported).

    The converter maps fairseq's ``transformer`` encoder-decoder: one attention-head count and one
    pre/post-norm choice for both stacks, sinusoidal or learned positions, the activations of
    :data:`SUPPORTED_ACTIVATIONS`, a final decoder norm when pre-norm, and a plain output projection.
    """
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    arch = getattr(args, "arch", None)
    model = ARCH_MODEL_NAME_REGISTRY.get(arch)
    if model != "transformer":
        return [f"--arch {arch} (model {model}): only fairseq's transformer encoder-decoder architectures are supported"]
    problems = []
    activation = getattr(args, "activation_fn", "relu")
    if activation not in SUPPORTED_ACTIVATIONS:
        problems.append(f"--activation-fn {activation}: CTranslate2 supports {', '.join(SUPPORTED_ACTIVATIONS)}")
    flags = {
        "no_token_positional_embeddings": "--no-token-positional-embeddings: CTranslate2 always adds positions",
        "cross_self_attention": "--cross-self-attention: not supported by CTranslate2",
        "no_cross_attention": "--no-cross-attention: not supported by CTranslate2",
        "adaptive_softmax_cutoff": "--adaptive-softmax-cutoff: CTranslate2 needs a plain output projection",
        "adaptive_input": "--adaptive-input: CTranslate2 needs plain embeddings",
        "encoder_layers_to_keep": "--encoder-layers-to-keep: export a checkpoint with the pruned layers removed",
        "decoder_layers_to_keep": "--decoder-layers-to-keep: export a checkpoint with the pruned layers removed",
    }
    problems += [message for name, message in flags.items() if getattr(args, name, None)]
    if bool(args.encoder_normalize_before) != bool(args.decoder_normalize_before):
        problems.append("--encoder-normalize-before and --decoder-normalize-before differ: CTranslate2 needs one "
                        "pre/post-norm choice for both")
    if args.encoder_attention_heads != args.decoder_attention_heads:
        problems.append(f"--encoder-attention-heads {args.encoder_attention_heads} and --decoder-attention-heads "
                        f"{args.decoder_attention_heads} differ: CTranslate2 needs one head count")
    if args.decoder_normalize_before and getattr(args, "no_decoder_final_norm", False):
        problems.append("--no-decoder-final-norm: CTranslate2's pre-norm decoder has a final layer norm")
    for name in ("decoder_input_dim", "decoder_output_dim"):
        value = getattr(args, name, None)
        if value is not None and value != args.decoder_embed_dim:
            problems.append(f"--{name.replace('_', '-')} {value} differs from --decoder-embed-dim "
                            f"{args.decoder_embed_dim}: CTranslate2 has no input/output projections here")
    return problems


def check_supported(args: argparse.Namespace, path: str) -> None:
    """Raise :class:`UserError` naming every option of ``path``'s model that CTranslate2 cannot run."""
    problems = unsupported_options(args)
    if problems:
        raise UserError(f"{path} cannot be converted to CTranslate2: " + "; ".join(problems))


def _load_dictionaries(data_dir: str, source_lang: Optional[str], target_lang: Optional[str]):
    """The translation task over ``data_dir`` that the converter will build: its languages and
    dictionaries (an error naming the directory if they are missing)."""
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    cfg = TranslationConfig(data=data_dir, source_lang=source_lang, target_lang=target_lang)
    try:
        return TranslationTask.setup_task(cfg)
    except Exception as e:  # FileNotFoundError, or no language pair to infer
        raise UserError(
            f"cannot read the dictionaries in {data_dir} ({e}): pass the binarized data directory the model "
            "was trained with (dict.SRC.txt and dict.TGT.txt), with -s/-t if it holds several pairs"
        ) from e


def _check_vocabulary(checkpoint: str, args: argparse.Namespace, state: dict, task, dict_dir: Optional[str],
                      required: bool) -> None:
    """The checkpoint's own dictionaries, where they can be found (or always, when ``required``),
    must equal ``task``'s: the converter pairs the model's embedding rows with ``data_dir``'s
    symbols by index, so another vocabulary of the same size would translate garbage silently."""
    from fairseq_kd.teacher import check_teacher_dictionaries, find_teacher_dictionary_dir

    trained_on = ((state.get("cfg") or {}).get("task") or {}).get("data") or getattr(args, "data", None)
    try:
        directory = find_teacher_dictionary_dir(checkpoint, trained_on, dict_dir)
    except FileNotFoundError as e:
        if dict_dir or required:
            raise UserError(str(e)) from None
        logger.warning(f"the dictionaries {checkpoint} was trained with were not found (next to it or in "
                       f"{trained_on}); using DATA's unchecked (pass --dict-dir to check them)")
        return
    try:
        check_teacher_dictionaries(directory, task)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{checkpoint}: {e}") from e


def read_record(output_dir: str) -> Optional[dict]:
    """The ``export.json`` of an export directory, or None when there is none."""
    path = os.path.join(output_dir, RECORD)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_output_dir(output_dir: str) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output-dir {output_dir} is a file; choose a directory path")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and read_record(output_dir) is None:
        raise UserError(
            f"--output-dir {output_dir} is not empty and holds no {RECORD}, so it was not written by this "
            "exporter; choose a new or empty directory (nothing was written)"
        )


def _install(tmp: str, output_dir: str, replace: bool) -> bool:
    """Rename the finished export ``tmp`` to ``output_dir``. An existing empty directory is
    replaced; an earlier export is replaced when ``replace``, else kept (and False returned)."""
    try:
        os.rename(tmp, output_dir)  # atomic; replaces an empty directory, fails on a non-empty one
        return True
    except OSError:
        pass
    if read_record(output_dir) is None:
        raise UserError(f"--output-dir {output_dir} was filled by another program during the export; nothing "
                        "was written there")
    if not replace:
        return False
    old = f"{tmp}.old"
    os.rename(output_dir, old)
    os.rename(tmp, output_dir)
    shutil.rmtree(old)
    return True


def export(
    checkpoint: str,
    data_dir: str,
    output_dir: str,
    quantization: str,
    source_lang: Optional[str] = None,
    target_lang: Optional[str] = None,
    copy_files: Sequence[str] = (),
    dict_dir: Optional[str] = None,
    replace: bool = True,
    require_dictionaries: bool = False,
) -> Dict:
    """Convert ``checkpoint`` to a CTranslate2 model in ``output_dir`` and return its record.

    Args:
        checkpoint: a fairseq ``transformer`` checkpoint (``translation`` or ``translation_distill``).
        data_dir: binarized data directory with the model's dictionaries (``dict.SRC.txt``,
            ``dict.TGT.txt``): the converted model's vocabularies.
        output_dir: created (or an empty directory, or an earlier export, replaced); anything else
            is refused.
        quantization: one of :data:`QUANTIZATIONS` (weights; int8/int16 change outputs slightly).
        source_lang, target_lang: the pair in ``data_dir`` (default: the checkpoint's, else inferred).
        copy_files: files copied into ``output_dir`` under their base names (e.g. the
            sentencepiece model), so that the directory is everything a deployment needs.
        dict_dir: where the checkpoint's training dictionaries are, to check against ``data_dir``'s
            (default: next to the checkpoint, then the data directory it was trained on).
        replace: when ``output_dir`` became an export while this one ran (another process), keep
            that one (False) instead of replacing it.
        require_dictionaries: refuse (instead of a warning) when the checkpoint's training
            dictionaries cannot be found to check ``data_dir``'s against.
    """
    ctranslate2 = require_ctranslate2()
    if quantization not in QUANTIZATIONS:
        raise UserError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    output_dir = os.path.abspath(output_dir)
    _check_output_dir(output_dir)
    names = [os.path.basename(p) for p in copy_files]
    for path in copy_files:
        if not os.path.isfile(path):
            raise UserError(f"--copy {path}: file not found")
    if len(set(names)) != len(names) or set(names) & {RECORD, "model.bin", "config.json"} or any(
        n.endswith("vocabulary.json") for n in names
    ):
        raise UserError(f"--copy names {names} collide with each other or with the model's own files")

    state = load_checkpoint(checkpoint)
    args = model_args(state, checkpoint)
    check_supported(args, checkpoint)
    task = _load_dictionaries(data_dir, source_lang or getattr(args, "source_lang", None),
                              target_lang or getattr(args, "target_lang", None))
    _check_vocabulary(checkpoint, args, state, task, dict_dir, require_dictionaries)

    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = temporary_path(output_dir)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        _convert(state, args, task, tmp, quantization, ctranslate2)
        for path in copy_files:
            shutil.copyfile(path, os.path.join(tmp, os.path.basename(path)))
        record = {
            "format": 1,
            "created_by": "fairseq-kd-export-ct2",
            "checkpoint": {"path": os.path.abspath(checkpoint), "sha256": file_sha256(checkpoint),
                           "size": os.path.getsize(checkpoint)},
            "arch": args.arch,
            "quantization": quantization,
            "source_lang": task.cfg.source_lang,
            "target_lang": task.cfg.target_lang,
            "source_vocab_size": len(task.source_dictionary),
            "target_vocab_size": len(task.target_dictionary),
            "max_source_positions": args.max_source_positions,
            "max_target_positions": args.max_target_positions,
            "ctranslate2_version": ctranslate2.__version__,
            "copied_files": names,
        }
        with open(os.path.join(tmp, RECORD), "w", encoding="utf-8") as out:
            json.dump(record, out, indent=1, sort_keys=True)
            out.write("\n")
        if not _install(tmp, output_dir, replace):
            return read_record(output_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    logger.info(f"exported {checkpoint} ({quantization}) to {output_dir}")
    return record


def _convert(state: dict, args: argparse.Namespace, task, tmp: str, quantization: str, ctranslate2) -> None:
    """Run CTranslate2's FairseqConverter into the new directory ``tmp``.

    The converter reads the checkpoint file itself and rebuilds the task named in its config. It is
    given a copy holding only the weights and the config with ``task=translation`` and the resolved
    languages (dictionaries are all it needs), written inside ``tmp`` and removed before ``tmp`` is
    installed."""
    from ctranslate2.converters.fairseq import FairseqConverter

    os.makedirs(tmp)
    args = argparse.Namespace(**vars(args))
    args.task = "translation"
    args.source_lang, args.target_lang = task.cfg.source_lang, task.cfg.target_lang
    model_file = os.path.join(tmp, "weights-for-converter.pt")
    torch.save({"args": args, "model": state["model"]}, model_file)
    converted = os.path.join(tmp, "model")
    try:
        FairseqConverter(model_file, task.cfg.data).convert(converted, quantization=quantization)
    except Exception as e:  # the converter's own checks (RuntimeError, NotImplementedError, ...)
        raise UserError(f"CTranslate2's converter refused the model: {e}") from e
    os.remove(model_file)
    for name in os.listdir(converted):
        os.rename(os.path.join(converted, name), os.path.join(tmp, name))
    os.rmdir(converted)
