#!/usr/bin/env bash
# Word-level knowledge distillation on Multi30k en->de, CPU only, sized for about 10 minutes on
# 2 cores: train a joint sentencepiece model, binarize with one joined dictionary, train a small
# transformer teacher, distil a smaller student from it with fairseq-kd, translate
# test_2016_flickr with both and score them with sacreBLEU.
#
#   bash examples/multi30k-en-de/demo.sh              (or `make demo` from the repository root)
#   WORK=/tmp/demo THREADS=1 bash examples/multi30k-en-de/demo.sh
#
# Every step writes its output under a temporary name and renames it when it succeeds; a step whose
# output exists is skipped, so an interrupted run continues where it stopped (an interrupted
# training run resumes from its checkpoint_last.pt). Delete an output to redo its step.
# fairseq-train, fairseq-preprocess, fairseq-generate and python must be on PATH.
set -euo pipefail
trap 'echo "demo.sh: command failed at line $LINENO" >&2' ERR

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
DATA=$REPO/data/multi30k
PLUGIN=$REPO/fairseq_kd

# Settings; each can be overridden from the environment.
WORK=${WORK:-$REPO/work/demo-en-de}
# Torch threads. On an idle 2-core machine 2 threads train about 1.5x faster than 1; on a machine
# whose cores are busy with other work they can be several times slower: use THREADS=1 there.
THREADS=${THREADS:-$(nproc)}
VOCAB=${VOCAB:-4000}                      # joint sentencepiece vocabulary
# Fixed update counts keep the run time predictable (about 2 epochs of 280 updates for the teacher).
TEACHER_UPDATES=${TEACHER_UPDATES:-600}
STUDENT_UPDATES=${STUDENT_UPDATES:-500}
MAX_TOKENS=${MAX_TOKENS:-2048}            # tokens per batch: small batches give more updates a minute
TEST=test_2016_flickr

export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
mkdir -p "$WORK/logs" "$WORK/seconds"
echo "work dir $WORK, $THREADS threads"

# step NAME OUTPUT COMMAND...: run COMMAND unless OUTPUT exists. COMMAND writes to "$OUTPUT.partial"
# (a file or a directory), which becomes OUTPUT on success. The step's wall time and thread count
# are kept in seconds/NAME, its stdout and stderr in logs/NAME.log.
step() {
    local name=$1 output=$2
    shift 2
    if [[ -e $output ]]; then
        echo "[$name] skipped: $output exists"
        return
    fi
    local log=$WORK/logs/$name.log start=$SECONDS
    echo "[$name] running (log: $log)"
    if ! "$@" >>"$log" 2>&1; then
        echo "[$name] FAILED; last lines of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    echo "$((SECONDS - start)) $THREADS" >"$WORK/seconds/$name"
    mv "$output.partial" "$output"
    echo "[$name] done in $((SECONDS - start)) s"
}

tools() { python "$HERE/demo_tools.py" "$@"; }

train_spm() {
    mkdir -p "$WORK/spm.partial"
    tools train-spm --vocab-size "$VOCAB" --model-prefix "$WORK/spm.partial/spm" "$DATA/train.en" "$DATA/train.de"
}

encode() {
    mkdir -p "$WORK/tok.partial"
    tools encode --model "$WORK/spm/spm.model" --out-dir "$WORK/tok.partial" \
        "$DATA"/{train,val,$TEST}.{en,de}
}

binarize() {
    fairseq-preprocess --source-lang en --target-lang de --joined-dictionary --workers "$THREADS" \
        --trainpref "$WORK/tok/train" --validpref "$WORK/tok/val" --testpref "$WORK/tok/$TEST" \
        --destdir "$WORK/bin.partial"
}

# Options shared by teacher and student training. The data directory is the final "bin", whose
# path the checkpoints record (the distillation task finds the teacher's dictionary there).
# --user-dir also lets torch's safe checkpoint loader read fairseq checkpoints on resume.
TRAIN_COMMON=(
    "$WORK/bin" --user-dir "$PLUGIN" --cpu --seed 1
    --share-all-embeddings --encoder-normalize-before --decoder-normalize-before
    --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 1.0
    --lr 2e-3 --lr-scheduler inverse_sqrt --warmup-updates 100
    --max-tokens "$MAX_TOKENS" --required-batch-size-multiple 1
    --no-epoch-checkpoints --log-format simple --log-interval 50
    --data-buffer-size 0  # no prefetch thread: it can abort the process at exit (docs/troubleshooting.md)
)

