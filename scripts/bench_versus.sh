#!/usr/bin/env bash
# Before and after: the --quick benchmarks of an older commit and of this tree, back to back in one run.
#
#   scripts/bench_versus.sh 3996eb6                      # bench_train and bench_checkpoint (~8 minutes)
#   scripts/bench_versus.sh 3996eb6 bench_checkpoint     # one benchmark
#
# The older commit comes from git history (`git archive`) into a temp dir and runs with this tree's venv
# (`python -m` imports the package from the working directory first). A benchmark, never a test: read the ratios
# each benchmark prints, on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: scripts/bench_versus.sh REV [BENCH ...]}
shift
if [ $# -gt 0 ]; then benches=("$@"); else benches=(bench_train bench_checkpoint); fi
old=$(mktemp -d)
trap 'rm -rf "$old"' EXIT
git archive "$rev" | tar -x -C "$old"
py=$PWD/.venv/bin/python
for bench in "${benches[@]}"; do
  for side in before after; do
    dir=$([ "$side" = before ] && echo "$old" || echo "$PWD")
    echo "=== $bench --quick: $side ($([ "$side" = before ] && echo "$rev" || git rev-parse --short HEAD)) ==="
    (cd "$dir" && "$py" -m "scripts.$bench" --quick 2>&1 | tail -25)
  done
done
