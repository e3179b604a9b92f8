"""``translation_distill``: fairseq's translation task plus a frozen teacher for the criterions."""

import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq import utils
from fairseq.data import ConcatDataset, indexed_dataset
from fairseq.dataclass import ChoiceEnum
from fairseq.tasks.translation import TranslationConfig, TranslationTask, load_langpair_dataset
from omegaconf import II
from omegaconf.errors import OmegaConfBaseException

from fairseq_kd.criterions.flag_checks import check_finite
from fairseq_kd.data.batch_keys import TEACHER_TARGET
from fairseq_kd.data.mixing import FixedSubsetDataset, mix_by_ratio, parse_ratios
from fairseq_kd.data.teacher_cache_dataset import TeacherCacheDataset
from fairseq_kd.data.teacher_target_dataset import TeacherTargetDataset, check_aligned
from fairseq_kd.hidden_states import state_widths
from fairseq_kd.registry import register_task_once
from fairseq_kd.safe_load import check_checkpoint
from fairseq_kd.student_init import STRATEGIES as STUDENT_INIT_STRATEGIES, init_student_from_teacher
from fairseq_kd.teacher import (
    PRECISIONS, Teacher, TeacherSource, check_no_colon_in_file_name, check_same_dictionary,
)
from fairseq_kd.teacher_cache import TeacherCache

logger = logging.getLogger(__name__)


@dataclass
class TranslationDistillConfig(TranslationConfig):
    teacher_path: Optional[str] = field(
        default=None,
        metadata={
            "help": "teacher checkpoint, or several joined by ':' for an ensemble whose "
            "probabilities are averaged (so a file whose path holds ':' cannot be named); its "
            "dictionaries must equal the student's"
        },
    )
    teacher_precision: ChoiceEnum(PRECISIONS) = field(
        default="auto",
        metadata={
            "help": "precision of the teacher's forward pass: auto = fp16 on CUDA, bf16 on CPUs "
            "with native bf16, else fp32; the distillation loss itself is always computed in fp32"
        },
    )
    teacher_dict_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "directory with the teacher's dict.SRC.txt/dict.TGT.txt (or dict.txt); for an ensemble "
            "one per member, ':'-separated in --teacher-path's order (repeat one the members share: D:D); "
            "default: the teacher checkpoint's directory, then the data directory it was trained on (a "
            "relative one is looked up next to the checkpoint, never in the current directory)"
        },
    )
    teacher_cache: Optional[str] = field(
        default=None,
        metadata={
            "help": "directory of offline top-k teacher caches, one per split in <dir>/<split> "
            "(fairseq-kd-cache-teacher --destdir <dir>/train ...), used in place of an online teacher: "
            "no teacher in memory; the train split must have a cache, a validation split without "
            "one runs the --teacher-path teacher online (it is loaded only then, or for --student-init)"
        },
    )
    student_init: ChoiceEnum(("none",) + STUDENT_INIT_STRATEGIES) = field(
        default="none",
        metadata={
            "help": "initialise the student from the teacher's layers before training (docs/student-init.md): "
            "every-nth = teacher layers 0, n, 2n, ...; spread = first and last layer, the rest evenly "
            "spaced; explicit = --student-encoder-layer-map/--student-decoder-layer-map. The student needs "
            "the teacher's architecture and widths; only the numbers of layers may differ"
        },
    )
    student_encoder_layer_map: Optional[str] = field(
        default=None,
        metadata={"help": "with --student-init explicit: the teacher encoder layer copied into each student "
                  "encoder layer, e.g. 0,8,16 (default: all, for a student as deep as the teacher)"},
    )
    student_decoder_layer_map: Optional[str] = field(
        default=None,
        metadata={"help": "with --student-init explicit: the teacher decoder layer copied into each student "
                  "decoder layer, e.g. 0,2,5 (default: all, for a student as deep as the teacher)"},
    )
    kd_data: Optional[str] = field(
        default=None,
        metadata={
            "help": "binarized directory of teacher translations of this data (fairseq-kd-distill-data "
            "output), same languages and dictionaries; used as --kd-data-mode says"
        },
    )
    kd_data_mode: ChoiceEnum(["paired", "concat", "ratio"]) = field(
        default="paired",
        metadata={
            "help": "paired: each batch carries the teacher target of the same source as "
            f"sample['{TEACHER_TARGET}'] (for seq_kd_interp / hybrid_kd); concat: train on gold + teacher "
            "(+ --extra-data) pairs (Gordon & Duh 2019 base+kd); ratio: draw from them each epoch "
            "in --mix-ratios proportions"
        },
    )
    extra_data: Optional[str] = field(
        default=None,
        metadata={"help": "':'-separated binarized directories of more pairs (e.g. back-translations) "
                  "to add in concat and ratio modes"},
    )
    mix_ratios: Optional[str] = field(
        default=None,
        metadata={"help": "ratio mode: proportions gold:teacher[:extra...], e.g. 1:2, or 0.66:0.34 "
                  "(the hybrid example of NVIDIA's NeMo NMT-distillation guide)"},
    )
    mix_epoch_size: int = field(
        default=0,
        metadata={"help": "ratio mode: pairs drawn per epoch (>= 0); 0 = the total number of pairs of all sources"},
    )
    gold_fraction: float = field(
        default=1.0,
        metadata={"help": "concat and ratio modes: keep this fixed random fraction of the gold pairs "
                  "(low-data regime, e.g. 0.05), chosen by --seed"},
    )
    seed: int = II("common.seed")
    finetune_from_model: Optional[str] = II("checkpoint.finetune_from_model")


