#!/usr/bin/env bash
# The layer-selection study on SmolLM2-135M-Instruct: KL-guided and uniform selection of 4, 8 and 15
# softmax layers of 30 (12.5 / 25 / 50%), and greedy-iterative of 4 with GREEDY=1. One stage 1 and
# one probe ranking (those of kl-guided-8) serve every model; each model then trains its own stage 2
# on the `study` budget (convert/README.md). Finally `hyla eval study` evaluates the teacher and
# every model into the results folder and tabulates them.
#
#   scripts/selection-study.sh [corpus] [models] [eval]      (default: all three, in this order)
#
# Every step resumes where it stopped and skips what is done: run it again after an interruption.
# Settings (environment): DEVICE (cuda), RUNS (runs/selection-study), RESULTS
# (results/smollm2-selection), CORPUS_TOKENS (10000000: teacher-sampled training text, `hyla
# corpus`; CORPUS_ROUND (512) prompts per sampling round; CORPUS_CACHE (16GiB on CUDA, 2GiB on CPU)
# the sampling engine's cache), BUDGET (study), GREEDY (0), MODELS (a subset of the models, e.g.
# "uniform-8 kl-guided-4", in the order given), EVAL_ARGS (extra `hyla eval study` options).
set -euo pipefail

DEVICE=${DEVICE:-cuda}
RUNS=${RUNS:-runs/selection-study}
RESULTS=${RESULTS:-results/smollm2-selection}
CORPUS_TOKENS=${CORPUS_TOKENS:-10000000}
BUDGET=${BUDGET:-study}
TEACHER=smollm2-135m
BASE=kl-guided-8
if [ -z "${MODELS:-}" ]; then
    MODELS="$BASE uniform-8 kl-guided-4 uniform-4 kl-guided-15 uniform-15"
    if [ "${GREEDY:-0}" = 1 ]; then MODELS="$MODELS greedy-iterative-4"; fi
fi
if [ "$DEVICE" = cpu ]; then DTYPE=float32 CACHE=2GiB; else DTYPE=bfloat16 CACHE=16GiB; fi

corpus() {
    hyla corpus --teacher "$TEACHER" --tokens "$CORPUS_TOKENS" --out "$RUNS/corpus" --device "$DEVICE" \
        --round-size "${CORPUS_ROUND:-512}" --cache-memory "${CORPUS_CACHE:-$CACHE}" -q
}

convert_one() {  # METHOD-K
    local from=()
    if [ "$1" != "$BASE" ]; then from=(--stage1-from "$RUNS/$BASE"); fi
    hyla convert --teacher "$TEACHER" --out "$RUNS/$1" --budget "$BUDGET" --selection "${1%-*}" \
        --softmax-layers "${1##*-}" --extra-data "$RUNS/corpus" --device "$DEVICE" -q "${from[@]}"
}

models() {
    local m
    for m in $MODELS; do convert_one "$m"; done
}

evaluate() {
    local m todo=()
    if [ ! -f "$RESULTS/$TEACHER.json" ]; then todo+=(--model "$TEACHER"); fi
    for m in $MODELS; do
        if [ ! -f "$RESULTS/$m.json" ]; then todo+=(--model "$RUNS/$m"); fi
    done
    # shellcheck disable=SC2086  # EVAL_ARGS is a list of options
    hyla eval study "$RESULTS" "${todo[@]}" --device "$DEVICE" --dtype "$DTYPE" ${EVAL_ARGS:-}
}

steps=("$@")
if [ ${#steps[@]} -eq 0 ]; then steps=(corpus models eval); fi
for step in "${steps[@]}"; do
    case "$step" in
        corpus) corpus ;;
        models) models ;;
        eval) evaluate ;;
        *) echo "unknown step '$step' (corpus, models, eval)" >&2; exit 2 ;;
    esac
done
