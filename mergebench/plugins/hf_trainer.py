"""``hf_trainer``: full fine-tuning of any Hugging Face causal LM with transformers' ``Trainer``.

The expert trainer for real models (``full_finetune`` is the micro suite's own loop for tiny Llamas).
Every parameter of the base is trained on the prompt/target rows of the given JSONL files (``query`` +
``answer``, or ``query`` + ``choices`` + ``label``, trained on the correct choice), with the loss on
the target tokens only: the prompt is context, labelled -100, as in the paper's full fine-tuning
(Yadav et al., arXiv:2410.03617). The same trainer serves experts (one category's files) and the
multitask baseline (every category's).

Encoding (:func:`encode_example`, shared with ``full_finetune``'s conventions so that either trainer's
experts are scored alike): prompt and target are tokenized apart, without special tokens (no BOS:
lm-eval scores contexts without one), the tokenizer's EOS is appended to the target and is trained on,
and a sequence longer than ``max_length`` is cut from the left (the target survives). Batches are
padded on the right with the tokenizer's pad token (its EOS when it has none; the tokenizer written
out is the base's, unchanged), padded positions masked out of attention and loss.

Optimisation: transformers' ``Trainer`` (AdamW, gradient clipping at ``max_grad_norm``, the
``lr_scheduler`` with linear warm-up over ``warmup_ratio`` of the steps), ``steps`` optimiser steps or,
with ``steps=0``, ``epochs`` passes over the data; ``batch_size`` sequences per device per forward,
``gradient_accumulation`` forwards per step. Weights and optimiser state are float32 whatever the
base's dtype; ``bf16`` is mixed precision (autocast to bfloat16, Trainer's ``bf16=True``), on the GPU
and on the CPU alike (on the CPU it works but is no faster unless the CPU has bfloat16 instructions; a
GPU without bfloat16 is refused: pass ``bf16=false``). ``gradient_checkpointing`` recomputes activations in the backward pass (less
memory, about a third more compute; the result is the same). ``dropout`` is set, while training, on
whichever dropout fields the model's config has (``attention_dropout``, ``hidden_dropout``,
``resid_pdrop``, ...); the saved config keeps the base's values. Determinism: for a ``seed`` (model
loading, batch order, dropout) two runs on the CPU write bit-identical weights (tested).

Output: the Hugging Face layout that ``mergebench merge`` and the evaluator read, written with
``save_pretrained`` (safetensors weights in the base's dtype, config, generation config) and the
base's tokenizer files. Nothing else is left in ``workdir``: Trainer's output directory (it saves no
checkpoints: ``save_strategy="no"``, ``report_to=[]``) is removed. The base is never modified.

Devices (``device`` argument; checked before anything is loaded):

- ``"cpu"``: ``use_cpu=True``, whatever GPUs the machine has.
- ``"cuda:N"``: that one GPU only (no DataParallel over the others).
- ``"cuda"``: Trainer's own choice among the *visible* GPUs: with one visible (the study's jobs ask for
  one GPU and their executor, e.g. Ray, sets ``CUDA_VISIBLE_DEVICES`` to it) it trains there; with
  several visible in one process, Trainer wraps the model in ``torch.nn.DataParallel`` over all of them
  (``batch_size`` is then per GPU: each step sees ``batch_size x GPUs x gradient_accumulation``
  sequences). DataParallel works but scales poorly; for several GPUs prefer DDP below.
- **Several GPUs with DDP** (one process per GPU): launch this module with ``accelerate launch`` or
  ``torchrun``, which start the processes and set ``WORLD_SIZE``/``LOCAL_RANK``; Trainer then trains
  with DistributedDataParallel, each process on its local GPU (the index in ``device`` is ignored;
  ``batch_size`` is per process) and only the main process writes the output::

      accelerate launch --num_processes 4 -m mergebench.plugins.hf_trainer BASE train.jsonl \\
          -o expert/ --device cuda -p steps=2000 -p batch_size=4 -p bf16=true
      torchrun --nproc_per_node 4 -m mergebench.plugins.hf_trainer BASE train.jsonl -o expert/ --device cuda

  ``mergebench run`` and ``mergebench train-expert`` run each training in one process (one GPU, or
  DataParallel as above); a model that needs several GPUs is trained this way and then used as a model
  directory. (``--device cpu`` with ``torchrun`` or ``accelerate launch --cpu`` trains with DDP over CPU
  processes and gloo.)

What is tested where: the tests train on the CPU; for the GPU cases they check the arguments Trainer is
given (cuda:N -> that device, one GPU; plain cuda and distributed launches -> Trainer's own choice). DDP
was run by hand over 2 CPU processes with both launchers; training on GPUs has not been run here.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from mergebench.core.errors import InputError, ParameterError
from mergebench.core.hookspecs import hookimpl
from mergebench.core.registry import Param
from mergebench.study.components import ExpertTrainer

OnStep = Callable[[int, int, float], None]
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# config fields that hold a dropout probability, across architectures
DROPOUT_FIELDS = ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                  "hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout", "residual_dropout",
                  "embedding_dropout", "ffn_dropout")
TRAINER_DIR = "_trainer"  # Trainer's output_dir inside workdir, removed once trained

PARAMS = (
    Param("steps", int, 2000, "optimiser steps (the paper's 2000); 0 = train for `epochs` instead", min=0),
    Param("epochs", float, 1.0, "passes over the data, used when steps = 0", min=0.0),
    Param("lr", float, 3e-5, "peak learning rate (the paper's 3e-5)", min=0.0),
    Param("batch_size", int, 8, "sequences per device per forward pass", min=1),
    Param("gradient_accumulation", int, 1, "forward passes per optimiser step", min=1),
    Param("max_length", int, 1024, "maximum tokens per sequence (longer ones are cut from the left)", min=8),
    Param("warmup_ratio", float, 0.0, "share of the steps with a linear warm-up", min=0.0, max=0.99),
    Param("lr_scheduler", str, "cosine", "learning-rate schedule after warm-up (to 0; constant stays)",
          choices=tuple(SCHEDULERS)),
    Param("weight_decay", float, 0.0, "AdamW weight decay", min=0.0),
    Param("max_grad_norm", float, 1.0, "gradient clipping norm (0 = none)", min=0.0),
    Param("dropout", float, 0.05, "dropout while training, on the config's dropout fields (the paper's 0.05)",
          min=0.0, max=0.9),
    Param("bf16", bool, True, "bfloat16 mixed precision (autocast; float32 weights and optimiser state)"),
    Param("gradient_checkpointing", bool, False, "recompute activations in the backward pass to save memory"),
    Param("seed", int, 0, "seed for batch order and dropout"),
)


# ---- data -------------------------------------------------------------------------------------------------

def encode_example(tok, prompt: str, target: str, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` = prompt + target + EOS and ``labels`` = -100 over the prompt, the target + EOS after,
    cut from the left to ``max_length`` tokens."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    t = tok(target, add_special_tokens=False)["input_ids"]
    if tok.eos_token_id is not None:
        t = t + [tok.eos_token_id]
    ids = (p + t)[-max_length:]
    labels = ([-100] * len(p) + t)[-max_length:]
    return {"input_ids": ids, "labels": labels}


def pad_id(tok) -> int:
    """The id padded positions hold (masked out anyway): the pad token, else EOS, else 0."""
    for value in (tok.pad_token_id, tok.eos_token_id):
        if value is not None:
            return value
    return 0


class Collator:
    """Right-pads a list of encoded examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors."""

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, items: Sequence[dict[str, list[int]]]) -> dict[str, Any]:
        import torch

        width = max(len(i["input_ids"]) for i in items)
        ids = torch.full((len(items), width), self.pad, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class _Examples:
    """A map-style dataset over encoded examples (what Trainer's DataLoader needs)."""

    def __init__(self, items: list[dict[str, list[int]]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index]


# ---- devices and arguments --------------------------------------------------------------------------------

def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_device(device: str):
    """``device`` as a torch.device, or ParameterError (unknown, unsupported, or CUDA without a GPU)."""
    import torch

    from mergebench.core.engine import parse_device

    parsed = parse_device(device)
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ParameterError(f"device '{device}' requested, but only {torch.cuda.device_count()} CUDA GPU(s) "
                             f"are visible")
    return parsed


def one_gpu(device) -> int | None:
    """The one GPU to train on for ``device`` (a torch.device): N for cuda:N in a single process; None for the
    CPU, for plain "cuda" (Trainer's choice: cuda:0, DataParallel over several visible) and under a distributed
    launch (each process takes its local rank's GPU)."""
    return device.index if device.type == "cuda" and device.index is not None and not _distributed() else None


def _arguments_class(one_gpu: int | None):
    """TrainingArguments, restricted to GPU ``one_gpu`` when given: Trainer's own device set-up takes cuda:0
    and every visible GPU (DataParallel); this one takes the chosen GPU and that one alone."""
    from functools import cached_property

    import torch
    from transformers import TrainingArguments

    if one_gpu is None:
        return TrainingArguments

    class OneGPUArguments(TrainingArguments):
        @cached_property
        def _setup_devices(self) -> "torch.device":
            TrainingArguments._setup_devices.func(self)  # accelerate's state, as Trainer expects it
            device = torch.device("cuda", one_gpu)
            torch.cuda.set_device(device)
            self._n_gpu = 1
            return device

    return OneGPUArguments


def training_arguments(params: dict[str, Any], output_dir: Path, device):
    """Trainer's arguments for the resolved ``params`` on ``device`` (a torch.device)."""
    import dataclasses

    import transformers

    cls = _arguments_class(one_gpu(device))
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir), overwrite_output_dir=True, report_to=[], save_strategy="no",
        disable_tqdm=True, logging_strategy="steps", logging_steps=1, use_cpu=device.type == "cpu",
        per_device_train_batch_size=params["batch_size"], gradient_accumulation_steps=params["gradient_accumulation"],
        learning_rate=params["lr"], weight_decay=params["weight_decay"], max_grad_norm=params["max_grad_norm"],
        lr_scheduler_type=SCHEDULERS[params["lr_scheduler"]], bf16=params["bf16"], seed=params["seed"],
        data_seed=params["seed"], max_steps=params["steps"] if params["steps"] > 0 else -1,
        num_train_epochs=params["epochs"], remove_unused_columns=False, dataloader_num_workers=0,
        dataloader_pin_memory=device.type == "cuda", save_only_model=True,
        ddp_find_unused_parameters=False)  # a causal LM uses every parameter (and checkpointing needs False)
    if "warmup_ratio" in fields:  # transformers < 5
        kwargs["warmup_ratio"] = params["warmup_ratio"]
    else:  # transformers >= 5: a float in [0, 1) is a share of the steps
        kwargs["warmup_steps"] = params["warmup_ratio"]
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[checkpointing] = params["gradient_checkpointing"]
    if params["gradient_checkpointing"]:
        kwargs[f"{checkpointing}_kwargs"] = {"use_reentrant": False}
    return cls(**{k: v for k, v in kwargs.items() if k in fields})