@register_task_once("translation_distill", dataclass=TranslationDistillConfig)
class TranslationDistillTask(TranslationTask):
    """Translation with a frozen teacher next to the student.

    The teacher is loaded when the student is built for training (so a wrong path or a dictionary
    mismatch fails before the first update), kept out of every ``nn.Module`` the trainer saves (the
    student's checkpoints hold the student alone), moved to the student's device on first use, and
    never loaded when ``fairseq-generate``/``fairseq-interactive`` rebuild the student from a
    checkpoint. Each distributed worker has its own task and so its own teacher.

    What the criterions use: :attr:`teacher_source`, :meth:`teacher`, :attr:`teacher_widths` and
    :attr:`student_widths`, :attr:`pairs_teacher_targets`; :meth:`set_teacher` hands the task a
    teacher built elsewhere (in memory).
    """

    cfg: TranslationDistillConfig

    @classmethod
    def setup_task(cls, cfg: TranslationDistillConfig, **kwargs):
        if cfg.teacher_path:  # before ':' splits it into ensemble members
            check_no_colon_in_file_name(cfg.teacher_path)
        # Stored absolute, so that fairseq-validate, which rebuilds the task from the checkpoint's
        # config, finds them from any working directory.
        for name in ("teacher_path", "teacher_dict_dir", "teacher_cache", "kd_data", "extra_data"):
            paths = getattr(cfg, name)
            if paths:
                setattr(cfg, name, ":".join(os.path.abspath(p) for p in utils.split_paths(paths) if p))
        return super().setup_task(cfg, **kwargs)

    def __init__(self, cfg: TranslationDistillConfig, src_dict, tgt_dict):
        super().__init__(cfg, src_dict, tgt_dict)
        self._check_mixing_options()
        self._teacher = None
        self.student_widths = None  # set by build_model

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        """Load the gold pairs of ``split``; with --kd-data, add or mix in the teacher's."""
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        if self.cfg.teacher_cache:
            self._attach_teacher_cache(split)
        if not self.cfg.kd_data:
            return
        mode = self.cfg.kd_data_mode
        if split != self.cfg.train_subset:
            if mode == "paired" and self._has_pairs(self.cfg.kd_data, split):
                self.datasets[split] = self._paired(self.datasets[split], split)
            return
        if mode == "paired":
            self.datasets[split] = self._paired(self.datasets[split], split)
            return
        gold = self.datasets[split]
        if self.cfg.gold_fraction < 1.0:
            gold = FixedSubsetDataset.random_fraction(gold, self.cfg.gold_fraction, self.cfg.seed)
        sources = [gold] + [self._load_pairs(d, split) for d in [self.cfg.kd_data, *self._extra_dirs()]]
        if mode == "concat":
            self.datasets[split] = ConcatDataset(sources)
        else:
            ratios = parse_ratios(self.cfg.mix_ratios, len(sources))
            epoch_size = self.cfg.mix_epoch_size or sum(len(s) for s in sources)
            self.datasets[split] = mix_by_ratio(sources, ratios, epoch_size, self.cfg.seed, epoch)
        logger.info(
            f"{split}: {mode} of {' + '.join(str(len(s)) for s in sources)} pairs "
            f"(gold, teacher, extra) -> {len(self.datasets[split])} per epoch"
        )

    def _attach_teacher_cache(self, split):
        if self.cfg.kd_data:
            raise ValueError(
                "--teacher-cache holds the teacher for the targets of this data directory; it cannot be "
                "combined with --kd-data. To distil on the teacher's translations, train on the "
                "fairseq-kd-distill-data output directory itself and build the cache for it"
            )
        cache_dir = os.path.join(self.cfg.teacher_cache, split)
        if os.path.isdir(cache_dir):
            self.datasets[split] = TeacherCacheDataset(self.datasets[split], TeacherCache(cache_dir))
        elif split == self.cfg.train_subset or not self.cfg.teacher_path:
            raise FileNotFoundError(
                f"no teacher cache for split {split!r} in {self.cfg.teacher_cache}: build it with "
                f"fairseq-kd-cache-teacher --split {split} --destdir {cache_dir} ... (or, for a validation "
                "split, give --teacher-path to run the teacher online there)"
            )
        else:  # loaded now, so that a bad teacher fails before training, not at the first validation
            self._loaded_teacher(reason=f"split {split!r} has no cache in {self.cfg.teacher_cache}")

    def _check_mixing_options(self):
        cfg = self.cfg
        mixing = {
            "--kd-data-mode": cfg.kd_data_mode != "paired", "--extra-data": cfg.extra_data,
            "--mix-ratios": cfg.mix_ratios, "--gold-fraction": cfg.gold_fraction != 1.0,
            "--mix-epoch-size": cfg.mix_epoch_size != 0,
        }
        if not cfg.kd_data and any(mixing.values()):
            raise ValueError(
                f"{', '.join(flag for flag, given in mixing.items() if given)} mix the gold pairs with the "
                "teacher's translations: pass --kd-data DIR (fairseq-kd-distill-data output) too"
            )
        if cfg.mix_epoch_size < 0:
            raise ValueError(f"--mix-epoch-size must be >= 0 (0 = all pairs), got {cfg.mix_epoch_size}")
        check_finite({"--gold-fraction": cfg.gold_fraction})
        if not 0.0 < cfg.gold_fraction <= 1.0:
            raise ValueError(f"--gold-fraction must lie in (0, 1], got {cfg.gold_fraction}")
        if cfg.kd_data_mode == "paired" and (cfg.extra_data or cfg.gold_fraction < 1.0 or cfg.mix_ratios):
            raise ValueError(
                "--extra-data, --gold-fraction and --mix-ratios mix datasets: use them with "
                "--kd-data-mode concat or ratio, not paired"
            )
        if cfg.kd_data_mode == "ratio" and not cfg.mix_ratios:
            raise ValueError("--kd-data-mode ratio needs --mix-ratios, e.g. 1:2 (gold:teacher)")
        if cfg.kd_data_mode == "ratio":  # checked now, not when the train split is loaded after the teacher
            parse_ratios(cfg.mix_ratios, 2 + len(self._extra_dirs()))

    def _extra_dirs(self):
        return utils.split_paths(self.cfg.extra_data) if self.cfg.extra_data else []

    def _has_pairs(self, data_dir, split):
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        prefix = os.path.join(data_dir, f"{split}.{src}-{tgt}.")
        return all(indexed_dataset.dataset_exists(prefix + lang, impl=self.cfg.dataset_impl) for lang in (src, tgt))

    def _load_pairs(self, data_dir, split):
        """The ``split`` pairs of another binarized directory with the student's dictionaries."""
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        if not self._has_pairs(data_dir, split):
            raise FileNotFoundError(
                f"no binarized {split}.{src}-{tgt} pairs in {data_dir}; build them with "
                f"fairseq-kd-distill-data (teacher translations) or fairseq-preprocess"
            )
        for lang, student_dict in ((src, self.src_dict), (tgt, self.tgt_dict)):
            dict_path = os.path.join(data_dir, f"dict.{lang}.txt")
            if os.path.isfile(dict_path):
                check_same_dictionary(self.load_dictionary(dict_path), student_dict, lang, dict_path)
        return load_langpair_dataset(
            data_dir, split, src, self.src_dict, tgt, self.tgt_dict, combine=False,
            dataset_impl=self.cfg.dataset_impl, upsample_primary=1,
            left_pad_source=self.cfg.left_pad_source, left_pad_target=self.cfg.left_pad_target,
            max_source_positions=self.cfg.max_source_positions,
            max_target_positions=self.cfg.max_target_positions,
            truncate_source=self.cfg.truncate_source, num_buckets=self.cfg.num_batch_buckets,
            shuffle=(split != "test"), pad_to_multiple=self.cfg.required_seq_len_multiple,
        )

    def _paired(self, gold, split):
        teacher = self._load_pairs(self.cfg.kd_data, split)
        check_aligned(gold, teacher, self.cfg.kd_data)
        return TeacherTargetDataset(gold, teacher)

    def build_model(self, cfg, from_checkpoint=False):
        if not from_checkpoint:
            self._check_finetune_from_model()
        model = super().build_model(cfg, from_checkpoint)
        self.student_widths = state_widths(model)
        if not from_checkpoint and self.cfg.teacher_path:
            if self.cfg.teacher_cache:
                logger.info(
                    f"teacher {self.cfg.teacher_path} not loaded: --teacher-cache serves the splits that have a "
                    "cache; it is loaded only for a split without one, or for --student-init"
                )
            else:
                self._loaded_teacher()
        if not from_checkpoint and self.cfg.student_init != "none":
            self._init_student_from_teacher(model)
        return model

    def _check_finetune_from_model(self):
        """Read the --finetune-from-model checkpoint's metadata once (tensors memory-mapped) before
        fairseq loads it, so that an empty, truncated, refused or oversized file is named with its
        problem instead of failing inside torch with a traceback."""
        try:
            path = getattr(self.cfg, "finetune_from_model", None)
        except OmegaConfBaseException:  # a config built without fairseq's checkpoint group
            return
        if path and os.path.isfile(path):  # fairseq itself reports a missing one
            check_checkpoint(path, "--finetune-from-model")

    def _init_student_from_teacher(self, model):
        """Copy the teacher's embeddings, output projection, norms and chosen layers into ``model``.

        A resumed run loads checkpoint_last.pt after this, which then overrides the copy."""
        teacher = self._loaded_teacher(reason="--student-init copies its layers")
        if teacher.is_ensemble:
            raise ValueError("--student-init copies the layers of one teacher; --teacher-path names an ensemble")
        layer_maps = init_student_from_teacher(
            model, teacher.models[0].state_dict(), self.cfg.student_init,
            self.cfg.student_encoder_layer_map, self.cfg.student_decoder_layer_map,
        )
        logger.info(
            f"student initialised from the teacher's layers ({self.cfg.student_init}): "
            f"encoder {layer_maps['encoder']}, decoder {layer_maps['decoder']}"
        )

    def max_positions(self):
        """The student's limits, narrowed to the teacher's: a batch the teacher cannot read is
        skipped like one too long for the student, not an index error in the teacher."""
        limits = super().max_positions()
        if self._teacher is not None:
            limits = utils.resolve_max_positions(limits, *(model.max_positions() for model in self._teacher.models))
        return limits

    @property
    def teacher_source(self) -> TeacherSource:
        """Where the training split's teacher distribution comes from: a --teacher-cache, else an
        online teacher (named by --teacher-path, or set), else none."""
        if self.cfg.teacher_cache:
            return TeacherSource.CACHE
        if self._teacher is not None or self.cfg.teacher_path:
            return TeacherSource.ONLINE
        return TeacherSource.NONE

    @property
    def teacher_loaded(self) -> bool:
        """Whether the online teacher is in memory (it is loaded on first use)."""
        return self._teacher is not None

    def teacher(self, device: Optional[torch.device] = None) -> Teacher:
        """The online teacher, loaded on first use (e.g. by ``fairseq-validate``), on ``device`` if given."""
        teacher = self._loaded_teacher()
        return teacher if device is None else teacher.to(device)

    def set_teacher(self, teacher: Optional[Teacher]) -> None:
        """Use ``teacher`` (e.g. built in memory) as the online teacher; None forgets it."""
        self._teacher = teacher

    @property
    def teacher_widths(self) -> dict:
        """The widths of the online teacher's final states, as :attr:`student_widths` gives the
        student's (:func:`~fairseq_kd.hidden_states.state_widths`); only for one teacher."""
        teacher = self.teacher()
        if teacher.is_ensemble:
            raise ValueError("hidden states are compared with one teacher: pass one --teacher-path, not an ensemble")
        return state_widths(teacher.models[0])

    @property
    def pairs_teacher_targets(self) -> bool:
        """Whether each batch carries the teacher's translation next to the gold target."""
        return bool(self.cfg.kd_data) and self.cfg.kd_data_mode == "paired"

    def _loaded_teacher(self, reason: str = "a batch has no cache") -> Teacher:
        """The teacher, loaded now if it is not yet; ``reason`` (why it is needed) is logged when it
        is loaded here next to a --teacher-cache."""
        if self._teacher is None:
            if not self.cfg.teacher_path:
                raise ValueError(
                    "this criterion distils from an online teacher: pass --teacher-path TEACHER.pt "
                    "(the task translation_distill loads it)"
                )
            if self.cfg.teacher_cache:
                logger.info(f"loading teacher {self.cfg.teacher_path} next to --teacher-cache: {reason}")
            self._teacher = Teacher.load(
                self.cfg.teacher_path, self, precision=self.cfg.teacher_precision, dict_dir=self.cfg.teacher_dict_dir
            )
        return self._teacher
