#!/usr/bin/env bash
# Multi30k English->German: a teacher and ten students of one size, one per distillation method
# (the list is in examples/tools/multi30k_study.sh), scored with sacreBLEU on test_2016_flickr and
# test_2017_flickr, with parameters and decoding speed, on the data shipped in data/multi30k.
#
#   bash examples/multi30k-en-de/recipe.sh                 SCALE=tiny: a few minutes, checks the commands
#   SCALE=full bash examples/multi30k-en-de/recipe.sh      the benchmark: about 7 hours on 2 CPU cores with JOBS=2
#   SCALE=full SEEDS="1 2 3" bash examples/multi30k-en-de/recipe.sh
#
# Rerun the same command to resume after an interruption: finished steps are skipped. Settings
# (WORK, THREADS, SEEDS, ...) are described in examples/tools/recipe_lib.sh; the guide is
# docs/recipes.md. python, with fairseq and this plugin installed, must be on PATH.
set -euo pipefail
# shellcheck source=../tools/multi30k_study.sh
source "$(dirname "${BASH_SOURCE[0]}")/../tools/multi30k_study.sh"
multi30k_study en de
