"""The keys that the plugin's datasets add to a fairseq batch, read by the criterions.

``TEACHER_TARGET*`` are a second target, the teacher's translation of the same source
(:class:`~fairseq_kd.data.teacher_target_dataset.TeacherTargetDataset`, sequence-level KD);
``TEACHER_TOPK_*`` the teacher's stored distribution at every gold target position
(:class:`~fairseq_kd.data.teacher_cache_dataset.TeacherCacheDataset`, word-level KD from a cache).
"""

#: B x T' LongTensor: the teacher's translation, padded like ``target``
TEACHER_TARGET = "teacher_target"
#: ``net_input`` with ``prev_output_tokens`` built from :data:`TEACHER_TARGET` (teacher forcing)
TEACHER_NET_INPUT = "teacher_net_input"
#: number of tokens in :data:`TEACHER_TARGET`, as ``ntokens`` counts ``target``'s
TEACHER_NTOKENS = "teacher_ntokens"
#: B x T x k LongTensor: the teacher's k most probable tokens at each target position, best first
TEACHER_TOPK_IDS = "teacher_topk_ids"
#: B x T x k HalfTensor: their log-probabilities at T = 1
TEACHER_TOPK_LPROBS = "teacher_topk_lprobs"
