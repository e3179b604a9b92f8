"""Distillation bitext: the teacher's translations of a training set, as new training data.

Sequence-level knowledge distillation (Kim & Rush, 2016, "Sequence-Level Knowledge
Distillation") trains the student on the teacher's beam-search output instead of the gold
targets. This package holds the parts of ``fairseq-kd-distill-data`` that do not need a command
line: running the teacher (:mod:`.translate`, or CTranslate2 in :mod:`.ct2_engine`), choosing
which hypotheses become pairs (:mod:`.selection`), dropping bad pairs (:mod:`.filters`), the
resumable shard layout of the output directory (:mod:`.shards`), and assembling the final text and
binarized files (:mod:`.merge`, :mod:`.binarize`).
"""
