# shellcheck shell=bash
# multi30k_study.sh: the studies the Multi30k recipes run (examples/multi30k-en-de/recipe.sh and
# examples/multi30k-en-fr/recipe.sh), on the data shipped in data/multi30k. Sourced, not run.
# STUDY chooses one: methods (the default) or compression.
#
# STUDY=methods: a teacher, its translations of the training sources (sequence-level KD data), and students that
# all have one architecture (the teacher's widths, fewer layers), trained for the same number of
# updates with each distillation method of the plugin:
#
#   baseline          gold pairs only, label-smoothed cross-entropy
#   word_kd           word-level KD from the online teacher (Hinton et al. 2015; Kim & Rush 2016)
#   seq_kd            the teacher's translations only (Kim & Rush 2016 sequence-level KD)
#   seq_kd_interp     gold and teacher targets of each source, weighted 1:1 (seq_kd_interp)
#   base_kd           gold pairs plus teacher pairs as one training set (Gordon & Duh 2019)
#   hybrid_kd         gold NLL + teacher-target NLL + word-level KD (NVIDIA's NeMo NMT-distillation guide)
#   triple_loss       KD + NLL + cosine of hidden states, from the teacher's layers (DistilBERT)
#   layer_init        gold pairs only, from the teacher's layers: the control that separates what
#                     triple_loss gains from its start (the teacher's trained layers) from its loss
#   low_data          5% of the gold pairs and the teacher's translations of all sources, drawn 1:2
#   seq_kd_then_gold  seq_kd, then fine-tuned on the gold pairs (QuillBot's order)
#
# STUDY=compression: one teacher trained until its validation loss stops improving, and students
# of three sizes, each trained gold-only and with the methods that won the methods study:
#
#   4x          2+2 layers, d=128, ffn 512 (about 4 times fewer parameters than the teacher)
#   4x_deep_enc 4+1 layers, d=128, ffn 512: the same budget spent on the encoder, whose cost is paid
#               once per sentence, and taken from the decoder, which runs once per output token
#   10x         2+2 layers, d=64, ffn 256
#
# with the methods gold, seq_kd, seq_kd_then_gold, seq_kd_interp and hybrid_kd as above
# (COMPRESSION_SIZES="10x 4x:gold,hybrid_kd" trains only those sizes, in that order, and of the
# 4x only those methods). The report draws BLEU against parameters and against int8 decoding
# speed, one line per method.

# shellcheck source=recipe_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/recipe_lib.sh"

# multi30k_study SRC TGT: the study named by STUDY.
multi30k_study() {
    case ${STUDY:-methods} in
        methods) methods_study "$@" ;;
        compression) compression_study "$@" ;;
        *) die "STUDY must be methods (distillation methods, students of one size) or compression" \
            "(students of several sizes), not '$STUDY'" ;;
    esac
}

