# shellcheck shell=bash
# recipe_lib.sh: the part every recipe under examples/ shares. Sourced by a recipe, not run.
#
# A recipe calls recipe_begin, names its model sizes (transformer_arch), then calls the blocks
# below (prepare_data, teacher, distill, init_student, student, finetune) and finally run_recipe.
# Every block takes what it uses as arguments, apart from the settings below and the paths of the
# work directory that recipe_begin names (BIN, SPM, TEACHER_CHECKPOINT). The blocks run nothing
# themselves: each appends steps to the plan (WORK/plan.tsv once it runs), a step being a name, the
# output it makes, the outputs of earlier steps it needs, its threads and the command. run_recipe adds the speed
# measurement and the report and hands the plan to run_plan.py, which runs every step whose output
# does not exist yet (commands write OUTPUT.partial, renamed on success), so a recipe resumes where
# it stopped; delete an output to redo its step (and the steps that used it). WORK/plan.tsv and
# `DRY_RUN=1` show every command.
#
# Settings, from the environment (a recipe may set its own defaults before recipe_begin):
#   SCALE      tiny (default): a slice of Multi30k and tiny models, a few minutes in all, to check
#              the commands; full: the benchmark (hours to days, see docs/recipes.md)
#   WORK       work directory (default work/recipes/NAME-SCALE)
#   THREADS    threads of each step (torch, OpenMP, fairseq-preprocess --workers, CTranslate2;
#              default: 1 at tiny scale, where tiny models gain nothing from more, else nproc /
#              JOBS, nproc answering OMP_NUM_THREADS if set; on a machine shared with other jobs use
#              fewer: OpenMP threads that wait for a busy core slow training down many times over).
#              A recipe may give one block other threads: `THREADS=2 teacher ...`
#   JOBS       steps run at once (default 1): independent steps (the students, their translations)
#              side by side; e.g. JOBS=2 THREADS=1 on 2 cores
#   CORES      cores the steps share (default: all): a step starts only when its threads fit in
#              the cores the running steps leave free
#   SEEDS      student seeds (default "1"; e.g. "1 2 3" reports mean and standard deviation)
#   FINETUNE_LR  learning rate of the fine-tuning steps (finetune), held constant (fairseq's fixed
#              scheduler, no warm-up); default (empty): LR's warm-up schedule from the start, as
#              in the first training
#   SPEED_BATCH, SPEED_THREADS  the speed step's larger batch (default 64) and threads (default 1)
#   SPEED_ROUNDS  times every model's speed is measured, the models in turn; the median is reported
#              (default 3; 2 at tiny scale)
#   RESULTS    directory of the results table and plot, NAME.md and NAME.png (default: docs/results
#              at full scale, WORK at tiny scale); NAME is the recipe's, NAME-given-teacher with TEACHER
#   TRAIN_FLAGS  extra fairseq-train flags for every model, e.g. "--fp16 --update-freq 4" on GPUs
#   DRY_RUN    1: print the commands and whether each is done, run nothing (WORK's plan.tsv and
#              models.tsv, maybe a running plan's, are left as they are)
#   PYTHON     the interpreter that has fairseq and the plugin (default: python)
#   TEACHER    reuse a teacher trained before (a fairseq checkpoint) instead of training one: the
#              data are encoded with its sentencepiece model (TEACHER_SPM, default: the one *.model
#              file beside the checkpoint) and binarized with its dictionary (TEACHER_DICT, default:
#              dict.txt beside it, one dictionary for both languages); a WORK made with another
#              teacher is refused; the results are written under a name of their own (RESULTS), never
#              over those of the recipe's own teacher

TOOLS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$TOOLS/../.." && pwd)
PLUGIN=$REPO/fairseq_kd
MULTI30K=$REPO/data/multi30k

die() {
    echo "error: $*" >&2
    exit 1
}

