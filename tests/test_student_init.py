"""Layer-sampled student initialisation: the layer maps of each strategy, bit-identical copies of
the chosen teacher tensors (every student tensor accounted for), a student checkpoint that plain
fairseq-generate and fairseq-train (--finetune-from-model, --restore-file) take, and the errors.

One teacher (6 encoder x 4 decoder layers, pre-norm, learned positions, layernorm_embedding,
shared embeddings) is trained briefly through fairseq-train; others are built in-process with
fairseq's model builder and saved through fairseq's Trainer without training, their weights
redrawn so that every tensor is distinct.
"""

import re
import shutil

import pytest
import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.trainer import Trainer

import fairseq_kd  # noqa: F401  (safe loading of the teacher checkpoints)
from conftest import COMMON_TRAIN, TINY_ARCH, cli, run
from fairseq_kd.cli.init_student import main as init_student_main
from fairseq_kd.student_init import choose_layer_map, count_layers, init_student_from_teacher, parse_layer_map


def arch(encoder_layers, decoder_layers, *extra, base=TINY_ARCH):
    args = list(base)
    args[args.index("--encoder-layers") + 1] = str(encoder_layers)
    args[args.index("--decoder-layers") + 1] = str(decoder_layers)
    return args + list(extra)


PRE_NORM = ["--encoder-normalize-before", "--decoder-normalize-before", "--layernorm-embedding",
            "--encoder-learned-pos", "--decoder-learned-pos"]
