#!/usr/bin/env bash
# Knowledge distillation on Multi30k en->de, CPU only, 20 to 30 minutes on 2 cores: a
# joint sentencepiece model, binarization with one joined dictionary, a small transformer teacher,
# its translations of the training sources (fairseq-kd-distill-data), and two students of one
# smaller size trained for the same number of updates: one on the gold data alone, one with
# fairseq-kd's hybrid_kd (gold NLL + NLL of the teacher's translation + word-level KD on the gold
# prefix), the method that won the full Multi30k study. All three translate test_2016_flickr and
# test_2017_flickr and are scored with sacreBLEU; the students are compared by paired bootstrap, and the table (BLEU,
# share of the teacher's lead closed, parameters, decoding speed in fairseq and as CTranslate2
# int8) is printed.
#
#   bash examples/multi30k-en-de/demo.sh              (or `make demo` from the repository root)
#   WORK=/tmp/demo JOBS=1 THREADS=1 bash examples/multi30k-en-de/demo.sh
#
# It is a small recipe (examples/tools/recipe_lib.sh): rerun it after an interruption and finished
# steps are skipped, an interrupted training resumes from its checkpoint_last.pt. fairseq, the
# plugin, sentencepiece, sacrebleu, ctranslate2 and matplotlib must be importable by python on PATH.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# The demo's scale is SCALE=full's data and evaluation (all 29,000 Multi30k training pairs, both
# whole test sets, beam 5, outputs of any length) with a small teacher and students trained for few
# updates: the sizes below, each of which can be overridden from the environment.
export SCALE=full
: "${WORK:=$REPO/work/demo-en-de}" "${RESULTS:=$WORK}"
: "${JOBS:=2}"                              # two steps at a time (see the threads below)
: "${VOCAB:=4000}" "${MAX_TOKENS:=2048}"    # small batches give more updates a minute
: "${TEACHER_UPDATES:=600}" "${STUDENT_UPDATES:=500}" "${LR:=2e-3}" "${WARMUP:=100}"
: "${SPEED_LINES:=200}" "${SPEED_ROUNDS:=1}" "${LOG_INTERVAL:=50}"   # one speed round: about 90 s here
export WORK RESULTS JOBS VOCAB MAX_TOKENS TEACHER_UPDATES STUDENT_UPDATES LR WARMUP SPEED_LINES SPEED_ROUNDS LOG_INTERVAL
requested_threads=${THREADS:-}
# shellcheck source=../tools/recipe_lib.sh
source "$REPO/examples/tools/recipe_lib.sh"

recipe_begin demo-en-de en de
# Threads: the chain teacher -> its translations of the training sources -> hybrid_kd student sets
# the demo's time. The teacher trains on every core (CORES) and the distillation decodes one batch
# per core at once (CTranslate2 workers). The two students then train side by side on half the cores
# each, and the test translations of the teacher and the gold-only student run on the cores that
# student frees (timings: examples/multi30k-en-de/README.md). THREADS from the environment gives
# every step that many instead.
if [[ -n $requested_threads ]]; then
    chain_threads=$requested_threads side_threads=$requested_threads
else
    chain_threads=$CORES side_threads=$((CORES / 2 > 0 ? CORES / 2 : 1))
fi
transformer_arch teacher_arch 3 3 256 512 4 --dropout 0.1   # teacher: 5.0M parameters with the 4k vocabulary
transformer_arch student_arch 2 2 128 512 4 --dropout 0.1   # students: 1.4M parameters

prepare_multi30k
THREADS=$chain_threads teacher "${teacher_arch[@]}"
# the teacher's translations in CTranslate2 int8 (about twice fairseq's speed on a CPU), each at
# most 1.2 x its source + 10 units: an undertrained teacher loops on some sources until the limit
THREADS=$chain_threads distill kd top1 --engine ctranslate2 --ct2-quantization int8 --batch-size 64 \
    --max-len-a 1.2 --max-len-b 10
THREADS=$side_threads student gold "gold only" gold "$BIN" -- "${student_arch[@]}" --task translation \
    "${LABEL_SMOOTHED[@]}"
# word-level KD on the gold prefix, not along the teacher's translations, of which this short-trained
# teacher loops in some: measured best of the sequence-level variants at this scale (examples/multi30k-en-de/README.md)
THREADS=$side_threads student hybrid_kd "hybrid_kd, T 1, word-KD on gold prefix" gold "$BIN" "$WORK/kd" \
    "$TEACHER_CHECKPOINT" -- "${student_arch[@]}" --task translation_distill --kd-data "$WORK/kd" \
    --teacher-path "$TEACHER_CHECKPOINT" --criterion hybrid_kd --temperature 1 --word-kd-prefix gold --label-smoothing 0.1
THREADS=$side_threads translate teacher "$WORK/teacher"
run_recipe "Multi30k en-de demo: a student with and without hybrid KD"
[[ ${DRY_RUN:-0} == 1 ]] || cat "$RESULTS/$RECIPE.md"
