"""`mergebench run CONFIG --plan`: every job, what each asks, and what is missing, offline from metadata."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from mergebench.cli.main import cli

from test_real_models import hub  # noqa: F401 - the fixture: tiny models in the hub cache layout


def test_plan_counts_jobs_reads_parameters_from_headers_and_names_what_is_missing(hub, tmp_path):  # noqa: F811
    root, cache, snapshots = hub
    config = {
        "suite": "t0-paper", "seeds": [0, 1], "n_experts": [2, 4], "methods": ["average", "ties"],
        "search": {"ties": {"lambda": [0.5, 1.0], "density": [0.2]}},
        "bases": [{"size": "s", "kind": "pretrained", "preparer": "load", "params": {"model": "tiny-org/tiny-llama"}},
                  {"size": "s", "kind": "instruction_tuned", "preparer": "load",
                   "params": {"model": "someone/absent-7B-Instruct"}}],
        "expert_trainer": "hf_trainer", "multitask": "hf_trainer", "device": "cuda",
        "evaluator": {"name": "lm-eval", "params": {"dtype": "bfloat16"}},
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(cli, ["run", str(path), "--plan", "--json", "--gpu-memory", "40"],
                                env={"HF_HUB_CACHE": str(cache), "HF_DATASETS_CACHE": str(tmp_path / "none"),
                                     "MERGEBENCH_HOME": str(tmp_path / "home")})
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert not (tmp_path / "home").exists()  # nothing built, nothing cached
    bases = {b["kind"]: b for b in plan["bases"]}
    from safetensors.torch import load_file

    expected = sum(t.numel() for t in load_file(snapshots["tiny-org/tiny-llama"] / "model.safetensors").values())
    assert bases["pretrained"]["parameters"] == expected and not bases["pretrained"]["estimated"]
    assert bases["instruction_tuned"]["parameters"] == 7_000_000_000 and bases["instruction_tuned"]["estimated"]
    # held-in categories 8; max N 4: the experts of the first 4 of each seed's order, so 4 to 8 per base
    from mergebench.study.runner import expert_order
    from mergebench.suites.t0_paper import HELD_IN

    experts = len({c for s in (0, 1) for c in expert_order(list(HELD_IN), s)[:4]})
    totals = plan["totals"]
    assert totals["train"] == 2 * 2 * (experts + 1)
    assert totals["evaluate"] == 2 * (2 * (1 + experts + 1) + 2 * experts)
    assert totals["sweep"] == 2 * 2 * 2 * 2  # bases x N values x methods x seeds
    assert totals["sweep points"] == 2 * 2 * 2 * (1 + 2)
    jobs = {(j["kind"], j["what"].split(":")[0]): j for j in plan["jobs"]}
    big = jobs[("train", "s instruction_tuned")]
    assert big["gpus"] == -(-int(7e9 * 16 * 1.2) // (40 * 2**30))  # training memory / 40 GiB GPUs
    assert jobs[("evaluate", "s pretrained")]["gpus"] == 1
    missing = "\n".join(plan["missing"])
    assert "someone/absent-7B-Instruct" in missing and "tiny-org/tiny-llama " not in missing
    assert "nyu-mll/glue" in missing and "aps/super_glue" in missing  # held-in and lm-eval's own held-out tasks
