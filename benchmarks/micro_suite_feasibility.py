"""Feasibility run of the micro suite: base, IT base and 8 experts of one size, scored on every task.

    python benchmarks/micro_suite_feasibility.py tiny 1000 150   # size, pretraining steps, expert steps
"""
import json, sys, time, torch, copy
from pathlib import Path
from mergebench.suites.micro_t0 import generate, HELD_IN, HELD_OUT
from mergebench.training import train_tokenizer, llama_config, TrainConfig, train, pairs_from_rows
from mergebench.evaluators.lm_eval_adapter import TaskSpec, write_task_configs, LMEvalSession
from transformers import LlamaForCausalLM
size = sys.argv[1] if len(sys.argv) > 1 else "tiny"
pre_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
exp_steps = int(sys.argv[3]) if len(sys.argv) > 3 else 150
exp_lr = float(sys.argv[4]) if len(sys.argv) > 4 else 1e-3
root = Path(f"/tmp/feas-{size}"); root.mkdir(exist_ok=True)
t0 = time.time()
m = generate(root / "suite", seed=0)
rows = lambda name, split: [json.loads(l) for l in open(m["files"][name][split])]
corpus = open(m["files"]["corpus"]["train"]).read().splitlines()
tok_lines = corpus + [r["query"] for c in HELD_IN.values() for d in c for r in rows(d, "train")[:300]]
tok = train_tokenizer(tok_lines, root / "tok", vocab_size=1024)
print("data+tok", round(time.time() - t0, 1), flush=True)
torch.manual_seed(0)
base = LlamaForCausalLM(llama_config(size, len(tok)))
print("params", sum(p.numel() for p in base.parameters()))
t = time.time()
losses = train(base, tok, TrainConfig(steps=pre_steps, lr=3e-3, batch_size=32, seq_len=128, seed=0), texts=corpus)
print("pretrain", round(time.time() - t, 1), "loss", round(sum(losses[-20:]) / 20, 3), flush=True)
it = copy.deepcopy(base)
t = time.time()
losses = train(it, tok, TrainConfig(steps=200, lr=1e-3, seed=1, lm_fraction=0.5), pairs=pairs_from_rows(rows("instructions", "train")), texts=corpus)
print("IT", round(time.time() - t, 1), flush=True)
specs = []
for group in (HELD_IN, HELD_OUT):
    for cat, ds in group.items():
        for name, (_, ot, metric) in ds.items():
            specs.append(TaskSpec(name, ot, metric, {"test": m["files"][name]["test"]}, max_gen_toks=24))
names = write_task_configs(root / "tasks", specs, "test")
evalm = copy.deepcopy(base)
sess = LMEvalSession(root / "tasks", names, evalm, tok, batch_size=64)
t = time.time(); scores = {"base": sess.evaluate(base.state_dict())}; print("eval one model", round(time.time() - t, 1), flush=True)
scores["it"] = sess.evaluate(it.state_dict())
for cat, ds in HELD_IN.items():
    e = copy.deepcopy(base)
    t = time.time()
    train(e, tok, TrainConfig(steps=exp_steps, lr=exp_lr, seed=2), pairs=[p for d in ds for p in pairs_from_rows(rows(d, "train"))])
    scores[cat] = sess.evaluate(e.state_dict())
    print("expert", cat, round(time.time() - t, 1), {d: round(scores[cat][d], 3) for d in ds}, flush=True)
print("total", round(time.time() - t0, 1))
print(f"{'task':<28}" + "".join(f"{k[:10]:>11}" for k in scores))
for n in names:
    print(f"{n:<28}" + "".join(f"{scores[k][n]:>11.3f}" for k in scores))
json.dump(scores, open(root / "scores.json", "w"), indent=1)
