#!/usr/bin/env bash
# Two checkouts served and measured in one run, alternating (old, new, old, new), so the machine's drift falls
# on both: `pdserve bench --address` against each stack's gateway (a short closed-loop mixed workload), each
# tier's resident memory after the run, and the greedy token ids of a fixed prompt set (which must be equal).
#
#   scripts/compare/checkouts_bench.sh OLD_CHECKOUT NEW_CHECKOUT OUT_DIR [ROUNDS]
#
# Each checkout needs its own .venv (`make test` or `make model` there once).
set -euo pipefail
old=$(realpath "$1"); new=$(realpath "$2"); out=$(realpath -m "$3"); rounds=${4:-2}
mkdir -p "$out"
here=$(dirname "$(realpath "$0")")
for round in $(seq 1 "$rounds"); do
  for side in old new; do
    dir=${!side}
    (cd "$dir" && .venv/bin/python "$here/serve_and_measure.py" "$out/$side-$round")
  done
done
.venv/bin/python "$here/serve_and_measure.py" --compare "$out" "$rounds"
