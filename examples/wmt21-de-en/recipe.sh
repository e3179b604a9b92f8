#!/usr/bin/env bash
# WMT21 German->English in the setting of NVIDIA's NeMo NMT-distillation guide (WMT21 de->en, a 24+6 teacher; the
# widths and the temperature grid are this project's choice, see docs/recipes.md): a 24+6-layer teacher
# (d=1024, ffn 4096, 16 heads) and students of 1+1 and 3+3 layers, slim (d=256, ffn 1024, 4 heads)
# and wide (the teacher's widths), each trained on gold data alone and with hybrid_kd; and a
# temperature grid T in {0.5, 1, 2, 5, 10} of word-level KD for the slim 3+3 student.
#
#   bash examples/wmt21-de-en/recipe.sh               SCALE=tiny: a slice of Multi30k de-en, tiny models
#   WMT21_DE_EN_DIR=/data/wmt21 SCALE=full TRAIN_FLAGS="--fp16" bash examples/wmt21-de-en/recipe.sh
#
# Full scale reads data you already have; nothing is downloaded. WMT21_DE_EN_DIR must hold
# train.de/train.en (the cleaned parallel training data), valid.de/valid.en (e.g. newstest2019) and,
# for each name in WMT21_TEST_SETS (default "newstest2021"), NAME.de/NAME.en, plain text, one
# sentence per line, the references as released. This is a multi-GPU job (see docs/recipes.md).
# Rerun the same command to resume; settings are described in examples/tools/recipe_lib.sh.
set -euo pipefail
# shellcheck source=../tools/recipe_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tools/recipe_lib.sh"

if [[ ${SCALE:-tiny} == full ]]; then
    # a joint 32k vocabulary; big batches and long schedules (the updates are a starting point)
    VOCAB=${VOCAB:-32000} MAX_TOKENS=${MAX_TOKENS:-8192} LR=${LR:-7e-4} WARMUP=${WARMUP:-4000}
    TEACHER_UPDATES=${TEACHER_UPDATES:-200000} STUDENT_UPDATES=${STUDENT_UPDATES:-100000}
    LOG_INTERVAL=${LOG_INTERVAL:-500}
fi
recipe_begin wmt21-de-en de en

# widths: d_model ffn heads
if [[ $SCALE == tiny ]]; then
    prepare_multi30k
    teacher_layers=(4 2) slim=(16 32 2) wide=(32 64 2)
else
    prepare_local WMT21_DE_EN_DIR "${WMT21_TEST_SETS:-newstest2021}"
    teacher_layers=(24 6) slim=(256 1024 4) wide=(1024 4096 16)
fi

# pre-norm: deep stacks train stably only with the layer norm before each block
prenorm=(--encoder-normalize-before --decoder-normalize-before --dropout 0.1)
transformer_arch teacher_arch "${teacher_layers[@]}" "${wide[@]}" "${prenorm[@]}"
teacher "${teacher_arch[@]}"
translate teacher "$WORK/teacher"
distill kd top1

# each size's students are tested against its gold-only student
for size in slim1x1 slim3x3 wide1x1 wide3x3; do
    layers=${size: -1}
    if [[ $size == slim* ]]; then widths=("${slim[@]}"); else widths=("${wide[@]}"); fi
    transformer_arch student_arch "$layers" "$layers" "${widths[@]}" "${prenorm[@]}"
    student "${size}_gold" "$size, gold only" "${size}_gold" "$BIN" -- "${student_arch[@]}" --task translation \
        "${LABEL_SMOOTHED[@]}"
    student "${size}_hybrid" "$size, hybrid_kd T 1" "${size}_gold" "$BIN" "$WORK/kd" "$TEACHER_CHECKPOINT" -- \
        "${student_arch[@]}" --task translation_distill --kd-data "$WORK/kd" --teacher-path "$TEACHER_CHECKPOINT" \
        --criterion hybrid_kd --temperature 1 --label-smoothing 0.1
    if [[ $size == slim3x3 ]]; then
        for temperature in 0.5 1 2 5 10; do
            student "${size}_word_T$temperature" "$size, word_kd T $temperature" "${size}_gold" "$BIN" \
                "$TEACHER_CHECKPOINT" -- "${student_arch[@]}" --task translation_distill \
                --teacher-path "$TEACHER_CHECKPOINT" --criterion word_kd --alpha 0.5 --temperature "$temperature"
        done
    fi
done

run_recipe "WMT21 de-en: slim and wide students of a 24+6 teacher, hybrid KD and a temperature grid"
