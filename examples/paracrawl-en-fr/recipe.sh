#!/usr/bin/env bash
# English->French on ParaCrawl-style web-crawled data, in the order QuillBot Research describes for
# compressing generation models: train the student on the teacher's translations (sequence-level
# KD) first, then fine-tune it on the gold pairs. Compared with gold only, sequence-level KD only,
# and the reverse order (gold first, then the teacher's translations).
#
#   bash examples/paracrawl-en-fr/recipe.sh          SCALE=tiny: a slice of Multi30k en-fr, tiny models
#   PARACRAWL_EN_FR_DIR=/data/paracrawl-en-fr SCALE=full TRAIN_FLAGS="--fp16" bash examples/paracrawl-en-fr/recipe.sh
#
# Full scale reads data you already have; nothing is downloaded. PARACRAWL_EN_FR_DIR must hold
# train.en/train.fr (the parallel training data, cleaned: crawled pairs are noisy), valid.en/valid.fr
# and, for each name in PARACRAWL_TEST_SETS (default "newstest2014"), NAME.en/NAME.fr, plain text,
# one sentence per line, the references as released. A GPU job (see docs/recipes.md).
# Rerun the same command to resume; settings are described in examples/tools/recipe_lib.sh.
set -euo pipefail
# shellcheck source=../tools/recipe_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tools/recipe_lib.sh"

if [[ ${SCALE:-tiny} == full ]]; then
    VOCAB=${VOCAB:-32000} MAX_TOKENS=${MAX_TOKENS:-8192} LR=${LR:-7e-4} WARMUP=${WARMUP:-4000}
    TEACHER_UPDATES=${TEACHER_UPDATES:-150000} STUDENT_UPDATES=${STUDENT_UPDATES:-100000}
    FINETUNE_UPDATES=${FINETUNE_UPDATES:-10000} LOG_INTERVAL=${LOG_INTERVAL:-500}
fi
recipe_begin paracrawl-en-fr en fr

# layers: encoder decoder; widths: d_model ffn heads
if [[ $SCALE == tiny ]]; then
    prepare_multi30k
    teacher_size=(2 2 32 64 2) student_size=(2 1 16 32 2)
else
    prepare_local PARACRAWL_EN_FR_DIR "${PARACRAWL_TEST_SETS:-newstest2014}"
    # teacher: transformer big; student: base widths with a 2-layer decoder (decoding time is
    # spent mostly in the decoder)
    teacher_size=(6 6 1024 4096 16) student_size=(6 2 512 2048 8)
fi

transformer_arch teacher_arch "${teacher_size[@]}" --dropout 0.1
teacher "${teacher_arch[@]}"
translate teacher "$WORK/teacher"
distill kd top1

# every student: its architecture, gold-data objective; tested against the gold-only baseline
transformer_arch student_arch "${student_size[@]}" --dropout 0.1
gold=("${student_arch[@]}" --task translation "${LABEL_SMOOTHED[@]}")
student baseline "gold only" baseline "$BIN" -- "${gold[@]}"
student seq_kd "seq-KD: teacher targets only" baseline "$WORK/kd" -- "${gold[@]}"
finetune seq_kd_then_gold "seq-KD, then gold (QuillBot order)" baseline seq_kd "$BIN" -- "${gold[@]}"
finetune gold_then_seq_kd "gold, then seq-KD (reverse order)" baseline baseline "$WORK/kd" -- "${gold[@]}"

run_recipe "ParaCrawl-style en-fr: sequence-level KD, then fine-tuning on gold"
