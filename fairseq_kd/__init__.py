"""fairseq-kd: knowledge distillation for fairseq translation models.

Importing this package (``--user-dir fairseq_kd`` does) makes fairseq checkpoints loadable under
torch's safe ``weights_only`` unpickler and registers the ``translation_distill`` task and the
distillation criterions.
"""

from fairseq_kd.safe_load import allow_fairseq_checkpoints

allow_fairseq_checkpoints()

from fairseq_kd.tasks import translation_distill  # noqa: E402,F401  (registers the task)
from fairseq_kd.criterions import hybrid_kd, seq_kd_interp, triple_loss, word_kd  # noqa: E402,F401  (registers them)

__version__ = "0.1.0"