# methods_study SRC TGT
methods_study() {
    recipe_begin "multi30k-$1-$2" "$1" "$2"
    # layers: encoder decoder; widths: d_model ffn heads
    local teacher_size student_size teacher_arch student_arch
    if [[ $SCALE == tiny ]]; then
        teacher_size=(2 2 32 64 2) student_size=(1 1 32 64 2)
    else
        # Teacher: 3+3 layers, d=256, ffn 1024 (7.6M parameters with the 8k vocabulary; a teacher
        # of this shape reaches about 36 BLEU on test_2016_flickr en-de in 2,000 updates).
        # Students: the same widths, which the triple-loss student needs to start from the
        # teacher's layers, with a 2-layer encoder and a 1-layer decoder (4.7M parameters; the
        # shallow decoder is what makes decoding fast).
        teacher_size=(3 3 256 1024 4) student_size=(2 1 256 1024 4)
    fi
    transformer_arch teacher_arch "${teacher_size[@]}" --dropout 0.3
    transformer_arch student_arch "${student_size[@]}" --dropout 0.3

    prepare_multi30k
    teacher "${teacher_arch[@]}"
    translate teacher "$WORK/teacher"
    distill kd top1
    init_student spread --encoder-layers "${student_size[0]}" --decoder-layers "${student_size[1]}" \
        --strategy spread

    # every student: its architecture, then its task and criterion; the students named after a
    # method are tested against the gold-only baseline
    local gold=("${student_arch[@]}" --task translation "${LABEL_SMOOTHED[@]}")
    local online=("${student_arch[@]}" --task translation_distill --teacher-path "$TEACHER_CHECKPOINT")
    local paired=("${student_arch[@]}" --task translation_distill --kd-data "$WORK/kd")
    student baseline "gold only" baseline "$BIN" -- "${gold[@]}"
    student word_kd "word-level KD, alpha 0.5, T 1" baseline "$BIN" "$TEACHER_CHECKPOINT" -- "${online[@]}" \
        --criterion word_kd --alpha 0.5 --temperature 1
    student seq_kd "seq-KD: teacher targets only" baseline "$WORK/kd" -- "${gold[@]}"
    student seq_kd_interp "seq_kd_interp, alpha 0.5" baseline "$BIN" "$WORK/kd" -- "${paired[@]}" \
        --criterion seq_kd_interp --alpha 0.5 --label-smoothing 0.1
    student base_kd "gold + teacher pairs (base+kd)" baseline "$BIN" "$WORK/kd" -- "${paired[@]}" \
        --kd-data-mode concat "${LABEL_SMOOTHED[@]}"
    student hybrid_kd "hybrid_kd, T 1" baseline "$BIN" "$WORK/kd" "$TEACHER_CHECKPOINT" -- "${paired[@]}" \
        --teacher-path "$TEACHER_CHECKPOINT" --criterion hybrid_kd --temperature 1 --label-smoothing 0.1
    student triple_loss "triple_loss, init from teacher layers" baseline "$BIN" "$TEACHER_CHECKPOINT" "$WORK/spread.pt" -- \
        "${online[@]}" --criterion triple_loss --finetune-from-model "$WORK/spread.pt"
    student layer_init "gold only, init from teacher layers" baseline "$BIN" "$WORK/spread.pt" -- "${gold[@]}" \
        --finetune-from-model "$WORK/spread.pt"
    student low_data "5% gold + teacher pairs, 1:2" baseline "$BIN" "$WORK/kd" -- "${paired[@]}" \
        --kd-data-mode ratio --mix-ratios 1:2 --gold-fraction 0.05 "${LABEL_SMOOTHED[@]}"
    finetune seq_kd_then_gold "seq-KD, then gold (QuillBot order)" baseline seq_kd "$BIN" -- "${gold[@]}"

    run_recipe "Multi30k $1-$2: knowledge distillation methods, students of one size"
}

