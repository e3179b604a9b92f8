"""triple_loss on real tiny fairseq transformers, against independent float64 computations."""

import math

import pytest
import torch
from fairseq import tasks

from fairseq_kd.criterions.triple_loss import TripleLossCriterion
from fairseq_kd.teacher import Teacher
from reference import kd_terms64, label_smoothed_nll64, non_pad_positions, softmax64
from test_word_kd import data_dir, make_sample, parse  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")

EPS, T = 0.1, 2.0


def build(data_dir, teacher_dim, *flags):  # noqa: F811
    """(task, student of width 16, teacher of width ``teacher_dim``, sample, criterion cfg)."""
    cfg = parse(data_dir, "--dropout", "0.0", "--label-smoothing", str(EPS), "--temperature", str(T), *flags,
                criterion="triple_loss")
    task = tasks.setup_task(cfg.task)
    torch.manual_seed(0)
    student = task.build_model(cfg.model)
    teacher_cfg = parse(data_dir, "--dropout", "0.0", "--encoder-embed-dim", str(teacher_dim),
                        "--decoder-embed-dim", str(teacher_dim), criterion="triple_loss")
    torch.manual_seed(1)
    teacher = tasks.setup_task(teacher_cfg.task).build_model(teacher_cfg.model)
    task.set_teacher(Teacher([teacher], precision="fp32"))
    return task, student, teacher, make_sample(task), cfg.criterion


def decoder_states(model, net_input):
    """Final decoder states by an explicit second route: fairseq's own extract_features."""
    encoder_out = model.encoder(net_input["src_tokens"], src_lengths=net_input["src_lengths"])
    states, _ = model.decoder.extract_features(net_input["prev_output_tokens"], encoder_out=encoder_out)
    return states.double()


def reference(student, teacher, sample, pad, projection=None):
    net_input = sample["net_input"]
    with torch.no_grad():
        zs, zt = student(**net_input)[0].double(), teacher(**net_input)[0].double()
        hs, ht = decoder_states(student, net_input), decoder_states(teacher, net_input)
        if projection is not None:
            hs = hs @ projection.weight.double().T
    out = dict(ls=0.0, kl=0.0, cos=0.0)
    for b, t, y in non_pad_positions(sample["target"], pad):
        out["ls"] += label_smoothed_nll64(torch.log(softmax64(zs[b, t])), y, EPS)
        out["kl"] += kd_terms64(softmax64(zt[b, t], T), softmax64(zs[b, t], T))[0]
        a, c = hs[b, t], ht[b, t]
        out["cos"] += 1.0 - float(a @ c) / (math.sqrt(float(a @ a)) * math.sqrt(float(c @ c)))
    return out


def test_triple_loss_matches_independent_computation(data_dir):  # noqa: F811
    task, student, teacher, sample, cfg = build(data_dir, 16, "--kd-weight", "0.7", "--nll-weight", "0.2",
                                                "--cos-weight", "1.5")
    crit = task.build_criterion(cfg)
    loss, _, log = crit(student, sample)
    ref = reference(student, teacher, sample, task.target_dictionary.pad())
    assert float(loss) == pytest.approx(0.7 * T**2 * ref["kl"] + 0.2 * ref["ls"] + 1.5 * ref["cos"], rel=1e-5)
    assert float(log["cos_loss"]) == pytest.approx(ref["cos"], rel=1e-5)
    assert float(log["kd_loss"]) == pytest.approx(ref["kl"], rel=1e-5)
    assert ref["cos"] > 0.1 * sample["ntokens"]  # random models: the states really differ
    assert len(list(crit.parameters())) == 0  # equal widths: nothing to learn


def test_cosine_is_zero_for_identical_student_and_teacher(data_dir):  # noqa: F811
    task, student, teacher, sample, cfg = build(data_dir, 16)
    task.set_teacher(Teacher([student], precision="fp32"))
    _, _, log = task.build_criterion(cfg)(student, sample)
    assert float(log["cos_loss"]) == pytest.approx(0.0, abs=1e-4)
    assert float(log["kd_loss"]) == pytest.approx(0.0, abs=1e-4)


def test_width_mismatch_is_an_error_that_names_the_fix(data_dir):  # noqa: F811
    task, _, _, _, cfg = build(data_dir, 24)
    with pytest.raises(ValueError, match=r"decoder 16 vs 24.*--width-mismatch project"):
        task.build_criterion(cfg)


def test_width_mismatch_projection_is_learned(data_dir):  # noqa: F811
    task, student, teacher, sample, cfg = build(data_dir, 24, "--width-mismatch", "project")
    crit = task.build_criterion(cfg)
    projection = crit.projections["decoder"]
    assert tuple(projection.weight.shape) == (24, 16)
    loss, _, log = crit(student, sample)
    ref = reference(student, teacher, sample, task.target_dictionary.pad(), projection)
    assert float(log["cos_loss"]) == pytest.approx(ref["cos"], rel=1e-5)
    loss.backward()
    assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert "projections.decoder.weight" in crit.state_dict()  # saved with the student's checkpoint


