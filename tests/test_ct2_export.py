"""fairseq-kd-export-ct2 on the tiny teacher: the float32 export decodes as fairseq-generate does
(greedy: every sentence; beam 5: corpus BLEU), export.json, int8, and the refusals (unsupported
options, foreign output directories, a missing ctranslate2)."""

import argparse
import hashlib
import json
import os
import re
import sys

import pytest
import sacrebleu
import torch

from conftest import USER_DIR, RunsCode, cli, run
from fairseq_kd.cli import export_ct2
from fairseq_kd.ct2_export import UserError, require_ctranslate2
from fairseq_kd.ct2_translate import DecodingSettings, load_translator, translate_pieces

pytest.importorskip("ctranslate2")
N_TEST = 100


def fairseq_generate(tiny_data, checkpoint, beam):
    """fairseq-generate's best hypothesis per test sentence, in sentence order."""
    out = run([cli("fairseq-generate"), tiny_data / "bin", "--user-dir", USER_DIR, "--path", checkpoint,
               "--gen-subset", "test", "--beam", str(beam), "--batch-size", "128",
               "--required-batch-size-multiple", "1", "--cpu"])
    hyps = dict((int(i), text) for i, text in re.findall(r"^H-(\d+)\t\S+\t(.*)$", out, flags=re.M))
    assert sorted(hyps) == list(range(N_TEST))
    return [hyps[i] for i in range(N_TEST)]


def binarized_sources(tiny_data):
    """The test split's sources as the binarized data holds them: subword units, no </s>."""
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(tiny_data / "bin" / "dict.src.txt"))
    dataset = data_utils.load_indexed_dataset(str(tiny_data / "bin" / "test.src-tgt.src"), dictionary)
    sources = [[dictionary[t] for t in dataset[i]] for i in range(len(dataset))]
    assert all(s[-1] == "</s>" for s in sources)
    return [s[:-1] for s in sources]


def ct2_translate(model_dir, tiny_data, beam):
    translator = load_translator(str(model_dir), threads=1)
    results = translate_pieces(translator, binarized_sources(tiny_data), DecodingSettings(beam=beam))
    return [" ".join(nbest[0][0]) for nbest in results]


def export_cli(*args):
    return run([cli("fairseq-kd-export-ct2"), *args])