def _progress_callback(on_step: OnStep):
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """Reports each optimiser step's loss (Trainer logs every step: logging_steps=1)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and state.is_world_process_zero:
                on_step(state.global_step, state.max_steps, float(logs["loss"]))

    return Progress()


# ---- the trainer ------------------------------------------------------------------------------------------

def _base_dtype(config):
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def _load(base: Path, dropout: float):
    """The base's tokenizer, and its model in float32 with ``dropout`` on its config's dropout fields;
    returns the fields' own values too, to restore before saving."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(base)
        config = AutoConfig.from_pretrained(base)
        dtype = _base_dtype(config)
        own = {f: getattr(config, f) for f in DROPOUT_FIELDS if isinstance(getattr(config, f, None), (int, float))
               and not isinstance(getattr(config, f), bool)}
        for f in own:
            setattr(config, f, dropout)
        model = AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise InputError(f"{base}: cannot load the model and tokenizer ({str(exc).splitlines()[0]})") from None
    return model, tok, dtype, own


def hf_train(base: Path, data: list[Path], params: dict[str, Any], workdir: Path, *, on_step: OnStep | None = None,
             device: str = "cpu") -> Path:
    """Every parameter of ``base`` trained on the rows of ``data`` with transformers' Trainer; the model and
    the base's tokenizer are written into ``workdir`` (the Hugging Face layout, the base's dtype)."""
    import torch
    from transformers import PrinterCallback, Trainer, set_seed

    from mergebench.training import read_pairs

    torch_device = check_device(device)
    if params["steps"] == 0 and params["epochs"] <= 0:
        raise ParameterError("expert trainer 'hf_trainer': give steps > 0, or epochs > 0 with steps = 0")
    if params["bf16"] and torch_device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ParameterError(f"expert trainer 'hf_trainer': the GPU of device '{device}' has no bfloat16; "
                             f"pass -p bf16=false")
    base, workdir = Path(base), Path(workdir)
    output_dir = workdir / TRAINER_DIR
    try:
        args = training_arguments(params, output_dir, torch_device)
    except ValueError as exc:  # a setting this machine or transformers version refuses
        raise ParameterError(f"expert trainer 'hf_trainer': {str(exc).splitlines()[0]}") from None
    pairs = read_pairs(data)
    if not pairs:
        raise InputError(f"{', '.join(map(str, data))}: no training rows")

    set_seed(params["seed"])
    model, tok, dtype, own_dropout = _load(base, params["dropout"])
    examples = _Examples([encode_example(tok, q, a, params["max_length"]) for q, a in pairs])
    use_cache = getattr(model.config, "use_cache", None)
    if params["gradient_checkpointing"] and use_cache is not None:
        model.config.use_cache = False  # incompatible with recomputation; restored below

    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=Collator(pad_id(tok)))
    trainer.remove_callback(PrinterCallback)  # disable_tqdm adds it: it would print every step's logs
    if on_step is not None:
        trainer.add_callback(_progress_callback(on_step))
    trainer.train()

    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:  # the main process only (under DDP)
        model = trainer.accelerator.unwrap_model(trainer.model)
        for f, value in own_dropout.items():
            setattr(model.config, f, value)
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.eval()
        model.to(dtype).save_pretrained(workdir, safe_serialization=True)
        tok.save_pretrained(workdir)
        shutil.rmtree(output_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    del trainer, model
    if not _distributed():  # a worker process runs more stages: leave no accelerate state (device, precision)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    if torch_device.type == "cuda":  # ... and give the GPU's memory back now
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return workdir


@hookimpl
def register_expert_trainers(register):
    register(ExpertTrainer(
        name="hf_trainer",
        description="Full fine-tuning of any Hugging Face causal LM with transformers' Trainer "
                    "(bf16, gradient checkpointing, GPUs; several through accelerate launch).",
        reference="Yadav et al. arXiv:2410.03617 (full fine-tuning); transformers Trainer",
        params=PARAMS,
        train=hf_train))


# ---- python -m mergebench.plugins.hf_trainer (for accelerate launch / torchrun) -------------------------

def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from mergebench.core.errors import MergebenchError

    parser = argparse.ArgumentParser(prog="python -m mergebench.plugins.hf_trainer",
                                     description="Fine-tune BASE on JSONL files with hf_trainer (one process per "
                                                 "GPU under accelerate launch or torchrun).")
    parser.add_argument("base", type=Path)
    parser.add_argument("data", type=Path, nargs="+")
    parser.add_argument("-o", "--output", type=Path, required=True, help="new or empty directory")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    try:
        given = {}
        for item in args.param:
            name, sep, value = item.partition("=")
            if not sep:
                raise ParameterError(f"-p {item!r}: expected NAME=VALUE")
            given[name.strip()] = value
        params = ExpertTrainer(name="hf_trainer", description="", params=PARAMS).resolve_params(given)
        if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
            raise InputError(f"{args.output}: exists and is not an empty directory")
        args.output.mkdir(parents=True, exist_ok=True)

        def report(step: int, total: int, loss: float) -> None:
            print(f"step {step}/{total} loss {loss:.4f}", flush=True)

        hf_train(args.base, list(args.data), params, args.output, on_step=report, device=args.device)
    except MergebenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through a subprocess
    raise SystemExit(main())