def test_encoder_states_add_source_positions(data_dir):  # noqa: F811
    task, student, teacher, sample, cfg = build(data_dir, 16, "--cos-states", "decoder+encoder")
    _, _, log = task.build_criterion(cfg)(student, sample)
    src = sample["net_input"]["src_tokens"]
    pad = task.source_dictionary.pad()
    with torch.no_grad():
        es = student.encoder(src, src_lengths=sample["net_input"]["src_lengths"])["encoder_out"][0].double()
        et = teacher.encoder(src, src_lengths=sample["net_input"]["src_lengths"])["encoder_out"][0].double()
    enc_cos = 0.0
    for b in range(src.size(0)):
        for s in range(src.size(1)):
            if int(src[b, s]) != pad:
                a, c = es[s, b], et[s, b]
                enc_cos += 1 - float(a @ c) / math.sqrt(float(a @ a) * float(c @ c))
    dec_cos = reference(student, teacher, sample, task.target_dictionary.pad())["cos"]
    assert float(log["cos_loss"]) == pytest.approx(dec_cos + enc_cos, rel=1e-5)
    assert log["cos_positions"] == sample["ntokens"] + int(src.ne(pad).sum())


def test_student_encoder_runs_once_for_both_terms(data_dir):  # noqa: F811
    """The encoder states the cosine term compares are those the decoder read (one pass, one dropout)."""
    task, student, _, sample, cfg = build(data_dir, 16, "--cos-states", "decoder+encoder")
    crit = task.build_criterion(cfg)
    calls = []
    student.encoder.register_forward_hook(lambda *_: calls.append(1))
    hooks = len(student.encoder._forward_hooks)
    crit(student, sample)
    assert len(calls) == 1
    assert len(student.encoder._forward_hooks) == hooks  # the criterion's own hook is removed again


def test_zero_kd_weight_skips_the_kd_term(data_dir):  # noqa: F811
    task, student, teacher, sample, cfg = build(data_dir, 16, "--kd-weight", "0", "--nll-weight", "0.2",
                                                "--cos-weight", "1.5")
    loss, _, log = task.build_criterion(cfg)(student, sample)
    ref = reference(student, teacher, sample, task.target_dictionary.pad())
    assert "kd_loss" not in log
    assert float(loss) == pytest.approx(0.2 * ref["ls"] + 1.5 * ref["cos"], rel=1e-5)


def test_ensemble_is_refused_for_the_cosine_term_at_start_up(data_dir):  # noqa: F811
    task, _, teacher, _, cfg = build(data_dir, 16)
    task.set_teacher(Teacher([teacher, teacher], precision="fp32"))
    with pytest.raises(ValueError, match="one teacher"):
        task.build_criterion(cfg)


def test_is_registered():
    from fairseq.criterions import CRITERION_REGISTRY

    assert CRITERION_REGISTRY["triple_loss"] is TripleLossCriterion


def with_topk_cache(task, teacher, sample, k=3):
    """``sample`` with the fields a --teacher-cache batch carries: ``teacher``'s top-k at T = 1."""
    with torch.no_grad():
        top = torch.log_softmax(teacher(**sample["net_input"])[0].float(), -1).topk(k, dim=-1)
    return dict(sample, teacher_topk_ids=top.indices, teacher_topk_lprobs=top.values)


def test_kd_term_from_a_cache_without_any_teacher(data_dir):  # noqa: F811
    """--cos-weight 0 with --teacher-cache: the KD term comes from the cached top-k, no teacher is
    loaded, and the loss equals word_kd's on the same batch (kd weight = alpha, NLL weight = 1 - alpha)."""
    task, student, teacher, sample, _ = build(data_dir, 16)
    sample = with_topk_cache(task, teacher, sample)
    task.set_teacher(None)  # no online teacher: only the (named) cache
    task.cfg.teacher_cache = "cache-dir"
    triple = TripleLossCriterion(task, kd_weight=0.3, nll_weight=0.7, cos_weight=0.0, cos_states="decoder",
                                 width_mismatch="error", temperature=T, kd_loss="kl", label_smoothing=EPS,
                                 sentence_avg=False)
    loss, _, log = triple(student, sample)
    assert not task.teacher_loaded and "teacher_nll_loss" not in log
    ids, lprobs = sample["teacher_topk_ids"], sample["teacher_topk_lprobs"]
    with torch.no_grad():
        zs = student(**sample["net_input"])[0].double()
    expected_kd = expected_ls = 0.0
    for b, t, y in non_pad_positions(sample["target"], task.target_dictionary.pad()):
        p_t = softmax64(zs[b, t], T)
        q = softmax64(lprobs[b, t].double(), T)  # the top-k renormalised at T
        expected_kd += kd_terms64(q, p_t[ids[b, t]])[0]
        expected_ls += label_smoothed_nll64(torch.log(softmax64(zs[b, t])), y, EPS)
    assert float(log["kd_loss"]) == pytest.approx(expected_kd, rel=1e-5)
    assert float(loss) == pytest.approx(0.3 * T**2 * expected_kd + 0.7 * expected_ls, rel=1e-5)


def test_cosine_term_with_a_cache_is_refused(data_dir):  # noqa: F811
    cfg = parse(data_dir, "--teacher-cache", "cache-dir", criterion="triple_loss")
    task = tasks.setup_task(cfg.task)
    with pytest.raises(ValueError, match=r"hidden states, which a --teacher-cache does not hold.*--cos-weight 0"):
        TripleLossCriterion(task, kd_weight=1.0, nll_weight=1.0, cos_weight=1.0, cos_states="decoder",
                            width_mismatch="error", temperature=1.0, kd_loss="kl", label_smoothing=0.0,
                            sentence_avg=False)
