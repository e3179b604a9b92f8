#!/usr/bin/env bash
# TED talks German->English, Gordon & Duh (2019), "Explaining Sequence-Level Knowledge Distillation
# as Data-Augmentation for Neural Machine Translation": one student trained on
#   base     the gold pairs
#   kd       the teacher's best translation of each source (sequence-level KD)
#   base_kd  gold pairs and teacher pairs together (base+kd)
#   best2    the teacher's two best translations of each source, each as a pair
#
#   bash examples/ted-de-en/recipe.sh                 SCALE=tiny: a slice of Multi30k de-en, tiny models
#   TED_DE_EN_DIR=/data/ted-de-en SCALE=full bash examples/ted-de-en/recipe.sh
#
# Full scale reads data you already have; nothing is downloaded. TED_DE_EN_DIR must hold
# train.de/train.en, valid.de/valid.en and, for each name in TED_TEST_SETS (default "test"),
# NAME.de/NAME.en: plain, untokenized text, one sentence per line, the references as released.
# Rerun the same command to resume; settings are described in examples/tools/recipe_lib.sh.
set -euo pipefail
# shellcheck source=../tools/recipe_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tools/recipe_lib.sh"

if [[ ${SCALE:-tiny} == full ]]; then
    # about 150k-200k training pairs: a 16k joint vocabulary
    VOCAB=${VOCAB:-16000} LR=${LR:-5e-4} WARMUP=${WARMUP:-4000}
    TEACHER_UPDATES=${TEACHER_UPDATES:-50000} STUDENT_UPDATES=${STUDENT_UPDATES:-50000}
fi
recipe_begin ted-de-en de en

# layers: encoder decoder; widths: d_model ffn heads
if [[ $SCALE == tiny ]]; then
    prepare_multi30k
    teacher_size=(2 2 32 64 2) student_size=(1 1 16 32 2)
else
    prepare_local TED_DE_EN_DIR "${TED_TEST_SETS:-test}"
    # teacher: fairseq's transformer_iwslt_de_en sizes; student: half the width, half the depth
    teacher_size=(6 6 512 1024 4) student_size=(3 3 256 1024 4)
fi

transformer_arch teacher_arch "${teacher_size[@]}" --dropout 0.3
teacher "${teacher_arch[@]}"
translate teacher "$WORK/teacher"
distill kd top1
distill kd2 nbest-2

# every student: its architecture, gold-data objective; tested against base (gold only)
transformer_arch student_arch "${student_size[@]}" --dropout 0.3
gold=("${student_arch[@]}" --task translation "${LABEL_SMOOTHED[@]}")
student base "base: gold only" base "$BIN" -- "${gold[@]}"
student kd "kd: teacher's best translation" base "$WORK/kd" -- "${gold[@]}"
student base_kd "base+kd" base "$BIN" "$WORK/kd" -- "${student_arch[@]}" --task translation_distill \
    --kd-data "$WORK/kd" --kd-data-mode concat "${LABEL_SMOOTHED[@]}"
student best2 "best-2: teacher's two best translations" base "$WORK/kd2" -- "${gold[@]}"

run_recipe "TED de-en: sequence-level KD as data augmentation (Gordon & Duh 2019)"