# compression_study SRC TGT
compression_study() {
    if [[ ${SCALE:-tiny} == full ]]; then
        # until the validation loss has not improved for 5 epochs (--patience below), at most this
        : "${TEACHER_UPDATES:=8000}"
    fi
    # seq-KD then gold: the gold pairs at a tenth of the full scale's LR, constant; LR's warm-up schedule
    # again from the start (the default) undid the distillation (examples/multi30k-en-de/README.md)
    : "${FINETUNE_LR=1e-4}"
    recipe_begin "multi30k-$1-$2-compression" "$1" "$2"
    # name, layers: encoder decoder, widths: d_model ffn heads, dropout
    local teacher_size sizes size teacher_arch student_arch
    if [[ $SCALE == tiny ]]; then
        teacher_size=(2 2 32 64 2 0.1)
        sizes=("4x 1 1 16 32 2 0.1" "4x_deep_enc 2 1 16 32 2 0.1" "10x 1 1 8 16 2 0.1")
    else
        # the teacher of the methods study, trained to convergence: 3+3 layers, d=256, ffn 1024
        teacher_size=(3 3 256 1024 4 0.3)
        sizes=("4x 2 2 128 512 4 0.2" "4x_deep_enc 4 1 128 512 4 0.2" "10x 2 2 64 256 4 0.1")
    fi
    transformer_arch teacher_arch "${teacher_size[@]:0:5}" --dropout "${teacher_size[5]}"
    prepare_multi30k
    teacher "${teacher_arch[@]}" --patience 5
    translate teacher "$WORK/teacher"
    # the teacher's translations decoded by CTranslate2 in float32: fairseq's output (docs/distill-data.md)
    # at about 2.4 times its speed on a CPU
    distill kd top1 --engine ctranslate2 --ct2-quantization float32 --batch-size 64
    local name encoder decoder width ffn heads dropout gold paired baseline chosen methods method
    local all_methods="gold seq_kd seq_kd_then_gold seq_kd_interp hybrid_kd"
    local size_names=("${sizes[@]%% *}")
    # COMPRESSION_SIZES: the sizes to train, in this order, each as SIZE (every method) or
    # SIZE:METHOD,METHOD... (those methods; gold, the others' baseline, among them); default: all
    for chosen in ${COMPRESSION_SIZES:-${size_names[*]}}; do
        methods=" $all_methods "
        if [[ $chosen == *:* ]]; then
            methods=" ${chosen#*:} " chosen=${chosen%%:*}
            methods=${methods//,/ }
        fi
        size=$(printf '%s\n' "${sizes[@]}" | grep "^$chosen ") ||
            die "COMPRESSION_SIZES: no size '$chosen' (the sizes: ${size_names[*]})"
        for method in $methods; do
            [[ " $all_methods " == *" $method "* ]] ||
                die "COMPRESSION_SIZES: $chosen: no method '$method' (the methods: $all_methods)"
        done
        [[ $methods == *" gold "* ]] ||
            die "COMPRESSION_SIZES: $chosen: gold must be among its methods (the baseline of the others)"
        [[ $methods != *" seq_kd_then_gold "* || $methods == *" seq_kd "* ]] ||
            die "COMPRESSION_SIZES: $chosen: seq_kd_then_gold fine-tunes seq_kd, which must be among its methods"
        read -r name encoder decoder width ffn heads dropout <<<"$size"
        transformer_arch student_arch "$encoder" "$decoder" "$width" "$ffn" "$heads" --dropout "$dropout"
        # each size's students: its architecture, then task and criterion, tested against its gold-only student
        gold=("${student_arch[@]}" --task translation "${LABEL_SMOOTHED[@]}")
        paired=("${student_arch[@]}" --task translation_distill --kd-data "$WORK/kd")
        baseline=$name.gold
        for method in $all_methods; do
            [[ $methods == *" $method "* ]] || continue
            case $method in
                gold) student "$name.gold" "$name: gold only" "$baseline" "$BIN" -- "${gold[@]}" ;;
                seq_kd) student "$name.seq_kd" "$name: seq-KD, teacher targets only" "$baseline" "$WORK/kd" -- \
                    "${gold[@]}" ;;
                seq_kd_then_gold) finetune "$name.seq_kd_then_gold" "$name: seq-KD, then gold (QuillBot order)" \
                    "$baseline" "$name.seq_kd" "$BIN" -- "${gold[@]}" ;;
                seq_kd_interp) student "$name.seq_kd_interp" "$name: seq_kd_interp, alpha 0.5" "$baseline" "$BIN" \
                    "$WORK/kd" -- "${paired[@]}" --criterion seq_kd_interp --alpha 0.5 --label-smoothing 0.1 ;;
                hybrid_kd) student "$name.hybrid_kd" "$name: hybrid_kd, T 1" "$baseline" "$BIN" "$WORK/kd" \
                    "$TEACHER_CHECKPOINT" -- "${paired[@]}" --teacher-path "$TEACHER_CHECKPOINT" --criterion hybrid_kd \
                    --temperature 1 --label-smoothing 0.1 ;;
            esac
        done
    done
    # one line per method (the part of each student's name after the size) across the sizes
    run_recipe "Multi30k $1-$2: students of three sizes, gold-only and distilled" --plot-by-method
}