# recipe_begin NAME SRC TGT: settings, an empty plan and model list.
recipe_begin() {
    RECIPE=$1 SRC=$2 TGT=$3
    RESULTS_NAME=$RECIPE${TEACHER:+-given-teacher}
    SCALE=${SCALE:-tiny}
    [[ $SCALE == tiny || $SCALE == full ]] || die "SCALE must be tiny or full, not '$SCALE'"
    WORK=${WORK:-$REPO/work/recipes/$RECIPE-$SCALE}
    SEEDS=${SEEDS:-1}
    JOBS=${JOBS:-1}
    [[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "JOBS must be a positive number of steps, not '$JOBS'"
    # every core this process may use (nproc alone would answer OMP_NUM_THREADS)
    CORES=${CORES:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}
    [[ $CORES =~ ^[1-9][0-9]*$ ]] || die "CORES must be a positive number of cores, not '$CORES'"
    PYTHON=${PYTHON:-python}
    if [[ $SCALE == tiny ]]; then
        # A slice of the data, models of a few thousand parameters, tens of updates: checks that
        # every command runs and that the outputs are counted and scored, not the methods' worth.
        # Barely trained models repeat tokens until the length limit: generation is capped.
        RESULTS=${RESULTS:-$WORK} THREADS=${THREADS:-1}
        TRAIN_LINES=${TRAIN_LINES:-300} EVAL_LINES=${EVAL_LINES:-30} SPEED_LINES=${SPEED_LINES:-10}
        SPEED_ROUNDS=${SPEED_ROUNDS:-2}
        VOCAB=${VOCAB:-1000} SPM_SENTENCES=${SPM_SENTENCES:-0}
        MAX_TOKENS=${MAX_TOKENS:-1024} LR=${LR:-5e-3} WARMUP=${WARMUP:-5} LOG_INTERVAL=${LOG_INTERVAL:-5}
        TEACHER_UPDATES=${TEACHER_UPDATES:-30} STUDENT_UPDATES=${STUDENT_UPDATES:-12}
        FINETUNE_UPDATES=${FINETUNE_UPDATES:-4}
        BEAM=${BEAM:-2} LARGE_BATCH=${LARGE_BATCH:-64}
        GEN_LIMITS=(--max-len-a 0 --max-len-b 20)
    else
        RESULTS=${RESULTS:-$REPO/docs/results} THREADS=${THREADS:-$(($(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1))}
        TRAIN_LINES=${TRAIN_LINES:-} EVAL_LINES=${EVAL_LINES:-} SPEED_LINES=${SPEED_LINES:-500}
        SPEED_ROUNDS=${SPEED_ROUNDS:-3}
        VOCAB=${VOCAB:-8000} SPM_SENTENCES=${SPM_SENTENCES:-5000000}
        MAX_TOKENS=${MAX_TOKENS:-4096} LR=${LR:-1e-3} WARMUP=${WARMUP:-600} LOG_INTERVAL=${LOG_INTERVAL:-100}
        TEACHER_UPDATES=${TEACHER_UPDATES:-2000} STUDENT_UPDATES=${STUDENT_UPDATES:-2000}
        FINETUNE_UPDATES=${FINETUNE_UPDATES:-400}
        BEAM=${BEAM:-5} LARGE_BATCH=${LARGE_BATCH:-128}
        GEN_LIMITS=()
    fi
    # decoding speed: batch 1 and SPEED_BATCH sentences, on SPEED_THREADS threads in both engines
    SPEED_BATCH=${SPEED_BATCH:-64} SPEED_THREADS=${SPEED_THREADS:-1}
    export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
    mkdir -p "$WORK"
    _imported_teacher
    PLAN=$WORK/plan.tsv
    MODELS=$WORK/models.tsv
    # The blocks write the plan and the model list into drafts that run_recipe moves into WORK only
    # when the plan runs: a dry run leaves those of a run in progress in the same WORK alone.
    _DRAFTS=$(mktemp -d)
    trap 'rm -rf "$_DRAFTS"' EXIT
    : >"$_DRAFTS/plan.tsv"
    printf 'name\tgroup\tlabel\trole\tseed\tdir\tbaseline\n' >"$_DRAFTS/models.tsv"
    # what the steps make: the binarized data, the sentencepiece model, the teacher
    BIN=$WORK/bin
    SPM=$WORK/spm/spm.model
    TEACHER_CHECKPOINT=$WORK/teacher/checkpoint_best.pt
    # TRAIN_FLAGS is split into words on purpose: it holds several flags.
    # shellcheck disable=SC2206
    TRAIN_COMMON=(
        --user-dir "$PLUGIN" --share-all-embeddings
        --optimizer adam --adam-betas '(0.9,0.98)' --clip-norm 1.0
        --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP"
        --max-tokens "$MAX_TOKENS" --required-batch-size-multiple 1
        --best-checkpoint-metric nll_loss --no-epoch-checkpoints --num-workers 0
        --data-buffer-size 0  # no prefetch thread: it can abort the process at exit (docs/troubleshooting.md)
        --log-format simple --log-interval "$LOG_INTERVAL" ${TRAIN_FLAGS:-}
    )
    # the gold-data objective of every non-distilled model
    LABEL_SMOOTHED=(--criterion label_smoothed_cross_entropy --label-smoothing 0.1)
}

# _imported_teacher: IMPORTED_TEACHER (the checkpoint named by TEACHER, or empty), TEACHER_SPM and
# TEACHER_DICT; refuses a WORK that was made with another teacher (examples/tools/import_teacher.py).
_imported_teacher() {
    IMPORTED_TEACHER=${TEACHER:-}
    TEACHER_FILES=()
    if [[ -n $IMPORTED_TEACHER ]]; then
        [[ -f $IMPORTED_TEACHER ]] || die "TEACHER=$IMPORTED_TEACHER: no such checkpoint"
        local dir models
        dir=$(dirname "$IMPORTED_TEACHER")
        if [[ -z ${TEACHER_SPM:-} ]]; then
            models=("$dir"/*.model)
            [[ ${#models[@]} == 1 && -f ${models[0]} ]] ||
                die "TEACHER=$IMPORTED_TEACHER: set TEACHER_SPM to its sentencepiece model (not one *.model in $dir)"
            TEACHER_SPM=${models[0]}
        fi
        TEACHER_DICT=${TEACHER_DICT:-$dir/dict.txt}
        TEACHER_FILES=(--teacher "$IMPORTED_TEACHER" --spm "$TEACHER_SPM" --dict "$TEACHER_DICT")
    fi
    "$PYTHON" "$TOOLS/import_teacher.py" check "${TEACHER_FILES[@]}" --work "$WORK" || exit 1
}

# transformer_arch VAR ENCODER_LAYERS DECODER_LAYERS D_MODEL FFN HEADS [FLAGS...]: sets the array
# VAR to the fairseq-train flags of that transformer, FLAGS (e.g. --dropout 0.3) appended.
transformer_arch() {
    local -n __arch=$1
    # shellcheck disable=SC2034  # the caller's array
    __arch=(--arch transformer --encoder-layers "$2" --decoder-layers "$3" --encoder-embed-dim "$4"
        --decoder-embed-dim "$4" --encoder-ffn-embed-dim "$5" --decoder-ffn-embed-dim "$5"
        --encoder-attention-heads "$6" --decoder-attention-heads "$6" "${@:7}")
}

# step NAME OUTPUT [NEEDS...] -- COMMAND...: add a step whose COMMAND writes OUTPUT.partial, with
# THREADS threads. NEEDS are the outputs of earlier steps that COMMAND reads (or paths inside them):
# the step runs after the steps that make them (with JOBS > 1, independent steps run side by side).
# step_stdout NAME OUTPUT [NEEDS...] -- COMMAND...: the same, COMMAND's standard output being
# OUTPUT.partial.
# step_after_all NAME OUTPUT COMMAND...: a step that runs after every earlier step (it reads their
# outputs through a file, e.g. the model list).
step() { _add_step 0 "$@"; }
step_stdout() { _add_step 1 "$@"; }
step_after_all() { _add_step 0 "$1" "$2" '*' -- "${@:3}"; }
_add_step() {
    local stdout=$1 name=$2 output=$3 count
    shift 3
    count=$(_count_needs "$@")
    local needs=("${@:1:count}")
    shift $((count + 1))
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$output" "$stdout" "$THREADS" "${needs[*]@Q}" "$(printf '%q ' "$@")" >>"$_DRAFTS/plan.tsv"
}

# _count_needs WORDS...: how many WORDS come before the -- that ends a list of needs.
_count_needs() {
    local count=0
    while (($# > 0)) && [[ $1 != -- ]]; do
        count=$((count + 1))
        shift
    done
    (($# > 0)) || die "a list of needs must end with --"
    echo "$count"
}

# prepare_data TRAIN_PREFIX VALID_PREFIX NAME=TEST_PREFIX...: the corpus (at tiny scale its first
# lines), a joint sentencepiece model, the encoded splits, and one binarized directory BIN with a
# joined dictionary. fairseq names the binarized test sets test, test1, ... in the order given; the
# speed split (the first SPEED_LINES sentences of the first test set) comes last.
prepare_data() {
    local train=$1 valid=$2
    shift 2
    TEST_NAMES=()
    local tests=() limits=() testprefs=()
    for test in "$@"; do
        TEST_NAMES+=("${test%%=*}")
        tests+=(--test "$test")
        testprefs+=("$WORK/tok/${test%%=*}")
    done
    testprefs+=("$WORK/tok/speed")
    SPEED_SUBSET=test${#TEST_NAMES[@]}
    [[ -n $TRAIN_LINES ]] && limits+=(--train-lines "$TRAIN_LINES")
    [[ -n $EVAL_LINES ]] && limits+=(--eval-lines "$EVAL_LINES")
    local splits
    splits=$(IFS=,; echo "train,valid,${TEST_NAMES[*]},speed")

    step data "$WORK/raw" -- "$TOOLS/text.py" prepare --src "$SRC" --tgt "$TGT" --out "$WORK/raw.partial" \
        --train "$train" --valid "$valid" "${tests[@]}" "${limits[@]}" --speed-lines "$SPEED_LINES"
    local dictionary=()
    if [[ -n $IMPORTED_TEACHER ]]; then
        step spm "$WORK/spm" -- "$TOOLS/import_teacher.py" spm "${TEACHER_FILES[@]}" --out "$WORK/spm.partial"
        dictionary=(--srcdict "$TEACHER_DICT")
    else
        step spm "$WORK/spm" "$WORK/raw" -- "$TOOLS/text.py" spm-train --vocab-size "$VOCAB" --input-sentences "$SPM_SENTENCES" \
            --model-prefix "$WORK/spm.partial/spm" "$WORK/raw/train.$SRC" "$WORK/raw/train.$TGT"
    fi
    step encode "$WORK/tok" "$SPM" "$WORK/raw" -- "$TOOLS/text.py" encode --model "$SPM" --src "$SRC" --tgt "$TGT" \
        --raw-dir "$WORK/raw" --out-dir "$WORK/tok.partial" --splits "$splits"
    step binarize "$BIN" "$WORK/tok" -- fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --joined-dictionary \
        "${dictionary[@]}" --workers "$THREADS" --trainpref "$WORK/tok/train" --validpref "$WORK/tok/valid" \
        --testpref "$(IFS=,; echo "${testprefs[*]}")" --destdir "$BIN.partial"
}

# prepare_multi30k: prepare_data on the shipped Multi30k (SRC-TGT) with both its test sets. The
# recipes for local data use it at tiny scale.
prepare_multi30k() {
    prepare_data "$MULTI30K/train" "$MULTI30K/val" \
        "test_2016_flickr=$MULTI30K/test_2016_flickr" "test_2017_flickr=$MULTI30K/test_2017_flickr"
}

# prepare_local VAR "TEST...": prepare_data on a corpus of your own (never downloaded), in the
# directory named by the environment variable VAR: train.SRC/TGT, valid.SRC/TGT and TEST.SRC/TGT for
# each TEST, plain text. Fails at once, before any step runs, when a file is missing.
prepare_local() {
    local var=$1 dir=${!1:-} name file missing=() tests=()
    # shellcheck disable=SC2206  # the test set names are split into words on purpose
    local names=(train valid $2)
    [[ -n $dir ]] || die "set $var to a directory holding ${names[*]}, each as NAME.$SRC and NAME.$TGT" \
        "(SCALE=tiny needs none: it uses the shipped Multi30k)"
    for name in "${names[@]}"; do
        for file in "$dir/$name.$SRC" "$dir/$name.$TGT"; do
            [[ -f $file ]] || missing+=("$file")
        done
        [[ $name == train || $name == valid ]] || tests+=("$name=$dir/$name")
    done
    ((${#missing[@]} == 0)) || die "$var=$dir lacks: ${missing[*]}"
    prepare_data "$dir/train" "$dir/valid" "${tests[@]}"
}

# add_model NAME GROUP LABEL ROLE SEED DIR BASELINE: a model for the report; GROUP gathers a method's
# seeds, BASELINE is the group it is tested against (none for the teacher).
add_model() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$_DRAFTS/models.tsv"
}

# translate NAME DIR: translate every test set with DIR/checkpoint_best.pt (fairseq-generate, all of
# a test set's sentences must come back) into DIR/TEST.hyp, detokenized.
translate() {
    local name=$1 dir=$2 i subset test
    for i in "${!TEST_NAMES[@]}"; do
        test=${TEST_NAMES[$i]}
        subset="test"
        ((i > 0)) && subset=test$i
        step_stdout "generate-$name-$test" "$dir/$test.generate" "$BIN" "$dir/checkpoint_best.pt" -- \
            fairseq-generate "$BIN" --user-dir "$PLUGIN" \
            --path "$dir/checkpoint_best.pt" --gen-subset "$subset" --beam "$BEAM" --batch-size "$LARGE_BATCH" \
            --required-batch-size-multiple 1 --num-workers 0 "${GEN_LIMITS[@]}"
        step "hypotheses-$name-$test" "$dir/$test.hyp" "$SPM" "$WORK/raw" "$dir/$test.generate" -- \
            "$TOOLS/text.py" hypotheses --model "$SPM" \
            --reference "$WORK/raw/$test.$TGT" --generate "$dir/$test.generate" --out "$dir/$test.hyp.partial"
    done
}

# teacher FLAGS...: train the teacher on the gold data (FLAGS: its architecture and training flags),
# or import the one named by TEACHER (FLAGS unused), into TEACHER_CHECKPOINT. `translate teacher
# "$WORK/teacher"` then scores it, where the recipe wants that step in its plan.
teacher() {
    if [[ -n $IMPORTED_TEACHER ]]; then
        step import-teacher "$WORK/teacher" -- "$TOOLS/import_teacher.py" checkpoint "${TEACHER_FILES[@]}" \
            --out "$WORK/teacher.partial"
    else
        step train-teacher "$WORK/teacher" "$BIN" -- fairseq-train "$BIN" "${TRAIN_COMMON[@]}" --task translation \
            "${LABEL_SMOOTHED[@]}" "$@" --seed 1 --max-update "$TEACHER_UPDATES" --save-dir "$WORK/teacher.partial"
    fi
    add_model teacher teacher teacher teacher 1 "$WORK/teacher" -
}

# distill NAME SELECT [FLAGS...]: the teacher's beam-search translations of the training sources
# (fairseq-kd-distill-data --select SELECT FLAGS, e.g. --engine ctranslate2), binarized in WORK/NAME
# with the gold validation set.
distill() {
    step "distill-$1" "$WORK/$1" "$BIN" "$TEACHER_CHECKPOINT" -- \
        fairseq-kd-distill-data "$BIN" --teacher-path "$TEACHER_CHECKPOINT" --split train \
        --destdir "$WORK/$1.partial" --beam "$BEAM" --select "$2" "${GEN_LIMITS[@]}" "${@:3}"
}

# init_student NAME FLAGS...: WORK/NAME.pt, a student with the teacher's widths whose layers are
# copied from the teacher's (fairseq-kd-init-student FLAGS, e.g. --encoder-layers 1 --strategy spread).
init_student() {
    local name=$1
    shift
    step "init-$name" "$WORK/$name.pt" "$BIN" "$TEACHER_CHECKPOINT" -- \
        fairseq-kd-init-student "$BIN" --teacher "$TEACHER_CHECKPOINT" --output "$WORK/$name.pt.partial" "$@"
}

# student NAME LABEL BASELINE DATA [NEEDS...] -- FLAGS...: for each seed, train a student on DATA
# (BIN or a distill output) for STUDENT_UPDATES, fairseq-train's FLAGS giving its architecture
# (transformer_arch) and choosing task and criterion; translate. NEEDS are the other outputs of
# earlier steps that FLAGS name (TEACHER_CHECKPOINT, WORK/kd, an init_student checkpoint). The
# report tests the student against the student group named BASELINE.
student() {
    _students "$STUDENT_UPDATES" "$@"
}

# finetune NAME LABEL BASELINE FROM DATA [NEEDS...] -- FLAGS...: continue each seed's student FROM on
# DATA for FINETUNE_UPDATES (a fresh optimizer and schedule, fairseq-train --finetune-from-model;
# at the constant FINETUNE_LR where set).
finetune() {
    local name=$1 label=$2 baseline=$3 from=$4 data=$5 schedule=()
    shift 5
    [[ -z ${FINETUNE_LR:-} ]] || schedule=(--lr "$FINETUNE_LR" --lr-scheduler fixed --warmup-updates 0)
    _students "$FINETUNE_UPDATES" "$name" "$label" "$baseline" "$data" "$WORK/students/$from-s@SEED@" "$@" \
        "${schedule[@]}" --finetune-from-model "$WORK/students/$from-s@SEED@/checkpoint_best.pt"
}

# _students UPDATES NAME LABEL BASELINE DATA [NEEDS...] -- FLAGS...: NEEDS and FLAGS may say @SEED@,
# replaced by each seed.
_students() {
    local updates=$1 name=$2 label=$3 baseline=$4 data=$5 count seed dir
    shift 5
    count=$(_count_needs "$@")
    local needs=("${@:1:count}")
    shift $((count + 1))
    for seed in $SEEDS; do
        dir=$WORK/students/$name-s$seed
        step "train-$name-s$seed" "$dir" "$data" "${needs[@]//@SEED@/$seed}" -- fairseq-train "$data" \
            "${TRAIN_COMMON[@]}" "${@//@SEED@/$seed}" --seed "$seed" --max-update "$updates" --save-dir "$dir.partial"
        add_model "$name-s$seed" "$name" "$label" student "$seed" "$dir" "$baseline"
        translate "$name-s$seed" "$dir"
    done
}

# recipe_settings: the settings that decide the recipe's numbers, as NAME=VALUE words that rerun it
# when set in the environment (the report quotes them)
RECIPE_SETTINGS=(SCALE STUDY COMPRESSION_SIZES TEACHER TEACHER_SPM TEACHER_DICT TRAIN_LINES EVAL_LINES VOCAB
    MAX_TOKENS LR WARMUP TEACHER_UPDATES STUDENT_UPDATES FINETUNE_UPDATES FINETUNE_LR BEAM SEEDS TRAIN_FLAGS SPEED_LINES SPEED_ROUNDS)
recipe_settings() {
    local name value words=()
    for name in "${RECIPE_SETTINGS[@]}"; do
        value=${!name:-}
        # an imported teacher was not trained here
        [[ -z $value || ($name == TEACHER_UPDATES && -n $IMPORTED_TEACHER) ]] && continue
        [[ $value =~ ^[A-Za-z0-9._/:=+-]+$ ]] || value=${value@Q}
        words+=("$name=$value")
    done
    echo "${words[*]}"
}

# _work_settings: the settings every step of a WORK is made with, as NAME=VALUE lines: those of
# recipe_settings less the ones that only add models (STUDY, COMPRESSION_SIZES, SEEDS) or only
# measure again (SPEED_ROUNDS), and less the teacher's files, which import_teacher.py checks by
# their sha256.
_work_settings() {
    local name
    for name in "${RECIPE_SETTINGS[@]}"; do
        [[ " STUDY COMPRESSION_SIZES SEEDS SPEED_ROUNDS TEACHER TEACHER_SPM TEACHER_DICT " == *" $name "* ||
            ($name == TEACHER_UPDATES && -n $IMPORTED_TEACHER) ]] && continue
        echo "$name=${!name:-}"
    done
}

# _check_work_settings: WORK/settings.txt holds the settings of the first run in WORK (of the first
# run after it was added, for an older WORK). A run with other settings is refused before anything
# runs: it would keep the finished steps and resume the interrupted ones made with the old ones.
_check_work_settings() {
    local record=$WORK/settings.txt now line name changed=()
    now=$(_work_settings)
    if [[ -f $record ]]; then
        local -A made=()
        while IFS= read -r line; do made[${line%%=*}]=${line#*=}; done <"$record"
        while IFS= read -r line; do
            name=${line%%=*}
            [[ ${made[$name]-} == "${line#*=}" ]] || changed+=("$name=${made[$name]-} (this run: ${line#*=})")
        done <<<"$now"
        ((${#changed[@]} == 0)) || die "$WORK was made with other settings: ${changed[*]}; its finished" \
            "steps would be kept and its interrupted ones resumed. Rerun with its settings ($record)," \
            "or set WORK to a new directory"
    elif [[ ${DRY_RUN:-0} != 1 ]]; then
        echo "$now" >"$record.partial"
        mv "$record.partial" "$record"
    fi
}

# A speed.json that does not measure the models the plan now names (a rerun with models added) is
# kept as speed.before-DATE.json and the speed step runs again, so that all models are measured in
# one run and their speeds compare.
_set_aside_stale_speed() {
    [[ -f $WORK/speed.json ]] || return 0
    "$PYTHON" "$TOOLS/model_list.py" speed-is-current "$_DRAFTS/models.tsv" "$WORK/speed.json" && return 0
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        echo "$WORK/speed.json does not measure every model of this plan: a run sets it aside and measures all again"
        return 0
    fi
    local aside
    aside=$WORK/speed.before-$(date +%Y%m%d-%H%M%S).json
    [[ -e $aside ]] && die "$aside exists: move it away and rerun"
    mv "$WORK/speed.json" "$aside"
    echo "$WORK/speed.json did not measure every model of this plan: kept as $aside, all are measured again"
}

# run_recipe TITLE [REPORT_FLAGS...]: add the speed measurement (teacher and each method's first seed, batch 1 and
# SPEED_BATCH, SPEED_THREADS threads, in fairseq and exported to CTranslate2 int8 with that model's
# BLEU on every test set, one step so that all are measured in the same run) and the report (BLEU with signatures,
# paired bootstrap against each student's baseline, share of the teacher's lead closed, parameters, speed:
# RESULTS/RESULTS_NAME.md and .png, WORK/results.json), then run the plan.
run_recipe() {
    local title=$1
    local bleu_tests=() i subset
    for i in "${!TEST_NAMES[@]}"; do
        subset=test
        ((i > 0)) && subset=test$i
        bleu_tests+=(--bleu-test "${TEST_NAMES[$i]}" "$subset" "$WORK/raw/${TEST_NAMES[$i]}.$TGT")
    done
    _check_work_settings
    _set_aside_stale_speed
    THREADS=$SPEED_THREADS step_after_all speed "$WORK/speed.json" "$TOOLS/speed.py" --models "$MODELS" --data "$BIN" --subset "$SPEED_SUBSET" \
        --reference "$WORK/raw/speed.$TGT" --beam "$BEAM" --batch-sizes "1,$SPEED_BATCH" "${GEN_LIMITS[@]}" \
        --threads "$SPEED_THREADS" --rounds "$SPEED_ROUNDS" "${bleu_tests[@]}" --spm "$SPM" \
        --out "$WORK/speed.json.partial"
    step_after_all report - "$TOOLS/report.py" --title "$title" --models "$MODELS" \
        --tests "${TEST_NAMES[@]}" --references "$WORK/raw" --tgt "$TGT" --speed "$WORK/speed.json" \
        --scale "$SCALE" --settings "$(recipe_settings)" --out "$RESULTS/$RESULTS_NAME" --json "$WORK/results.json" "${@:2}"
    local steps
    steps=$(wc -l <"$_DRAFTS/plan.tsv")
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        echo "plan ($steps steps, not written to WORK in a dry run), work directory: $WORK"
        "$PYTHON" "$TOOLS/run_plan.py" "$_DRAFTS/plan.tsv" --jobs "$JOBS" --cores "$CORES" --dry-run
    else
        mv "$_DRAFTS/models.tsv" "$MODELS"
        mv "$_DRAFTS/plan.tsv" "$PLAN"
        echo "plan: $PLAN ($steps steps), work directory: $WORK"
        "$PYTHON" "$TOOLS/run_plan.py" "$PLAN" --jobs "$JOBS" --cores "$CORES"
    fi
}