TEACHER_ARCH = arch(6, 4, *PRE_NORM)
STUDENT_ARCH = arch(3, 2, *PRE_NORM)  # spread: encoder 0,2,5, decoder 0,3
TRAIN = [*COMMON_TRAIN, "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]
LAYER_KEY = re.compile(r"^(encoder|decoder)\.layers\.(\d+)\.(.*)$")


# ---------------------------------------------------------------------------------------- maps

@pytest.mark.parametrize("strategy,teacher,student,explicit,expected", [
    ("every-nth", 24, 3, None, [0, 8, 16]),
    ("every-nth", 6, 3, None, [0, 2, 4]),
    ("every-nth", 12, 3, None, [0, 4, 8]),
    ("every-nth", 6, 1, None, [0]),
    ("spread", 24, 3, None, [0, 12, 23]),
    ("spread", 6, 3, None, [0, 2, 5]),
    ("spread", 12, 3, None, [0, 6, 11]),
    ("spread", 6, 1, None, [0]),
    ("explicit", 24, 3, "0,8,16", [0, 8, 16]),
    ("explicit", 6, 3, "1,3,5", [1, 3, 5]),
    ("explicit", 12, None, "0,6,11", [0, 6, 11]),
    ("explicit", 6, 1, "5", [5]),
])
def test_layer_maps(strategy, teacher, student, explicit, expected):
    layer_map = choose_layer_map(strategy, teacher, student, explicit and parse_layer_map(explicit))
    assert layer_map == expected


def test_the_seeds_example_24x6_to_3x3_every_nth():
    assert choose_layer_map("every-nth", 24, 3, side="encoder") == [0, 8, 16]  # 1 in 8
    assert choose_layer_map("every-nth", 6, 3, side="decoder") == [0, 2, 4]  # 1 in 2


@pytest.mark.parametrize("teacher,student,expected", [
    # Shleifer & Rush (2020), section 3: 12 -> 3 copies 0, 6, 11; a one-layer student copies layer 0
    (12, 3, [0, 6, 11]), (12, 1, [0]), (16, 1, [0]),
    # entries of the authors' LAYERS_TO_COPY table (Hugging Face make_student.py) the rule reproduces
    (12, 6, [0, 2, 4, 7, 9, 11]), (16, 2, [0, 15]), (16, 3, [0, 8, 15]), (16, 4, [0, 5, 10, 15]),
    (16, 6, [0, 3, 6, 9, 12, 15]), (6, 2, [0, 5]), (6, 3, [0, 2, 5]),
])
def test_spread_matches_shleifer_and_rush(teacher, student, expected):
    assert choose_layer_map("spread", teacher, student) == expected


def test_every_map_is_increasing_in_range_and_keeps_the_ends():
    for teacher in range(1, 25):
        assert choose_layer_map("spread", teacher, teacher) == list(range(teacher))
        assert choose_layer_map("every-nth", teacher, teacher) == list(range(teacher))
        for student in range(2, teacher + 1):
            layer_map = choose_layer_map("spread", teacher, student)
            assert len(layer_map) == student and layer_map[0] == 0 and layer_map[-1] == teacher - 1
            assert all(a < b for a, b in zip(layer_map, layer_map[1:])), (teacher, student, layer_map)


@pytest.mark.parametrize("strategy,teacher,student,explicit,message", [
    ("spread", 6, 8, None, "cannot have more encoder layers (8) than the teacher (6)"),
    ("every-nth", 6, 7, None, "cannot have more encoder layers (7) than the teacher (6)"),
    ("explicit", 3, None, [0, 1, 2, 2], "cannot have more encoder layers (4) than the teacher (3)"),
    ("explicit", 6, None, [0, 2, 6], "teacher layer 6, but the teacher's 6 encoder layers are numbered 0 to 5"),
    ("explicit", 6, None, [-1, 2], "names teacher layer -1"),
    ("explicit", 6, None, [2, 0], "distinct teacher layers in increasing order"),
    ("explicit", 6, None, [1, 1], "distinct teacher layers in increasing order"),
    ("explicit", 6, 2, [0, 2, 4], "has 3 entries but the student has 2 encoder layers"),
    ("explicit", 6, 3, None, "needs an explicit encoder layer map: the student's encoder is to have 3 layers"),
    ("spread", 6, 3, [0, 2, 5], "used by the explicit strategy only, not by spread"),
    ("spread", 6, 0, None, "at least one encoder layer"),
    ("halves", 6, 3, None, "unknown layer-copying strategy 'halves'"),
])
def test_bad_maps_are_refused(strategy, teacher, student, explicit, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        choose_layer_map(strategy, teacher, student, explicit)


def test_every_nth_on_a_non_divisor_says_what_works():
    with pytest.raises(ValueError) as err:
        choose_layer_map("every-nth", 6, 4, side="decoder")
    message = str(err.value)
    assert "6 is not a multiple of 4" in message and "decoder" in message
    assert "spread strategy works for any depth (it would take layers 0,2,3,5)" in message
    assert "explicit decoder layer map" in message


def test_a_malformed_layer_map_is_refused():
    with pytest.raises(ValueError, match="comma-separated teacher layer indices such as 0,8,16, got '0;8'"):
        parse_layer_map("0;8")


# ------------------------------------------------------------------------------------ teachers

def build(data_bin, arch_args):
    """A randomly initialised model built by fairseq from command-line style arguments, with its
    config and task."""
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [
        str(data_bin), "--task", "translation", *arch_args, "--optimizer", "adam", "--lr", "0.001",
        "--criterion", "cross_entropy", "--cpu",
    ])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    return cfg, task, task.build_model(cfg.model)


def save_untrained_checkpoint(path, data_bin, arch_args, seed):
    """A real fairseq checkpoint (written by fairseq's Trainer) of an untrained model whose every
    tensor is redrawn from N(0, 1), so that no two tensors are equal."""
    torch.manual_seed(seed)
    cfg, task, model = build(data_bin, arch_args)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_()
    trainer = Trainer(cfg, task, model, task.build_criterion(cfg.criterion))
    trainer.consolidate_optimizer()  # as fairseq's checkpoint_utils.save_checkpoint does first
    trainer.save_checkpoint(str(path), {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}})
    return path


@pytest.fixture(scope="module")
def deep_teacher(tiny_data, tmp_path_factory):
    """A 6x4 pre-norm teacher trained for a few epochs: far better than chance, not converged."""
    save_dir = tmp_path_factory.mktemp("deep_teacher")
    run([cli("fairseq-train"), tiny_data / "bin", "--task", "translation", *TEACHER_ARCH, *TRAIN,
         "--max-update", "32", "--disable-validation", "--save-dir", save_dir, "--no-epoch-checkpoints"])
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def spread_student(deep_teacher, tiny_data, tmp_path_factory):
    """The 3x2 student of the deep teacher made by the console script; its path and output."""
    path = tmp_path_factory.mktemp("spread_student") / "init.pt"
    output = run([cli("fairseq-kd-init-student"), tiny_data / "bin", "--teacher", deep_teacher,
                  "--encoder-layers", "3", "--decoder-layers", "2", "--strategy", "spread", "--output", path])
    return path, output


def load(path):
    return torch.load(path, map_location="cpu")


