#!/usr/bin/env bash
# Mutation testing of the merge maths, the engine and the study's selection, normalisation, leaderboard
# and database modules with mutmut 3 (configured in pyproject.toml's [tool.mutmut]). Not run in CI: it
# takes hours on 2 cores. Results and every surviving mutant: docs/testing.md.
#
#   benchmarks/mutation.sh GROUP [GROUP ...]   run mutmut on the mutants of these groups, then summarise
#   benchmarks/mutation.sh --fast GROUP ...    the same with only the unit tests that need no model files,
#                                              no mergekit and no study run (FAST_TESTS below), in a scratch
#                                              copy under ${TMPDIR:-/tmp}: a lower bound on the full
#                                              selection's score, in a fraction of the time
#   benchmarks/mutation.sh --summary [--fast] [GROUP]  only summarise what mutants/ holds (no tests run)
#
# Groups: normalise leaderboard database selection (jobs.best_point) jobs (all of jobs.py) study
#         (normalise + leaderboard + database + selection) average task_vectors plugins (both)
#         merge_ops in_memory maths (plugins + merge_ops + in_memory) engine all
# Any other argument is passed to mutmut as a mutant-name glob (e.g. 'mergebench.core.engine.x_build_plan*').
#
# Environment: MUTMUT_CHILDREN (parallel mutants, default 2), NICE (niceness, default 19).
# mutmut keeps its state in mutants/ (git-ignored): re-running a group re-tests all of that group's
# mutants; `mutmut show NAME` prints one mutant's diff, `mutmut browse` browses them all.
# While others edit the working tree, run it from a copy of the committed code, e.g.
#   mkdir /tmp/mb-mut && git archive HEAD | tar -x -C /tmp/mb-mut && /tmp/mb-mut/benchmarks/mutation.sh --fast study
{  # braces: bash reads the whole script before running it, so editing it mid-run is safe
set -euo pipefail
cd "$(dirname "$0")/.."
set -f  # mutant-name globs are for mutmut, not the shell
if [[ -z "${VIRTUAL_ENV:-}" && -f .venv/bin/activate ]]; then . .venv/bin/activate; fi

patterns_of() {
    case "$1" in
        normalise)       echo "mergebench.study.normalise.*" ;;
        leaderboard)     echo "mergebench.study.leaderboard.*" ;;
        database)        echo "mergebench.study.database.*" ;;
        selection)       echo "mergebench.study.jobs.x_best_point__mutmut_*" ;;
        jobs)            echo "mergebench.study.jobs.*" ;;
        study)           echo "$(patterns_of normalise) $(patterns_of leaderboard) $(patterns_of database) $(patterns_of selection)" ;;
        average|task_vectors) echo "mergebench.plugins.$1.*" ;;
        plugins)         echo "mergebench.plugins.*" ;;
        merge_ops|in_memory|engine) echo "mergebench.core.$1.*" ;;
        maths)           echo "$(patterns_of plugins) $(patterns_of merge_ops) $(patterns_of in_memory)" ;;
        all)             echo "$(patterns_of maths) $(patterns_of engine) $(patterns_of study)" ;;
        *)               echo "$1" ;;
    esac
}

summarise() {
    python - "$@" <<'PY'
"""Per-module score from mutants/*.meta: killed / (mutants - equivalent), survivors listed."""
import fnmatch, json, sys
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

patterns = sys.argv[1:] or ["*"]
rows, survivors = [], []
for meta in sorted(Path("mutants/mergebench").rglob("*.py.meta")):
    codes = {k: v for k, v in json.loads(meta.read_text())["exit_code_by_key"].items()
             if any(fnmatch.fnmatch(k, p) for p in patterns)}
    if not codes:
        continue
    status = {k: status_by_exit_code[v] for k, v in codes.items()}
    count = Counter(status.values())
    rows.append((str(meta.relative_to("mutants"))[:-5], len(codes), count))
    survivors += [(k, s) for k, s in sorted(status.items()) if s not in ("killed", "timeout")]
print(f"{'module':42} {'mutants':>7} {'killed':>6} {'timeout':>7} {'survived':>8} {'no tests':>8} {'other':>5}")
for path, n, c in rows:
    other = n - c["killed"] - c["timeout"] - c["survived"] - c["no tests"]
    print(f"{path:42} {n:7} {c['killed']:6} {c['timeout']:7} {c['survived']:8} {c['no tests']:8} {other:5}")
if survivors:
    print("\nnot killed (inspect with `mutmut show NAME`; classify in docs/testing.md):")
    for k, s in survivors:
        print(f"  {s:12} {k}")
PY
}

if [[ $# -eq 0 ]]; then sed -n '2,23p' "$0"; exit 2; fi
summary_only=0 fast=0
while [[ $# -gt 0 && "$1" == --* ]]; do
    case "$1" in
        --summary) summary_only=1 ;;
        --fast) fast=1 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
# The fast selection: the unit tests of these modules that take seconds (no toy study, no mergekit), and
# every tests/test_mutants_*.py.
FAST_TESTS=(tests/test_mutants.py tests/test_engine_mutants.py tests/test_methods.py tests/test_normalise_cache.py
            tests/test_methods_task_vectors.py tests/test_conventions.py tests/test_statistics.py)
while IFS= read -r extra; do FAST_TESTS+=("$extra"); done < <(find tests -maxdepth 1 -name 'test_mutants_*.py' | sort)
if [[ $fast -eq 1 ]]; then
    # A scratch project whose [tool.mutmut] selects only the fast unit tests; its mutants/ lives there.
    scratch="${TMPDIR:-/tmp}/mergebench-mutation-fast"
    if [[ $summary_only -eq 0 ]]; then
        mkdir -p "$scratch"
        rm -rf "$scratch/mergebench" "$scratch/tests" "$scratch/examples"
        cp -pr mergebench tests examples "$scratch/"
        python - "$scratch/pyproject.toml" "${FAST_TESTS[@]}" <<'PY'
import json, re, sys
text = open("pyproject.toml").read()
fast = "pytest_add_cli_args_test_selection = " + json.dumps(sys.argv[2:])
text = re.sub(r"pytest_add_cli_args_test_selection = \[.*?\]", lambda _: fast, text, flags=re.S)
open(sys.argv[1], "w").write(text)
PY
    fi
    cd "$scratch"
fi
patterns=()
for group in "${@:-all}"; do
    # shellcheck disable=SC2207
    patterns+=($(patterns_of "$group"))
done
[[ ${#patterns[@]} -eq 0 ]] && patterns=($(patterns_of all))

if [[ $summary_only -eq 0 ]]; then
    start=$(date +%s)
    # One intra-op thread per worker: the mutants run in parallel and torch's OpenMP pool is not fork-safe.
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n "${NICE:-19}" \
        mutmut run --max-children "${MUTMUT_CHILDREN:-2}" "${patterns[@]}" || status=$?
    echo "mutmut finished in $(( $(date +%s) - start )) s (exit ${status:-0})"
fi
summarise "${patterns[@]}"
exit "${status:-0}"
}
