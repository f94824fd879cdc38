#!/usr/bin/env bash
# Reproduce the CPU recipe's figures (docs/cpu_recipe.md): train one preset on the
# embedded Gemma 3 270M, evaluate base / SFT-only / SFT+GRPO greedily on N held-out-
# template problems, plot the curves, and copy the run's small files into docs/.
#
#   bash scripts/cpu_recipe.sh [PRESET] [N]      # defaults: cpu-270m 500
#
# Wall times go to docs/<preset>/times.txt (GNU time's -v output for each command).
# A stopped script can be run again: training resumes from its last checkpoint and
# the evaluation keeps the columns it already wrote. BASE_FROM=<an eval_n<N>.json of
# another run of the same base model> reuses its base column (scripts/seed_base_column.py)
# instead of spending ~30 min of 2 cores on the base model again.
set -euo pipefail
preset=${1:-cpu-270m}
n=${2:-500}
run=runs/${preset}
docs=docs/${preset}
mkdir -p "${docs}"
timed() { /usr/bin/time -v -a -o "${docs}/times.txt" "$@"; }

echo "== train ${preset}: $(date -u +%FT%TZ)" >>"${docs}/times.txt"
timed python -m grpo_jax.train --preset "${preset}" --output-dir "${run}"
if [[ -n "${BASE_FROM:-}" && ! -e "${run}/eval_n${n}.json" ]]; then
  python scripts/seed_base_column.py "${BASE_FROM}" "${run}"
fi
echo "== evaluate ${n}: $(date -u +%FT%TZ)" >>"${docs}/times.txt"
timed python -m grpo_jax.evaluate --run-dir "${run}" --num-problems "${n}"
python scripts/plot_metrics.py "${run}" --out "${docs}/metrics.png"
cp "${run}/metrics.jsonl" "${run}/config.json" "${run}/eval.json" "${docs}/"
cp "${run}/eval_n${n}.json" "${docs}/" 2>/dev/null || true
echo "figures in ${docs}/"