def assert_copied(student_state, teacher_state, encoder_map, decoder_map):
    """The student holds exactly the teacher's tensors outside the layers plus the chosen layers,
    renumbered, each bit-identical to its teacher tensor."""
    maps = {"encoder": encoder_map, "decoder": decoder_map}
    expected = {}
    for key in teacher_state:
        m = LAYER_KEY.match(key)
        if m is None:
            expected[key] = key
        elif int(m.group(2)) in maps[m.group(1)]:
            expected[f"{m.group(1)}.layers.{maps[m.group(1)].index(int(m.group(2)))}.{m.group(3)}"] = key
    assert set(student_state) == set(expected)
    for key, source in expected.items():
        assert student_state[key].dtype == teacher_state[source].dtype
        assert torch.equal(student_state[key], teacher_state[source]), (key, source)


def only_plain_types(obj):
    """True if ``obj`` holds nothing beyond containers, primitives and tensors (torch's default
    ``weights_only`` allow-list), so it loads without the plugin's allow-list."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and only_plain_types(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(only_plain_types(v) for v in obj)
    return obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor))


# ------------------------------------------------------------------------- student checkpoints

def test_console_script_writes_the_spread_student(spread_student, deep_teacher):
    path, output = spread_student
    assert "encoder layer map: 0,2,5" in output and "decoder layer map: 0,3" in output
    student, teacher = load(path), load(deep_teacher)
    assert_copied(student["model"], teacher["model"], [0, 2, 5], [0, 3])
    assert student["extra_state"]["student_init"] == {
        "teacher": str(deep_teacher), "strategy": "spread", "teacher_encoder_layers": 6,
        "teacher_decoder_layers": 4, "encoder_layer_map": [0, 2, 5], "decoder_layer_map": [0, 3],
    }
    model_cfg = student["cfg"]["model"]
    assert (model_cfg["encoder_layers"], model_cfg["decoder_layers"]) == (3, 2)
    assert {k: v for k, v in model_cfg.items() if "layers" not in k} == {
        k: v for k, v in vars(teacher["cfg"]["model"]).items() if "layers" not in k}
    assert only_plain_types(student)
    assert not list(path.parent.glob("*.tmp*"))  # written through a temporary file, then renamed


@pytest.mark.parametrize("flags,encoder_map,decoder_map", [
    (["--strategy", "every-nth", "--encoder-layers", "3", "--decoder-layers", "2"], [0, 2, 4], [0, 2]),
    (["--strategy", "explicit", "--encoder-layer-map", "1,4", "--decoder-layer-map", "2"], [1, 4], [2]),
    (["--strategy", "explicit", "--encoder-layer-map", "5"], [5], [0, 1, 2, 3]),
    (["--strategy", "spread", "--decoder-layers", "1"], [0, 1, 2, 3, 4, 5], [0]),
])
def test_every_strategy_copies_the_chosen_layers(deep_teacher, tiny_data, tmp_path, capsys, flags, encoder_map,
                                                 decoder_map):
    path = tmp_path / "student.pt"
    init_student_main([str(tiny_data / "bin"), "--teacher", str(deep_teacher), "--output", str(path), *flags])
    printed = capsys.readouterr().out
    assert f"encoder layer map: {','.join(map(str, encoder_map))}" in printed
    assert f"decoder layer map: {','.join(map(str, decoder_map))}" in printed
    student = load(path)
    assert_copied(student["model"], load(deep_teacher)["model"], encoder_map, decoder_map)
    record = student["extra_state"]["student_init"]
    assert (record["encoder_layer_map"], record["decoder_layer_map"]) == (encoder_map, decoder_map)


def test_post_norm_teacher_with_separate_embeddings(tiny_data, tmp_path):
    """Sinusoidal positions (computed, not stored), no layer norm after the stacks, and separate
    source, target and output embeddings: each is copied from its own teacher tensor."""
    post_norm = [a for a in arch(6, 3) if a != "--share-all-embeddings"]
    teacher = save_untrained_checkpoint(tmp_path / "teacher.pt", tiny_data / "bin", post_norm, seed=2)
    path = tmp_path / "student.pt"
    init_student_main([str(tiny_data / "bin"), "--teacher", str(teacher), "--output", str(path),
                       "--strategy", "every-nth", "--encoder-layers", "2", "--decoder-layers", "1"])
    teacher_state, student_state = load(teacher)["model"], load(path)["model"]
    assert "decoder.output_projection.weight" in student_state and "encoder.layer_norm.weight" not in student_state
    source, target = teacher_state["encoder.embed_tokens.weight"], teacher_state["decoder.embed_tokens.weight"]
    assert not torch.equal(source, target)
    assert_copied(student_state, teacher_state, [0, 3], [0])


def test_plain_fairseq_generate_translates_every_sentence(spread_student, tiny_data):
    path, _ = spread_student
    # no --user-dir: the student checkpoint loads under torch's default weights_only allow-list
    output = run([cli("fairseq-generate"), tiny_data / "bin", "--path", path, "--gen-subset", "test",
                  "--beam", "2", "--max-len-b", "20", "--batch-size", "32", "--required-batch-size-multiple", "1",
                  "--cpu"])
    hypothesis_ids = sorted(int(m) for m in re.findall(r"^H-(\d+)\t", output, flags=re.M))
    assert hypothesis_ids == list(range(len((tiny_data / "test.src").read_text().splitlines())))


def first_loss(output):
    return float(re.search(r"epoch 001:\s+1 / \d+ loss=([\d.]+)", output).group(1))


def train_student(data_bin, save_dir, *extra):
    return run([cli("fairseq-train"), data_bin, "--task", "translation", *STUDENT_ARCH, *TRAIN,
                "--log-interval", "1", "--max-update", "1", "--disable-validation", "--no-save",
                "--save-dir", save_dir, *extra])


def test_fairseq_train_starts_from_the_student(spread_student, tiny_data, tmp_path):
    path, _ = spread_student
    data = tiny_data / "bin"
    finetuned = train_student(data, tmp_path / "finetune", "--finetune-from-model", path)
    assert re.search(r"Loaded checkpoint .*init\.pt \(epoch 1 @ 0 updates\)", finetuned)
    restored = train_student(data, tmp_path / "restore", "--restore-file", path, "--reset-optimizer",
                             "--reset-dataloader", "--reset-meters", "--reset-lr-scheduler")
    assert re.search(r"Loaded checkpoint .*init\.pt \(epoch 1 @ 0 updates\)", restored)
    from_scratch = train_student(data, tmp_path / "scratch")
    # the first logged loss is that of the initial weights on the first batch (the same batch in all three)
    assert first_loss(finetuned) == first_loss(restored)
    losses = first_loss(finetuned), first_loss(from_scratch)
    assert losses[0] < losses[1] - 2.0, losses  # bits per token; measured about 4.4 vs 8.1


# ---------------------------------------------------------------------- the task's entry point

def test_init_student_from_teacher_on_a_built_student(deep_teacher, tiny_data):
    teacher_state = checkpoint_utils.load_checkpoint_to_cpu(str(deep_teacher))["model"]
    _, _, student = build(tiny_data / "bin", arch(2, 2, *PRE_NORM))
    maps = init_student_from_teacher(student, teacher_state, "every-nth")
    assert maps == {"encoder": [0, 3], "decoder": [0, 2]}
    assert_copied(student.state_dict(), teacher_state, [0, 3], [0, 2])
    _, _, student = build(tiny_data / "bin", arch(2, 2, *PRE_NORM))
    assert init_student_from_teacher(student, teacher_state, "explicit", "4,5", "1,3") == {
        "encoder": [4, 5], "decoder": [1, 3]}
    assert_copied(student.state_dict(), teacher_state, [4, 5], [1, 3])


def test_other_widths_are_refused(deep_teacher, tiny_data):
    teacher_state = checkpoint_utils.load_checkpoint_to_cpu(str(deep_teacher))["model"]
    narrow = arch(3, 2, *PRE_NORM)
    narrow[narrow.index("--encoder-ffn-embed-dim") + 1] = "64"
    _, _, student = build(tiny_data / "bin", narrow)
    with pytest.raises(ValueError) as err:
        init_student_from_teacher(student, teacher_state, "spread")
    message = str(err.value)
    assert "widths differ from the teacher's" in message and "--encoder-ffn-embed-dim" in message
    assert "encoder.layers.0.fc1.weight (64, 64) vs teacher encoder.layers.0.fc1.weight (128, 64)" in message


def test_other_architecture_options_are_refused(deep_teacher, tiny_data):
    pre_norm_teacher = checkpoint_utils.load_checkpoint_to_cpu(str(deep_teacher))["model"]
    _, _, post_norm_student = build(tiny_data / "bin", arch(3, 2))  # sinusoidal positions, no extra norms
    with pytest.raises(ValueError) as err:
        init_student_from_teacher(post_norm_student, pre_norm_teacher, "spread")
    message = str(err.value)
    assert "differs from the teacher's beyond the number of layers" in message and "--arch and options" in message
    assert "teacher tensors with no place in the student: encoder.embed_positions.weight, " \
           "encoder.layernorm_embedding.weight" in message
    _, _, post_norm_teacher = build(tiny_data / "bin", arch(6, 4))
    _, _, pre_norm_student = build(tiny_data / "bin", STUDENT_ARCH)
    with pytest.raises(ValueError, match="the student needs but the teacher lacks: encoder.embed_positions.weight"):
        init_student_from_teacher(pre_norm_student, post_norm_teacher.state_dict(), "spread")


def test_models_without_layer_lists_are_refused(deep_teacher, tiny_data, tmp_path, capsys):
    lstm = ["--arch", "lstm", "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "16",
            "--decoder-embed-dim", "16", "--encoder-hidden-size", "16", "--decoder-hidden-size", "16",
            "--decoder-out-embed-dim", "16"]
    teacher = save_untrained_checkpoint(tmp_path / "lstm.pt", tiny_data / "bin", lstm, seed=3)
    message = init_student_error(capsys, [str(tiny_data / "bin"), "--teacher", str(teacher), "--output",
                                          str(tmp_path / "s.pt"), "--encoder-layers", "1"])
    assert "(arch lstm) has no encoder.layers.<i>.* tensors" in message
    assert "lstm or fconv cannot be initialised this way" in message
    assert not (tmp_path / "s.pt").exists()
    # the same for a student of such an architecture (the task's entry point)
    _, _, student = build(tiny_data / "bin", lstm)
    with pytest.raises(ValueError, match=re.escape("the student has no encoder.layers.<i>.* tensors")):
        init_student_from_teacher(student, load(deep_teacher)["model"], "spread")
    with pytest.raises(ValueError, match="the teacher has no decoder.layers"):
        count_layers({"encoder.layers.0.fc1.weight": torch.zeros(1)}, "decoder", "the teacher")


def init_student_error(capsys, argv):
    """fairseq-kd-init-student's error for ``argv``: exit status 2, one line on stderr, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        init_student_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fairseq-kd-init-student: error: ")
    return err


