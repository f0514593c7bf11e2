#!/usr/bin/env bash
# Reproduces MOON2.0's ablation on our data: the full model and one run per removed component, each
# trained with the same config and seed, then evaluated zero-shot and compared side by side.
#
#   benchmarks/ablation.sh [CONFIG] [OUT_DIR] [extra key=value overrides for every run...]
#   e.g. benchmarks/ablation.sh tiny runs/ablation train.max_steps=200
#
# Variants and the `moon-fast train` overrides that make them (model.options = MoonConfig flags):
#   full          (none)
#   dense_mlp     model.options.moe.enabled=false                 MoE -> the backbone's dense MLP
#   no_intra      model.options.loss.intra=false                  no intra-product (image-text) alignment
#   no_dsf        model.options.loss.dsf=false                    no Dynamic Sample Filtering
#   fixed_weights model.options.loss.learned_objective_weights=false   fixed objective weights, not W*-learned
# Each run writes <OUT_DIR>/<variant>/eval.json (training evaluates its held-out set at the end; if a
# run lacks it, `moon-fast eval --checkpoint` is run). The table at the end is
# `moon-fast eval --compare <OUT_DIR>/*`, in percent. Set VARIANTS="full no_dsf" to run a subset.
set -euo pipefail
CONFIG=${1:-tiny}
OUT=${2:-runs/ablation}
shift $(( $# > 2 ? 2 : $# )) || true
PY=${PY:-python -m moon_fast.cli}
declare -A OVERRIDE=(
  [full]=""
  [dense_mlp]="model.options.moe.enabled=false"
  [no_intra]="model.options.loss.intra=false"
  [no_dsf]="model.options.loss.dsf=false"
  [fixed_weights]="model.options.loss.learned_objective_weights=false"
)
VARIANTS=${VARIANTS:-"full dense_mlp no_intra no_dsf fixed_weights"}
runs=()
for v in $VARIANTS; do
  [[ -v OVERRIDE[$v] ]] || { echo "unknown variant $v; known: ${!OVERRIDE[*]}" >&2; exit 2; }
  dir="$OUT/$v"
  if [[ ! -f "$dir/eval.json" ]]; then
    # shellcheck disable=SC2086
    $PY train --config "$CONFIG" --output "$dir" ${OVERRIDE[$v]} "$@"
    [[ -f "$dir/eval.json" ]] || $PY eval --checkpoint "$dir"
  fi
  runs+=("$dir")
done
$PY eval --compare "${runs[@]}" | tee "$OUT/ablation.txt"
