"""Time one model's evaluation on a whole suite, the figure docs/micro-suite.md reports.

    python benchmarks/eval_speed.py MODEL_DIR [--suite micro-t0] [--seed 0] [--threads 1 2] [--repeats 5]

Builds (or reuses from MERGEBENCH_HOME) the suite's data, opens one lm-eval session (lm-eval import and
task indexing, timed apart: a run pays them once per worker), then evaluates MODEL_DIR ``repeats`` times
per thread count, loading its weights each time as a run does. The first evaluation of a session encodes
every request; later ones reuse the ids, so both are reported. ``--per-task`` adds one line per dataset.
"""
import argparse
import statistics
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--suite", default="micro-t0")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", default="test", choices=("validation", "test"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--per-task", action="store_true")
    ap.add_argument("--suite-param", action="append", default=[], metavar="KEY=VALUE",
                    help="suite parameter, e.g. test=50 (default: the suite's defaults)")
    args = ap.parse_args()

    import torch

    from mergebench.study.cache import ArtifactCache
    from mergebench.core.plugin_manager import get_plugin_manager
    from mergebench.study.weights import load_state_dict
    from mergebench.study import artifacts

    pm = get_plugin_manager()
    suite = pm.suites().get(args.suite)
    given = dict(p.split("=", 1) for p in args.suite_param)  # strings, converted as the CLI's are
    manifest = artifacts.suite(pm, ArtifactCache(), args.suite, args.seed, given) if suite.build else None
    datasets = list(suite.datasets())
    evaluator = pm.evaluators().get("lm-eval")
    params = evaluator.resolve_params({"split": args.split})
    n_examples = sum(sum(1 for _ in open(manifest.files[d][args.split])) for d in datasets) if manifest else None

    print(f"| threads | session (import + index) | first evaluation | later evaluations (median of {args.repeats - 1}) |")
    print("|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        started = time.perf_counter()
        session = evaluator.session(args.model, suite, manifest, datasets, params)
        opened = time.perf_counter() - started
        times = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            session.evaluate(load_state_dict(args.model))
            times.append(time.perf_counter() - started)
        later = f"{statistics.median(times[1:]):.2f} s" if len(times) > 1 else "-"
        print(f"| {threads} | {opened:.2f} s | {times[0]:.2f} s | {later} |")
    print(f"\n{len(datasets)} datasets, {n_examples} {args.split} examples, batch size {params['batch_size']}")
    if args.per_task:
        for d in datasets:
            one = evaluator.session(args.model, suite, manifest, [d], params)
            one.evaluate()
            started = time.perf_counter()
            one.evaluate()
            print(f"{d}: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