train_teacher() {
    fairseq-train "${TRAIN_COMMON[@]}" --save-dir "$WORK/teacher.partial" \
        --task translation --arch transformer \
        --encoder-layers 3 --decoder-layers 3 --encoder-embed-dim 256 --decoder-embed-dim 256 \
        --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 \
        --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1 \
        --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
        --max-update "$TEACHER_UPDATES"
}

# The teacher runs in fp32: on CPUs with native bf16 the default (bf16 autocast) currently makes
# this run about 1.4x slower, not faster (measured with fairseq-kd 0.1.0).
train_student() {
    fairseq-train "${TRAIN_COMMON[@]}" --save-dir "$WORK/student.partial" \
        --task translation_distill --teacher-path "$WORK/teacher/checkpoint_best.pt" \
        --teacher-precision fp32 \
        --arch transformer \
        --encoder-layers 2 --decoder-layers 2 --encoder-embed-dim 128 --decoder-embed-dim 128 \
        --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 \
        --encoder-attention-heads 4 --decoder-attention-heads 4 --dropout 0.1 \
        --criterion word_kd --alpha 0.5 --temperature 1 \
        --max-update "$STUDENT_UPDATES"
}

# translate MODEL: beam search over the binarized test set; every input sentence must come back
# (fairseq drops a final partial batch unless --required-batch-size-multiple is 1), and the
# hypotheses are put back in input order and decoded to plain text.
translate() {
    local model=$1
    fairseq-generate "$WORK/bin" --user-dir "$PLUGIN" --cpu --gen-subset test \
        --path "$WORK/$model/checkpoint_best.pt" --beam 5 --batch-size 128 \
        --required-batch-size-multiple 1 >"$WORK/$model/generate-$TEST.txt"
    tools hypotheses --model "$WORK/spm/spm.model" --expected "$(wc -l <"$DATA/$TEST.en")" \
        "$WORK/$model/generate-$TEST.txt" "$WORK/$model/$TEST.de.partial"
}

step spm "$WORK/spm" train_spm
step encode "$WORK/tok" encode
step binarize "$WORK/bin" binarize
step train-teacher "$WORK/teacher" train_teacher
step train-student "$WORK/student" train_student
step translate-teacher "$WORK/teacher/$TEST.de" translate teacher
step translate-student "$WORK/student/$TEST.de" translate student

# Summary: detokenized BLEU against the raw reference, model sizes and the wall time of each step
# (in the run that finished it: a resumed training step counts only its last part).
params() { tools params --user-dir "$PLUGIN" "$WORK/$1/checkpoint_best.pt" 2>>"$WORK/logs/summary.log"; }
teacher_score=$(tools bleu "$DATA/$TEST.de" "$WORK/teacher/$TEST.de")   # "BLEU<TAB>signature"
student_score=$(tools bleu "$DATA/$TEST.de" "$WORK/student/$TEST.de")
teacher_bleu=${teacher_score%%$'\t'*}
student_bleu=${student_score%%$'\t'*}
signature=${teacher_score#*$'\t'}
teacher_params=$(params teacher)
student_params=$(params student)
{
    echo "Multi30k en->de, $TEST ($(wc -l <"$DATA/$TEST.de") sentences), beam 5, detokenized sacreBLEU"
    echo "signature: $signature"
    printf '%-8s %6s %12s\n' model BLEU parameters
    printf '%-8s %6s %12s\n' teacher "$teacher_bleu" "$teacher_params" student "$student_bleu" "$student_params"
    echo "compression: $(awk -v t="$teacher_params" -v s="$student_params" 'BEGIN { printf "%.2f", t / s }')x fewer parameters"
    echo "wall time per step:"
    total=0
    for name in spm encode binarize train-teacher train-student translate-teacher translate-student; do
        read -r seconds threads <"$WORK/seconds/$name"
        total=$((total + seconds))
        printf '  %-18s %5d s  (%d threads)\n' "$name" "$seconds" "$threads"
    done
    printf '  %-18s %5d s\n' total "$total"
} | tee "$WORK/summary.txt"
echo "summary written to $WORK/summary.txt"