def test_cli_errors_are_one_line_and_write_nothing(deep_teacher, tiny_data, tmp_path, capsys):
    out = tmp_path / "s.pt"
    common = [str(tiny_data / "bin"), "--teacher", str(deep_teacher), "--output", str(out)]
    for flags, message in [
        (["--strategy", "every-nth", "--encoder-layers", "4"], "cannot take 4 of the teacher's 6 encoder"),
        (["--decoder-layers", "5"], "cannot have more decoder layers (5) than the teacher (4)"),
        (["--strategy", "explicit", "--encoder-layer-map", "0,9"], "names teacher layer 9"),
        (["--encoder-layer-map", "0,1"], "used by the explicit strategy only, not by spread"),
    ]:
        assert message in init_student_error(capsys, common + flags)
    assert "--output is the teacher checkpoint itself" in init_student_error(
        capsys, [str(tiny_data / "bin"), "--teacher", str(deep_teacher), "--output", str(deep_teacher)])
    assert not out.exists()


def test_a_data_directory_without_a_training_split_is_named(deep_teacher, tiny_data, tmp_path, capsys):
    """A teacher trained without -s/-t keeps no language pair in its config; fairseq reads the pair
    from the data directory's file names, which a directory holding only the dictionaries lacks."""
    assert load(deep_teacher)["cfg"]["task"]["source_lang"] is None
    dictionaries = tmp_path / "dictionaries"
    dictionaries.mkdir()
    for path in (tiny_data / "bin").glob("dict.*.txt"):
        shutil.copy(path, dictionaries / path.name)
    out = tmp_path / "s.pt"
    err = init_student_error(capsys, [str(dictionaries), "--teacher", str(deep_teacher), "--output", str(out)])
    assert f"cannot set up the teacher's task on {dictionaries}" in err and "language pair" in err, err
    assert "the binarized data directory the student trains on" in err
    assert not out.exists()
