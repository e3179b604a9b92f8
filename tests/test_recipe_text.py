"""examples/tools/text.py, the recipes' text tool: the sentencepiece model it trains is the same on
every machine, whatever its number of cores."""

import argparse
import importlib.util
import os
from pathlib import Path

import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]


def text_tool():
    spec = importlib.util.spec_from_file_location("recipe_text", REPO / "examples" / "tools" / "text.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pieces_and_scores(model_file):
    model = spm.SentencePieceProcessor(model_file=str(model_file))
    return [(model.id_to_piece(i), model.get_score(i)) for i in range(model.get_piece_size())]


def test_sentencepiece_model_does_not_depend_on_the_cores(tmp_path, monkeypatch):
    text = text_tool()
    files = []
    for lang in ("en", "de"):
        lines = (REPO / "data" / "multi30k" / f"train.{lang}").read_text(encoding="utf-8").splitlines()[:3000]
        path = tmp_path / f"train.{lang}"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        files.append(str(path))
    models = {}
    for cores in (1, 8):  # sentencepiece itself on 1 and 2 threads: 302 of the 800 pieces or scores differ
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        prefix = tmp_path / f"spm-{cores}-cores"
        text.spm_train(argparse.Namespace(files=files, model_prefix=str(prefix), vocab_size=800, input_sentences=0))
        models[cores] = pieces_and_scores(f"{prefix}.model")
    assert len(models[1]) == 800
    assert models[1] == models[8]