def export_fails(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        export_ct2.main([str(a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fairseq-kd-export-ct2: error: ") and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def float32_export(tiny_data, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "f32"
    spm_like = tiny_data / "train.src"  # any file the user names is copied as is
    export_cli(tiny_teacher, tiny_data / "bin", "--quantization", "float32", "--output-dir", out, "--copy", spm_like)
    return out


def test_float32_greedy_equals_fairseq_generate(float32_export, tiny_data, tiny_teacher):
    assert ct2_translate(float32_export, tiny_data, beam=1) == fairseq_generate(tiny_data, tiny_teacher, beam=1)


def test_float32_beam5_bleu_equals_fairseq(float32_export, tiny_data, tiny_teacher):
    references = (tiny_data / "test.tgt").read_text().splitlines()
    fairseq_bleu = sacrebleu.corpus_bleu(fairseq_generate(tiny_data, tiny_teacher, beam=5), [references]).score
    ct2_bleu = sacrebleu.corpus_bleu(ct2_translate(float32_export, tiny_data, beam=5), [references]).score
    assert abs(ct2_bleu - fairseq_bleu) <= 0.1, (ct2_bleu, fairseq_bleu)


def test_export_record(float32_export, tiny_data, tiny_teacher):
    import ctranslate2

    record = json.loads((float32_export / "export.json").read_text())
    data = tiny_teacher.read_bytes()
    assert record["checkpoint"] == {"path": str(tiny_teacher), "sha256": hashlib.sha256(data).hexdigest(),
                                    "size": len(data)}
    vocab = 4 + len((tiny_data / "bin" / "dict.src.txt").read_text().splitlines())  # + <s> <pad> </s> <unk>
    assert (record["source_vocab_size"], record["target_vocab_size"]) == (vocab, vocab)
    assert (record["source_lang"], record["target_lang"], record["quantization"]) == ("src", "tgt", "float32")
    assert record["ctranslate2_version"] == ctranslate2.__version__
    assert record["copied_files"] == ["train.src"]
    assert (float32_export / "train.src").read_bytes() == (tiny_data / "train.src").read_bytes()
    vocabulary = json.loads((float32_export / "shared_vocabulary.json").read_text())
    assert len(vocabulary) == vocab and vocabulary[1] == "<blank>"  # fairseq's <pad> under CTranslate2's name


def test_int8_export_is_smaller_and_translates(float32_export, tiny_data, tiny_teacher, tmp_path):
    out = tmp_path / "int8"
    printed = export_cli(tiny_teacher, tiny_data / "bin", "--quantization", "int8", "--output-dir", out)
    record = json.loads((out / "export.json").read_text())
    assert record["quantization"] == "int8" and printed.endswith(json.dumps(record, indent=1, sort_keys=True) + "\n")
    assert load_translator(str(out), threads=1).compute_type == "int8_float32"
    assert (out / "model.bin").stat().st_size < (float32_export / "model.bin").stat().st_size
    # quantization changes some translations, not the model. How many depends on CTranslate2's int8
    # backend, which it picks by CPU: greedy outputs equal to float32's, 99 of 100 with Intel MKL (an
    # Intel Xeon), 77 with oneDNN (an AMD EPYC, AVX2), where the int8 outputs still score 91 BLEU
    # against the float32 outputs; unrelated outputs of the same sentences (shifted by one) score ~1
    int8, float32 = ct2_translate(out, tiny_data, beam=1), ct2_translate(float32_export, tiny_data, beam=1)
    assert sacrebleu.corpus_bleu(float32[1:] + float32[:1], [float32]).score < 10
    assert sacrebleu.corpus_bleu(int8, [float32]).score >= 80


def test_distill_student_converts_without_its_teacher(float32_export, tiny_data, tiny_teacher, tmp_path):
    # a student trained with translation_distill names the plugin's task, its teacher (here a file
    # that is gone) and its initialisation in its config: the export is the same model
    state = torch.load(tiny_teacher, map_location="cpu", weights_only=True)
    args = argparse.Namespace(**vars(state["cfg"]["model"]))
    args.task, args.teacher_path = "translation_distill", str(tmp_path / "gone" / "teacher.pt")
    args.student_init = "spread"
    student = tmp_path / "student" / "checkpoint_best.pt"
    student.parent.mkdir()
    torch.save({**state, "cfg": {**state["cfg"], "model": args}}, student)
    export_cli(student, tiny_data / "bin", "--quantization", "float32", "--output-dir", tmp_path / "out")
    assert (tmp_path / "out" / "model.bin").read_bytes() == (float32_export / "model.bin").read_bytes()


def test_refuses_unsupported_options(tiny_data, tiny_teacher, tmp_path, capsys):
    state = torch.load(tiny_teacher, map_location="cpu", weights_only=True)
    cases = {
        "lstm_arch": ({"arch": "lstm"}, "--arch lstm (model lstm)"),
        "no_positions": ({"no_token_positional_embeddings": True}, "--no-token-positional-embeddings"),
        "mixed_norm": ({"decoder_normalize_before": True},
                       "--encoder-normalize-before and --decoder-normalize-before differ"),
        "tanh": ({"activation_fn": "tanh", "decoder_attention_heads": 4},
                 "--activation-fn tanh: CTranslate2 supports relu, gelu"),
    }
    for name, (changes, message) in cases.items():
        args = argparse.Namespace(**vars(state["cfg"]["model"]))
        for key, value in changes.items():
            setattr(args, key, value)
        bad = tmp_path / name / "checkpoint_best.pt"
        bad.parent.mkdir()
        torch.save({**state, "cfg": {**state["cfg"], "model": args}}, bad)
        err = export_fails(capsys, bad, tiny_data / "bin", "--output-dir", tmp_path / f"{name}-ct2")
        assert f"{bad} cannot be converted to CTranslate2: " in err and message in err, err
        if name == "tanh":  # every problem is named, not only the first
            assert "--encoder-attention-heads 2 and --decoder-attention-heads 4 differ" in err
        assert not (tmp_path / f"{name}-ct2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_output_dir_rules(float32_export, tiny_data, tiny_teacher, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    err = export_fails(capsys, tiny_teacher, tiny_data / "bin", "--output-dir", foreign)
    assert f"--output-dir {foreign} is not empty and holds no export.json" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"] and (foreign / "notes.txt").read_text() == "mine"

    err = export_fails(capsys, tiny_teacher, tiny_data / "bin", "--output-dir", tmp_path / "new", "--copy",
                       tmp_path / "missing.model")
    assert "--copy " in err and "missing.model: file not found" in err and not (tmp_path / "new").exists()

    # an empty directory, then the export itself, are replaced by a new export
    again = tmp_path / "again"
    again.mkdir()
    export_ct2.main([str(tiny_teacher), str(tiny_data / "bin"), "--output-dir", str(again),
                     "--quantization", "int8"])
    assert json.loads((again / "export.json").read_text())["quantization"] == "int8"
    export_ct2.main([str(tiny_teacher), str(tiny_data / "bin"), "--output-dir", str(again),
                     "--quantization", "float32"])
    assert json.loads((again / "export.json").read_text())["quantization"] == "float32"
    assert (again / "model.bin").read_bytes() == (float32_export / "model.bin").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "foreign"]


def test_refuses_unsafe_and_truncated_checkpoints(tiny_data, tiny_teacher, tmp_path, capsys):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    # dressed as a fairseq checkpoint: the payload hides in the model config
    torch.save({"model": {}, "cfg": {"model": argparse.Namespace(arch=RunsCode(os.system, f"touch '{marker}'"))}},
               evil)
    err = export_fails(capsys, evil, tiny_data / "bin", "--output-dir", tmp_path / "evil-ct2")
    assert "refused by torch's safe loader (weights_only)" in err and "nothing in the file was run" in err
    assert not marker.exists() and not (tmp_path / "evil-ct2").exists()

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_teacher.read_bytes()[:5000])
    err = export_fails(capsys, truncated, tiny_data / "bin", "--output-dir", tmp_path / "truncated-ct2")
    assert "is not a complete checkpoint, truncated or not written by torch.save" in err
    assert not (tmp_path / "truncated-ct2").exists()


def test_missing_ctranslate2_says_how_to_install(monkeypatch, capsys, tiny_data, tiny_teacher, tmp_path):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # makes `import ctranslate2` raise ImportError
    with pytest.raises(UserError, match=r"pip install -e \.\[ct2\]"):
        require_ctranslate2()
    err = export_fails(capsys, tiny_teacher, tiny_data / "bin", "--output-dir", tmp_path / "out")
    assert "the ctranslate2 package is not installed" in err and not (tmp_path / "out").exists()
