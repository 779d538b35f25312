"""Training throughput of the two trl trainers our steps run: DPOTrainer (e-step) and RewardTrainer
(rm-init, m-step), at trl's defaults vs with the settings our config turns on (issue 9, bench 2).

"ours" is trl itself: the same trainers, built by `coevolve.core.training.trainer_args` from a
TrainConfig whose fields and `extra` (passed to the trl config unchanged) hold the settings below.
Nothing in trl is patched. What differs from trl's defaults:
  - gradient checkpointing off (trl turns it on by default; ours is off by default already), and so
    32 pairs per step (trl's: DPO 16, RM 32), which amortizes the step's fixed host cost;
  - DPO: reference log-probs computed once before training (`precompute_ref_log_probs`, at 4x the
    batch), so a training step runs no reference forward; its time is added back in the steady
    rate (below); `*-inline-ref` configs keep trl's reference forward in each step,
    with the reference loaded as policy/e_step.py loads it (bf16 on a GPU; trl's own would be fp32);
    `*-sampled-ref` configs train as the e-step does when the sampler is the reference
    (policy/sampled_reference.py): token rows that carry their reference log-probs, taken while
    sampling (bench_generation.py --logprobs times that), so neither a pass nor a forward here; the
    rows' values are a uniform model's log-probs, which change no work;
  - length-grouped batches (`train_sampling_strategy: group_by_length` with a `length` column, which
    needs `remove_unused_columns: false`), so less of each batch is padding;
  - SDPA attention named explicitly (`model_init_kwargs`), bf16 autocast over fp32 master weights
    like trl's default (pure bf16 weights would be faster but loses updates at DPO's lr 7e-7);
  - optionally liger-kernel's fused RMSNorm / SwiGLU / RoPE (`use_liger_kernel`, a carried wheel), or
    torch.compile (`compile: true`, which pads lengths to multiples of 64; `*-compile` configs: run them
    before any liger config, and give them minutes: each compiles for 2-3 minutes with a cold cache).
trl 1.16 has no padding-free DPO (it warns and pads), so packing is not measured.

`--lora` runs two other configs instead: the e-step's DPO (`ours-dpo-lora`, its reference's log-probs
from sampling, the e-step's default on a GPU) and the m-step's RM (`ours-rm-lora`, a sequence classifier
of the same shape, its score head trained in full), each with `lora:` set to LoraSettings' defaults
(r 16, alpha 32, every linear layer), built as those steps build them (trainer_args, and lora_config's
peft config for the trainer). The frozen base is loaded in bf16 (`model_init_kwargs` dtype, through
`train.extra`; trl's default is fp32), the adapters stay fp32, and gradient checkpointing is on. MFU is
given twice: 6N, the usual count, which includes weight gradients the frozen weights never get, and 4N,
the model's own FLOPs under LoRA (forward 2N, the backward's input gradients 2N; the adapters' ~0.5% and
the recompute not counted).

Three rates per config, each labelled: loop (the timed steps alone), steady (the loop with DPO's reference
pass added back per token) and end to end (from building the trainer, the model's load, to the last timed
step: the reference pass, compiling and the warm-up steps included; a few dozen steps, so a compiled
config's end to end is mostly its compile). None of them includes the process start.

`--epoch` is what a real e-step pays: a whole DPO epoch (2,048 pairs, 64 steps of 32) timed from the
start of its own process, as an e-step is one: imports, model load, data, compiling and warm-up are all
inside `dpo_tok_s_end_to_end`, with the loop figure (`dpo_loop_tok_s`, the steps after the first 8)
beside it. Three processes in turn: trl's DPOTrainer with the same batch, checkpointing off and its
other defaults (`trl_dpo_tuned_tok_s`, end to end the same way); ours (the e-step's trainer: trainer_args
with `compile: true`, the sampled reference, length-grouped batches) on an empty compile cache (the
machine's first e-step: `dpo_tok_s_end_to_end_cold`, `compile_cold_s`); ours again on the cache it left
(every later e-step of the run and of later runs: `dpo_tok_s_end_to_end`, `compile_warm_s`, with its cache
hits and misses). Compile seconds are torch's own count (dynamo, AOTAutograd, Inductor and the backward's
first call, whether compiled or loaded from the cache); `steps_excess_s` (the steps' time beyond the loop
rate) is the same cost seen from the clock. 2,048 pairs make whole batches: a partial last batch would add
a compile, for a dynamic batch size, to the cold run.

Workload: a Qwen2-0.5B-shaped model (random weights, saved in bf16 and loaded by trl in fp32 as our
steps do), a word-level tokenizer made here over the ids, pairs of a prompt of 96-160 tokens and two
responses of 256..(511 - prompt) tokens (each sequence <= 512 tokens with its EOS). Trained tokens are
the non-pad tokens the model forwards (trl's own `num_tokens`: prompt+chosen and prompt+rejected).
MFU = 6 x params x tokens/s over the measured bf16 matmul rate (8192^3); for DPO also 8 x params,
counting the reference forward. `--profile` names configs whose GPU kernels are summed over 3 steps
after the timed ones (kernel time by kind against the step's wall time).

On the GPU machine, with the wheels of `bash bench/carry.sh liger` (`bash bench/carry.sh` for --epoch)
carried in `.whl`:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:. && bash bench/device_layout.sh
    python3 bench/bench_training.py --model qwen2-0.5b --out OUT      # ~200 s on an H100
    timeout 580 python3 bench/bench_training.py --epoch --model qwen2-0.5b --out $OUT   # ~350 s on an H200 (below)
    python3 bench/bench_training.py --model tiny --warmup 1 --steps 2  # a smoke run (CPU or GPU)
    python3 bench/bench_training.py --model llama3-8b --lora --dpo-batch 8 --rm-batch 8 --warmup 2 --steps 6 --out OUT
    python3 bench/bench_training.py --model tiny --lora --dpo-batch 4 --rm-batch 4 --warmup 1 --steps 2   # CPU smoke, ~40 s
    python3 bench/bench_training.py --epoch --model tiny --pairs 48 --batch 8 --max-len 64 --loop-skip 2   # CPU smoke, ~1.5 min
    python3 bench/bench_training.py --record OUT/result.json          # append to RESULTS.md, results.jsonl
The --epoch time, estimated from the compiled runs in RESULTS.md (not yet run): the parent ~20 s (imports,
the matmul rate, the model), trl ~85 s (1.8M tokens at ~30K tok/s), ours cold ~180 s (a compile of ~95 s and
a dynamic-shape recompile of ~50 s, then ~17 s of steps at ~110K tok/s), warm ~55 s. `--deadline-s` (520)
stops a measurement that would run past it; each one's result is saved as it ends.
The 8B LoRA run, measured on an H100 (bench/RESULTS.md, 2026-12-07 21:26): peaks of 20.2 GiB (DPO) and 29.3
(RM), ~1.1-1.3 s a step, about 75 s for the whole command (making, saving and loading the 16 GB model
included); building the random model holds 32 GB in fp32 for a moment, before it is saved in bf16.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import MODELS, TRAINED_LOGIT_STD, append_result, log, model_config, peaked, sections  # noqa: E402

MAX_LEN = 512


# -- model, tokenizer, data ---------------------------------------------------------------------------
def build_tokenizer(vocab: int):
    """Word-level: token i is the word `t{i}`; the last three ids are <unk>, <pad>, <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab - 3)}
    words.update({"<unk>": vocab - 3, "<pad>": vocab - 2, "<eos>": vocab - 1})
    tk = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def save_model(
    name: str, tok, folder: Path, model_type: str | None = None, logit_std: float = TRAINED_LOGIT_STD
) -> int:
    """A random-weight causal LM of the named shape (in `model_type`'s architecture, else the shape's),
    its logits as peaked as a trained model's (common.peaked), saved in bf16 with its tokenizer; returns
    params."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = model_config(
        name, model_type, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    peaked(model, logit_std).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return n_params


def make_pairs(n: int, vocab: int, seed: int = 0, max_len: int = MAX_LEN) -> list[dict]:
    """Token ids: prompt 96-160, chosen and rejected each 256..(511 - prompt), so that every
    prompt + response + EOS fits in 512 (lengths scaled for another `max_len`)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = int(torch.randint(max_len * 3 // 16, max_len * 5 // 16 + 1, (1,), generator=g))
        rc, rr = (int(x) for x in torch.randint(max_len // 2, max_len - p, (2,), generator=g))
        ids = torch.randint(0, vocab - 3, (p + rc + rr,), generator=g).tolist()
        rows.append({"prompt": ids[:p], "chosen": ids[p : p + rc], "rejected": ids[p + rc :]})
    return rows


def seq_tokens(row: dict) -> int:
    """Non-pad tokens the trainers forward for one pair: prompt+chosen+EOS and prompt+rejected+EOS."""
    return 2 * len(row["prompt"]) + len(row["chosen"]) + len(row["rejected"]) + 2


def dpo_dataset(rows: list[dict]):
    """trl's plain-text preference format (what policy/e_step.py passes); `length` (tokens of the
    longer sequence) is what length grouping sorts by."""
    import datasets

    text = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    return datasets.Dataset.from_list(
        [
            {
                "prompt": text(r["prompt"]),
                "chosen": " " + text(r["chosen"]),
                "rejected": " " + text(r["rejected"]),
                "length": len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) + 1,
            }
            for r in rows
        ]
    )


def rm_dataset(rows: list[dict], eos: int):
    """RewardTrainer's pre-tokenized format (it skips tokenizing when chosen_ids/rejected_ids exist)."""
    import datasets

    return datasets.Dataset.from_list(
        [
            {
                "chosen_ids": r["prompt"] + r["chosen"] + [eos],
                "rejected_ids": r["prompt"] + r["rejected"] + [eos],
                "length": len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) + 1,
            }
            for r in rows
        ]
    )


# -- measurements -------------------------------------------------------------------------------------
def matmul_rate(device: str) -> float | None:
    """bf16 8192^3 matrix product, median of 10 after 3 warm-ups, random data (TFLOP/s)."""
    if device != "cuda":
        return None
    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / statistics.median(times) / 1e12


PROFILE_STEPS = 3


def clock_callback(profile_from: int | None):
    """Marks (time, trained tokens so far) at the end of every optimizer step, after a device sync;
    with `profile_from`, records the GPU kernels of the PROFILE_STEPS steps after that step."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        trainer = None
        marks: list = []
        prof = None
        kernels = None

        def on_train_begin(self, args, state, control, **kw):
            self.marks = [(time.perf_counter(), 0)]

        def on_step_begin(self, args, state, control, **kw):
            if profile_from is not None and state.global_step == profile_from and torch.cuda.is_available():
                self.prof = profile(activities=[ProfilerActivity.CUDA])
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), self.trainer._total_train_tokens))
            if self.prof is not None and state.global_step == profile_from + PROFILE_STEPS:
                self.prof.__exit__(None, None, None)
                wall = (self.marks[-1][0] - self.marks[-1 - PROFILE_STEPS][0]) / PROFILE_STEPS
                self.kernels = kernel_profile(self.prof, PROFILE_STEPS, wall)
                self.prof = None

    return Clock()


def kernel_profile(prof, steps: int, wall_s: float) -> dict:
    """GPU kernel time per step by kind, against the step's wall time (profiler overhead included):
    a busy share far under 1 means the GPU waits on the host (launches, syncs, the data loader)."""
    kernels = {}
    counts = 0
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.count and not e.key.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            kernels[e.key] = kernels.get(e.key, 0.0) + t / steps / 1e3
            counts += e.count
    cats = {}
    for name, ms in kernels.items():
        cats[_category(name)] = cats.get(_category(name), 0.0) + ms
    busy = sum(kernels.values())
    return {
        "wall_ms_per_step": round(wall_s * 1e3, 1),
        "kernel_ms_per_step": round(busy, 1),
        "gpu_busy_share": round(busy / (wall_s * 1e3), 3),
        "kernels_per_step": round(counts / steps),
        "by_category_ms": {k: round(v, 1) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms": [(k[:120], round(v, 2)) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:12]],
    }


def _category(name: str) -> str:
    n = name.lower()
    if any(w in n for w in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "matmul")):
        return "matmul"
    if any(w in n for w in ("fmha", "flash", "attention", "efficient")):
        return "attention"
    if "adam" in n or "multi_tensor" in n:
        return "optimizer"
    if "norm" in n:
        return "rms norm"
    if "rope" in n or "rotary" in n:
        return "rope"
    if "silu" in n or "swiglu" in n or "glu" in n:
        return "swiglu"
    if "embedding" in n or "index" in n or "scatter" in n or "gather" in n:
        return "embedding / index"
    if "reduce" in n:
        return "reductions"
    if "copy" in n or "cast" in n:
        return "copies / casts"
    return "elementwise / other"


def steady(marks, warmup: int) -> dict:
    """Tokens/s over the steps after the first `warmup` (marks[0] is the start of training)."""
    (t0, n0), (t1, n1) = marks[warmup], marks[-1]
    steps = len(marks) - 1 - warmup
    return {
        "timed_steps": steps,
        "timed_s": round(t1 - t0, 3),
        "timed_tokens": n1 - n0,
        "tok_s": round((n1 - n0) / (t1 - t0), 1),
        "step_ms_median": round(
            1e3 * statistics.median(b[0] - a[0] for a, b in zip(marks[warmup:], marks[warmup + 1 :])), 1
        ),
        "first_steps_s": round(t0 - marks[0][0], 3),
    }


# -- trainer configs ----------------------------------------------------------------------------------
def our_args(
    kind: str,
    folder: Path,
    out: Path,
    batch: int,
    steps: int,
    liger: bool,
    reference: str = "pass",
    tuning: dict | None = None,
):
    """The trl config our steps build (coevolve.core.training.trainer_args) for these TrainConfig values,
    and the peft config they pass the trainer (core.training.lora_config; None without LoRA); `tuning` holds
    further fields of the trl config, set through `train.extra` as a user would, and `lora`, our
    TrainConfig's block."""
    from trl import DPOConfig, RewardConfig

    extra = {
        "train_sampling_strategy": "group_by_length",
        # the `length` column must reach the sampler, and trl's collators ignore columns they don't use
        "remove_unused_columns": False,
        "model_init_kwargs": {"attn_implementation": "sdpa"},
        "max_steps": steps,
    }
    if liger:
        # Liger's default also swaps the model's forward for its fused LM-head loss: that would break
        # the RM (a sequence classifier) and trl refuses it for DPO, which has its own fused head.
        extra.update(use_liger_kernel=True, liger_kernel_config={"fused_linear_cross_entropy": False})
    if kind == "dpo" and reference == "pass":
        extra.update(precompute_ref_log_probs=True, precompute_ref_batch_size=4 * batch)
    if kind == "dpo" and reference == "sampled":
        extra.update(precompute_ref_log_probs=True)
    tuning = dict(tuning or {})
    # torch.compile, LoRA and checkpointing are fields of our TrainConfig (`compile`, which pads to
    # multiples of 64; `lora`; `gradient_checkpointing`), not of `extra`.
    compiled = bool(tuning.pop("torch_compile", False))
    lora = tuning.pop("lora", None)
    checkpointing = tuning.pop("gradient_checkpointing", False)
    extra.update(tuning)
    fields = dict(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_length=MAX_LEN,
        gradient_checkpointing=checkpointing,
        compile=compiled,
        lora=lora,
        extra=extra,
    )
    try:
        from coevolve.core.config import DPOTrainConfig, RMTrainConfig
        from coevolve.core.training import lora_config, trainer_args

        cfg = our_config(folder)
        train = (DPOTrainConfig if kind == "dpo" else RMTrainConfig)(**fields)
        step_fields = {"beta": cfg.e_step.beta} if kind == "dpo" else {}
        return (
            trainer_args(DPOConfig if kind == "dpo" else RewardConfig, train, cfg, out, **step_fields),
            "coevolve.core.training.trainer_args",
            lora_config(train, folder, "CAUSAL_LM" if kind == "dpo" else "SEQ_CLS"),
        )
    except ImportError as err:
        if lora is not None:
            raise  # a full training by hand would not measure LoRA (and at 8B would not fit)
        # The same fields by hand, so that a broken import elsewhere in the tree costs no GPU run.
        log(f"[ours] coevolve import failed ({err}); building the trl config by hand")
        cls = DPOConfig if kind == "dpo" else RewardConfig
        lr = 7e-7 if kind == "dpo" else 2e-6
        args = dict(
            output_dir=str(out),
            learning_rate=lr,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            lr_scheduler_type="cosine",
            warmup_steps=0.1,
            max_length=MAX_LEN,
            gradient_checkpointing=checkpointing,
            bf16=torch.cuda.is_available(),
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=0,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            dataloader_num_workers=0,
            torch_compile=compiled,
            **extra,
        )
        if kind == "dpo":
            args["beta"] = 0.01
        return cls(**args), f"by hand ({err})", None


def our_config(folder: Path):
    """A coevolve config whose policy and RM are the model in `folder`."""
    from coevolve.core.config import build_config

    return build_config(
        {
            "policy": {"name_or_path": str(folder)},
            "rm": {"name_or_path": str(folder)},
            # The data section only has to load: the bench brings its own pairs.
            "data": {"task": "toy", "select_size": 16},
        },
        "bench",
    )


def our_reference(folder: Path):
    """DPO's reference as the e-step loads it (policy/e_step.py: frozen, in the policy's dtype)."""
    from coevolve.policy.e_step import reference_model

    return reference_model(our_config(folder), folder, folder)


def trl_args(kind: str, out: Path, batch: int, steps: int):
    """trl's defaults; only the batch, the run length and the side effects (no saving, no trackers) set."""
    from trl import DPOConfig, RewardConfig

    cls = DPOConfig if kind == "dpo" else RewardConfig
    return cls(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_steps=steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )


def sampled_dataset(rows: list[dict], eos: int, vocab: int):
    """The e-step's token rows when the reference's log-probs come from sampling (sampled_rows' output
    format): sampled completions end with their EOS."""
    import datasets

    uniform = -math.log(vocab)
    return datasets.Dataset.from_list(
        [
            {
                "prompt_ids": r["prompt"],
                "chosen_ids": r["chosen"] + [eos],
                "rejected_ids": r["rejected"] + [eos],
                "ref_chosen_logps": uniform * (len(r["chosen"]) + 1),
                "ref_rejected_logps": uniform * (len(r["rejected"]) + 1),
                "length": len(r["prompt"]) + max(len(r["chosen"]), len(r["rejected"])) + 1,
            }
            for r in rows
        ]
    )


def run(
    kind: str,
    label: str,
    args,
    folder: Path,
    tok,
    rows: list[dict],
    warmup: int,
    steps: int,
    profiled: bool,
    ref_model=None,
    sampled: bool = False,
    peft_config=None,
) -> dict:
    """One config's run; `ref_model` is DPO's reference, passed loaded (None: trl builds it); `sampled`:
    DPO on rows carrying their reference log-probs, as the e-step trains when the sampler is the reference;
    `peft_config`: LoRA adapters trained, as our steps pass it."""
    import trl.trainer.dpo_trainer as dpo_mod
    from transformers import PreTrainedModel
    from trl import DPOTrainer, RewardTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    clock = clock_callback(warmup + steps if profiled else None)
    fixed = {}

    # Time trl's one-off work of the precompute path: the reference pass and the model hash it keys its cache by.
    orig_pre, orig_hash = DPOTrainer._precompute_ref_logps, dpo_mod.hash_module

    def timed_pre(self, *a, **k):
        t = time.perf_counter()
        try:
            return orig_pre(self, *a, **k)
        finally:
            if device == "cuda":
                torch.cuda.synchronize()
            fixed["precompute_s"] = round(time.perf_counter() - t, 3)

    def timed_hash(m):
        t = time.perf_counter()
        try:
            return orig_hash(m)
        finally:
            fixed["model_hash_s"] = round(time.perf_counter() - t, 3)

    DPOTrainer._precompute_ref_logps, dpo_mod.hash_module = timed_pre, timed_hash
    # Before the trainer: peft rewrites `target_modules` into the list of every module it wrapped.
    lora = peft_config and f"r {peft_config.r}, alpha {peft_config.lora_alpha}, {peft_config.target_modules}"
    t0 = time.perf_counter()
    try:
        if sampled:
            from coevolve.policy.sampled_reference import SampledReferenceDPOTrainer

            trainer = SampledReferenceDPOTrainer(
                model=str(folder),
                args=args,
                train_dataset=sampled_dataset(rows, tok.eos_token_id, len(tok)),
                processing_class=tok,
                callbacks=[clock],
                peft_config=peft_config,
            )
        elif kind == "dpo":
            trainer = DPOTrainer(
                model=str(folder),
                ref_model=ref_model,
                args=args,
                train_dataset=dpo_dataset(rows),
                processing_class=tok,
                callbacks=[clock],
                peft_config=peft_config,
            )
        else:
            trainer = RewardTrainer(
                model=str(folder),
                args=args,
                train_dataset=rm_dataset(rows, tok.eos_token_id),
                processing_class=tok,
                callbacks=[clock],
                peft_config=peft_config,
            )
    finally:
        DPOTrainer._precompute_ref_logps, dpo_mod.hash_module = orig_pre, orig_hash
    init_s = time.perf_counter() - t0
    clock.trainer = trainer
    model = trainer.model
    # Padding share of the training batches (the reference pass has run already).
    pads = {"slots": 0, "tokens": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        pads["slots"] += batch["attention_mask"].numel()
        pads["tokens"] += int(batch["attention_mask"].sum())
        return batch

    trainer.data_collator = counting
    t1 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t1
    # Trainer built (model loaded), then every step to the last timed one: the reference pass,
    # compiling and the warm-up steps included; not the process start (bench_training --epoch has it).
    total = warmup + steps
    end_to_end = round(clock.marks[total][1] / (init_s + clock.marks[total][0] - t1), 1)
    res = {
        "label": label,
        "kind": kind,
        "batch_pairs": args.per_device_train_batch_size,
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "bf16": bool(args.bf16),
        "weights_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attention": getattr(model.config, "_attn_implementation", None),
        "sampler": getattr(args, "train_sampling_strategy", None),
        "liger": bool(getattr(args, "use_liger_kernel", False)),
        "optim": str(args.optim),
        "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "lora": lora,
        "init_s": round(init_s, 3),
        "train_s": round(train_s, 3),
        "steps": trainer.state.global_step,
        "pad_share": round(1 - pads["tokens"] / max(pads["slots"], 1), 4),
        **steady(clock.marks[: warmup + steps + 1], warmup),
        **fixed,
    }
    if clock.kernels:
        res["profile"] = clock.kernels
    if kind == "dpo":
        res["reference"] = (
            "sampled" if sampled else "precomputed" if args.precompute_ref_log_probs else "inline forward"
        )
        # `is None`, not `or`: a compiled module has no truth value. No local name for it: one would
        # keep the model alive past the teardown below (`models_left`, `mem_left_gib`).
        res["reference_dtype"] = str(
            next((model if trainer.ref_model is None else trainer.ref_model).parameters()).dtype
        ).replace("torch.", "")
        if not sampled and args.precompute_ref_log_probs and "precompute_s" in fixed:
            # One epoch: every trained pair had its reference pass once, before training.
            ref_tokens = sum(seq_tokens(r) for r in rows)
            res["precompute_tokens"] = ref_tokens
            res["precompute_tok_s"] = round(ref_tokens / fixed["precompute_s"], 1)
            res["steady_tok_s"] = round(1 / (1 / res["tok_s"] + fixed["precompute_s"] / ref_tokens), 1)
        else:
            res["steady_tok_s"] = res["tok_s"]
    else:
        res["steady_tok_s"] = res["tok_s"]
    res["tok_s_end_to_end"] = end_to_end
    if device == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    clock.trainer = trainer.data_collator = None
    del trainer, model, ref_model
    gc.collect()
    # What the teardown left alive, on any device: a model alive here may outlive this config and count
    # in the next one's peak memory.
    res["models_left"] = sum(isinstance(o, PreTrainedModel) for o in gc.get_objects())
    if device == "cuda":
        torch.cuda.empty_cache()
        res["mem_left_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return res


# -- a whole epoch from process start (--epoch) --------------------------------------------------------
# Each measurement is its own process, as an e-step is: ours with an empty compile cache (the machine's
# first e-step), ours again on the cache it left (every later e-step: the next iteration's, later runs'),
# and trl's DPOTrainer with the same batch, checkpointing off and its other defaults. trl first: its time is
# the most predictable, and the comparison needs it.
# ours_eager: the same trainer uncompiled, which tells what compiling buys at these mixed lengths.
EPOCH_RUNS = {"trl_tuned": "trl", "ours_cold": "ours", "ours_warm": "ours", "ours_eager": "ours-eager"}


def epoch(a) -> None:
    """The parent: the model and the pairs once, then each measurement in a child process, timed from its
    start (`--launched`) to the end of its epoch."""
    t_start = time.perf_counter()
    deadline = a.deadline_s or 520
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = header(device)
    res.update(mode="epoch", measurements={})
    section = sections(res, lambda: save(res, a.out))
    res["matmul_tflops"] = section("matmul", lambda: matmul_rate(device))
    work = a.work or Path(tempfile.mkdtemp(prefix="bench_training_epoch_"))
    folder, cache = work / "model", work / "compile-cache"
    shutil.rmtree(cache, ignore_errors=True)  # cold means empty, also in a --work used before
    tok = build_tokenizer(MODELS[a.model]["vocab_size"])
    res["params"] = save_model(a.model, tok, folder)
    if device == "cuda":
        torch.cuda.empty_cache()
    rows = make_pairs(a.pairs, MODELS[a.model]["vocab_size"], max_len=a.max_len)
    (work / "pairs.json").write_text(json.dumps(rows))
    res["model"] = (
        f"{a.model} shape, random weights, {res['params'] / 1e6:.0f}M params, saved bf16, trained as fp32 weights + bf16 autocast"
    )
    res["workload"] = {
        "pairs": a.pairs,
        "pairs_per_step": a.batch,
        "max_length": a.max_len,
        "mean_tokens_per_pair": round(statistics.mean(seq_tokens(r) for r in rows), 1),
        "loop_skips_steps": a.loop_skip,
    }
    log(json.dumps(res, indent=1))
    for label in a.epoch_runs.split(","):
        kind = EPOCH_RUNS[label]
        left = deadline - (time.perf_counter() - t_start)
        if left < 30:
            res["errors"][label] = f"skipped: the bench had run {deadline - left:.0f}s (--deadline-s {deadline:g})"
            continue
        r = section(label, lambda: epoch_run(a, kind, label, work, left))
        if r is not None:
            res["measurements"][label] = r
    summarize_epoch(res)
    res["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    save(res, a.out)
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)
    log("\n" + epoch_table(res))


def epoch_run(a, kind: str, label: str, work: Path, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--work", str(work), "--model", a.model]
    cmd += ["--batch", str(a.batch), "--max-len", str(a.max_len), "--loop-skip", str(a.loop_skip)]
    out = work / f"{label}.json"
    out.unlink(missing_ok=True)
    launched = time.time()
    with open(work / f"{label}.log", "w") as logfile:
        done = subprocess.run(
            [*cmd, "--launched", repr(launched), "--result", str(out)],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if done.returncode != 0:
        tail = (work / f"{label}.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{label} exited with {done.returncode}: " + " | ".join(tail))
    r = json.loads(out.read_text())
    r["process_wall_s"] = round(time.time() - launched, 2)  # to its exit: its teardown too
    return r


class EpochClock:
    """(wall time, trained tokens so far) at the end of every optimizer step, after a device sync."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                clock.marks.append((time.time(), clock.trainer._total_train_tokens))

        self.marks: list[tuple[float, int]] = []
        self.trainer = None
        self.callback = Callback()


def epoch_child(a) -> None:
    """One measurement: a whole DPO epoch over the pairs the parent wrote, in this process, timed from
    `--launched` (when the parent started it). ours: the e-step's trainer (core.training.trainer_args,
    compiled, the reference's log-probs from sampling), with the compile caches in work/compile-cache;
    trl: DPOTrainer with the same batch, checkpointing off, its defaults otherwise."""
    launched = a.launched
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ours = a.child.startswith("ours")
    if ours:
        from coevolve.core import compile_cache

        compile_cache.use(a.work / "compile-cache")  # as a step process does, before anything compiles
    import datasets
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    imported = time.time()
    folder, out = a.work / "model", a.work / f"trainer-{a.child}"
    rows = json.loads((a.work / "pairs.json").read_text())
    tok = build_tokenizer(MODELS[a.model]["vocab_size"])  # AutoTokenizer would read it as Qwen2's
    clock = EpochClock()
    if ours:
        from coevolve.policy.sampled_reference import SampledReferenceDPOTrainer

        from coevolve.core.config import DPOTrainConfig
        from coevolve.core.training import trainer_args

        cfg = our_config(folder)
        train = DPOTrainConfig(
            per_device_train_batch_size=a.batch,
            gradient_accumulation_steps=1,
            max_length=a.max_len,
            group_by_length=True,
            compile=a.child == "ours",
            extra={"model_init_kwargs": {"attn_implementation": "sdpa"}},
        )
        args = trainer_args(DPOConfig, train, cfg, out, beta=cfg.e_step.beta)
        args.precompute_ref_log_probs = True  # as policy/e_step.py sets it for sampled rows
        trainer = SampledReferenceDPOTrainer(
            model=str(folder),
            args=args,
            train_dataset=sampled_dataset(rows, tok.eos_token_id, len(tok)),
            processing_class=tok,
            callbacks=[clock.callback],
        )
    else:
        args = DPOConfig(
            output_dir=str(out),
            per_device_train_batch_size=a.batch,
            gradient_checkpointing=False,
            num_train_epochs=1,  # trl's default is 3
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            use_cpu=device == "cpu",
        )
        trainer = DPOTrainer(
            model=str(folder),
            args=args,
            train_dataset=dpo_dataset(rows),
            processing_class=tok,
            callbacks=[clock.callback],
        )
    clock.trainer = trainer
    built = time.time()
    trainer.train()
    ended = time.time()
    from coevolve.core import compile_cache

    marks, skip = clock.marks, min(a.loop_skip, len(clock.marks) - 2)
    tokens = marks[-1][1]
    (t0, n0), (t1, n1) = marks[skip], marks[-1]
    loop = (n1 - n0) / (t1 - t0)
    steps = [(b[0] - p[0], b[1] - p[1]) for p, b in zip([(built, 0), *marks[:-1]], marks)]
    r = {
        "trainer": "ours: core.training.trainer_args, SampledReferenceDPOTrainer"
        if ours
        else "trl DPOTrainer, defaults but batch and checkpointing",
        "compiled": bool(args.torch_compile),
        "gradient_checkpointing": bool(args.gradient_checkpointing),
        "batch_pairs": args.per_device_train_batch_size,
        "pad_to_multiple_of": getattr(args, "pad_to_multiple_of", None),
        "steps": len(marks),
        "tokens": tokens,
        # The headline: the whole epoch from the process's start, its imports, the model's load, the
        # data, compiling and the warm-up steps included.
        "tok_s_end_to_end": round(tokens / (ended - launched), 1),
        # Beside it: the steps after the first `loop_skip` alone.
        "loop_tok_s": round(loop, 1),
        "loop_steps": len(marks) - 1 - skip,
        "start_to_imported_s": round(imported - launched, 2),
        "start_to_trainer_built_s": round(built - launched, 2),
        "start_to_first_step_s": round(marks[0][0] - launched, 2),
        "epoch_s": round(ended - launched, 2),
        # Time the steps took beyond what the loop's rate gives for their tokens: compiling, warm-up.
        "steps_excess_s": round(sum(max(0.0, dt - dn / loop) for dt, dn in steps), 2),
        **compile_cache.stats(),
    }
    if device == "cuda":
        r["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    a.result.write_text(json.dumps(r, indent=1))
    log(json.dumps(r))


def summarize_epoch(res) -> None:
    """The `training` row: ours' epoch end to end with a warm cache (every e-step after the machine's
    first) and a cold one, the loop figures beside them, trl's with the same batch, compile seconds."""
    m = res["measurements"]
    warm, cold, trl = m.get("ours_warm"), m.get("ours_cold"), m.get("trl_tuned")
    get = lambda r, key: r and r.get(key)  # noqa: E731
    res["dpo_tok_s_end_to_end"] = get(warm, "tok_s_end_to_end")
    res["dpo_tok_s_end_to_end_cold"] = get(cold, "tok_s_end_to_end")
    res["dpo_tok_s_end_to_end_eager"] = get(m.get("ours_eager"), "tok_s_end_to_end")
    res["dpo_loop_tok_s"] = get(warm, "loop_tok_s")
    res["trl_dpo_tuned_tok_s"] = get(trl, "tok_s_end_to_end")
    res["trl_dpo_tuned_loop_tok_s"] = get(trl, "loop_tok_s")
    res["compile_cold_s"] = get(cold, "compile_s")
    res["compile_warm_s"] = get(warm, "compile_s")
    res["compile_warm_cache_hits"] = get(warm, "compile_cache_hits")
    res["compile_warm_cache_misses"] = get(warm, "compile_cache_misses")
    eager = m.get("ours_eager")
    runs = (
        ("dpo_speedup_end_to_end", warm),
        ("dpo_speedup_end_to_end_cold", cold),
        ("dpo_speedup_end_to_end_eager", eager),
    )
    for key, ours in runs:
        if ours and trl:
            res[key] = round(ours["tok_s_end_to_end"] / trl["tok_s_end_to_end"], 2)
    res["dpo_mfu_end_to_end"] = mfu(res, res["dpo_tok_s_end_to_end"])
    res["dpo_loop_mfu"] = mfu(res, res["dpo_loop_tok_s"])


def epoch_table(res) -> str:
    rows = [
        (
            "run",
            "compiled",
            "batch",
            "steps",
            "end-to-end tok/s",
            "loop tok/s",
            "epoch s",
            "to 1st step s",
            "compile s",
            "cache hits/misses",
            "peak GiB",
        )
    ]
    for label, r in res.get("measurements", {}).items():
        rows.append(
            (
                label,
                "yes" if r["compiled"] else "no",
                str(r["batch_pairs"]),
                str(r["steps"]),
                f"{r['tok_s_end_to_end']:,.0f}",
                f"{r['loop_tok_s']:,.0f}",
                str(r["epoch_s"]),
                str(r["start_to_first_step_s"]),
                str(r["compile_s"]) if r["compiled"] else "-",
                f"{r['compile_cache_hits']}/{r['compile_cache_misses']}" if r["compiled"] else "-",
                str(r.get("peak_mem_gib", "-")),
            )
        )
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(width[i]) for i, c in enumerate(r)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------------------
# Padded lengths in steps of 64: a few shapes instead of one per batch, for cuDNN's plans and for
# torch.compile, which compiles each new shape (and makes them dynamic from the second on).
PAD64 = {"pad_to_multiple_of": 64}
COMPILE = {"torch_compile": True, **PAD64}
# The frozen base in bf16 (trl loads fp32 unless `model_init_kwargs` names a dtype): the 8B shape's
# weights are then 16 GB, not 32, and only the adapters need fp32 (peft keeps them so). Checkpointing: at
# 8B, 8 pairs of <= 512 tokens keep ~50 GB of activations without it, ~2 GB of layer inputs with it.
LORA = {
    "lora": {},
    "gradient_checkpointing": True,
    "model_init_kwargs": {"attn_implementation": "sdpa", "dtype": "bfloat16"},
}
CONFIGS = {
    # name: (kind, ours?, liger?, DPO's reference log-probs: "pass" before training (trl's precompute),
    # "inline" forward in every step, "sampled" with the rows; further trl config fields)
    "trl-dpo": ("dpo", False, False, "inline", {}),
    "ours-dpo": ("dpo", True, False, "pass", {}),
    "trl-rm": ("rm", False, False, "", {}),
    "ours-rm": ("rm", True, False, "", {}),
    # what precomputing the reference buys: ours with the reference forward in every step
    "ours-dpo-inline-ref": ("dpo", True, False, "inline", {}),
    # torch.compile fuses the fp32-residual casts, norms and activations liger does not
    "ours-rm-compile": ("rm", True, False, "", COMPILE),
    "ours-dpo-compile-inline-ref": ("dpo", True, False, "inline", COMPILE),
    # the e-step's default when the sampling policy is the reference
    "ours-dpo-compile-sampled-ref": ("dpo", True, False, "sampled", COMPILE),
    # liger replaces transformers' Qwen2 RoPE, RMSNorm and MLP module-wide, so its runs come last
    "ours-dpo-liger": ("dpo", True, True, "pass", {}),
    "ours-dpo-liger-inline-ref": ("dpo", True, True, "inline", {}),
    "ours-dpo-liger-inline-ref-pad64": ("dpo", True, True, "inline", PAD64),
    # liger's fused LM-head DPO loss never holds the 152K-vocab logits; compile fuses the rest
    "ours-dpo-compile-liger-inline-ref": ("dpo", True, True, "inline", COMPILE),
    "ours-rm-liger": ("rm", True, True, "", {}),
    "ours-rm-liger-pad64": ("rm", True, True, "", PAD64),
    # `lora:` in the e-step's and the m-step's train config (LoraSettings' defaults), the DPO reference
    # from sampling as the e-step's default on a GPU
    "ours-dpo-lora": ("dpo", True, False, "sampled", LORA),
    "ours-rm-lora": ("rm", True, False, "", LORA),
}
DEFAULT_CONFIGS = "trl-dpo,ours-dpo,trl-rm,ours-rm,ours-dpo-liger,ours-dpo-liger-inline-ref,ours-rm-liger"
LORA_CONFIGS = "ours-dpo-lora,ours-rm-lora"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2-0.5b", choices=list(MODELS))
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"which to run, in this order, of: {','.join(CONFIGS)}")
    ap.add_argument("--lora", action="store_true", help=f"run LoRA's configs ({LORA_CONFIGS}) instead of --configs")
    ap.add_argument(
        "--profile",
        default="trl-dpo,ours-dpo-liger,ours-rm-liger",
        help=f"configs whose GPU kernels are profiled for {PROFILE_STEPS} steps after the timed ones",
    )
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--trl-dpo-batch", type=int, default=16)
    ap.add_argument("--trl-rm-batch", type=int, default=32)
    ap.add_argument("--dpo-batch", type=int, default=32, help="ours (pairs per step)")
    ap.add_argument("--rm-batch", type=int, default=32, help="ours (pairs per step)")
    ap.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="skip the configs not yet started after this long (default 330; --epoch: stop a child at 520)",
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--record", type=Path, default=None, help="append a saved result.json to bench/RESULTS.md and results.jsonl"
    )
    ap.add_argument("--epoch", action="store_true", help="a whole DPO epoch from process start, cold and warm cache")
    ap.add_argument("--pairs", type=int, default=2048, help="--epoch: pairs in the epoch")
    ap.add_argument("--batch", type=int, default=32, help="--epoch: pairs per step, ours and trl alike")
    ap.add_argument("--max-len", type=int, default=MAX_LEN, help="--epoch: longest sequence (lengths scale with it)")
    ap.add_argument(
        "--epoch-runs",
        default="trl_tuned,ours_eager,ours_cold,ours_warm",
        help=f"--epoch: which, in order, of {','.join(EPOCH_RUNS)}",
    )
    ap.add_argument("--loop-skip", type=int, default=8, help="--epoch: first steps left out of the loop figure")
    ap.add_argument(
        "--child", choices=sorted(set(EPOCH_RUNS.values())), help=argparse.SUPPRESS
    )  # one --epoch measurement
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.record:
        return record(json.loads(args.record.read_text()))
    if args.child:
        return epoch_child(args)
    if args.epoch:
        return epoch(args)
    if args.lora:
        args.configs = LORA_CONFIGS

    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = header(device)
    res["runs"] = {}
    section = sections(res, lambda: save(res, args.out))

    res["matmul_tflops"] = section("matmul", lambda: matmul_rate(device))
    work = Path(tempfile.mkdtemp(prefix="bench_training_"))
    folder = work / "model"
    tok = build_tokenizer(MODELS[args.model]["vocab_size"])
    n_params = save_model(args.model, tok, folder)
    res["params"] = n_params
    res["lora"] = args.lora
    trained = "LoRA adapters (fp32) on the bf16 base" if args.lora else "fp32 weights"
    res["model"] = (
        f"{args.model} shape, random weights, {n_params / 1e6:.0f}M params, saved bf16, trained as {trained} + bf16 autocast"
    )
    profiled = set(args.profile.split(",")) if args.profile else set()
    total = args.warmup + args.steps
    batches = [args.trl_dpo_batch, args.trl_rm_batch, args.dpo_batch, args.rm_batch]
    rows = make_pairs((total + PROFILE_STEPS) * max(batches), MODELS[args.model]["vocab_size"])
    res["workload"] = {
        "prompt_len": "96-160",
        "response_len": "256..(511 - prompt), each sequence <= 512 with EOS",
        "max_length": MAX_LEN,
        "mean_tokens_per_pair": round(statistics.mean(seq_tokens(r) for r in rows), 1),
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
    }
    log(json.dumps(res, indent=1))

    batch_of = {
        ("dpo", False): args.trl_dpo_batch,
        ("rm", False): args.trl_rm_batch,
        ("dpo", True): args.dpo_batch,
        ("rm", True): args.rm_batch,
    }
    for name in args.configs.split(","):
        kind, ours, liger, reference, tuning = CONFIGS[name]
        if time.perf_counter() - t_start > (args.deadline_s or 330):
            res["errors"][name] = f"skipped: the bench had run {time.perf_counter() - t_start:.0f}s (--deadline-s)"
            continue
        if liger and res["liger_kernel"] is None:
            res["errors"][name] = "skipped: liger-kernel is not installed"
            continue
        batch = batch_of[(kind, ours)]
        out = work / name
        n_steps = total + (PROFILE_STEPS if name in profiled else 0)
        if ours:
            trainer_cfg, via, peft = our_args(kind, folder, out, batch, n_steps, liger, reference, tuning)
        else:
            trainer_cfg, via, peft = trl_args(kind, out, batch, n_steps), "trl defaults", None
        ref = (lambda: our_reference(folder)) if kind == "dpo" and ours and reference == "inline" else (lambda: None)
        r = section(
            name,
            lambda: run(
                kind,
                name,
                trainer_cfg,
                folder,
                tok,
                rows[: n_steps * batch],
                args.warmup,
                args.steps,
                name in profiled,
                ref(),
                sampled=reference == "sampled",
                peft_config=peft,
            ),
        )
        if r is not None:
            r["config_via"] = via
            r["tuning"] = tuning
            res["runs"][name] = r
            save(res, args.out)  # a device call may end before the next config does
        shutil.rmtree(out, ignore_errors=True)

    summarize(res)
    res["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    save(res, args.out)
    shutil.rmtree(work, ignore_errors=True)
    log("\n" + table(res))


def header(device: str) -> dict:
    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()
    res = {
        "bench": "training",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "command": "python3 bench/bench_training.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "errors": {},
    }
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        res["liger_kernel"] = version("liger-kernel")
    except ImportError:
        res["liger_kernel"] = None
    return res


def mfu(res, tok_s, per_token=6):
    rate = res.get("matmul_tflops")
    return round(per_token * res["params"] * tok_s / (rate * 1e12), 4) if rate and tok_s else None


def summarize(res):
    """Headline fields: the best 'ours' run of each kind (steady: after the warm-up, DPO's reference pass
    added back) against trl's defaults, and that run's end-to-end rate beside it."""
    runs = res["runs"]
    for r in runs.values():
        r["mfu"] = mfu(res, r["steady_tok_s"])
        if r.get("lora"):
            # The frozen weights get no weight gradient: forward 2N + the backward's input gradients 2N.
            r["mfu_4n"] = mfu(res, r["steady_tok_s"], 4)
        if r["kind"] == "dpo" and r["reference"] != "sampled":  # a sampled reference has no forward here to count
            r["mfu_with_ref"] = mfu(res, r["steady_tok_s"], 8)
            r["loop_mfu"] = mfu(res, r["tok_s"])
    for kind in ("dpo", "rm"):
        base = runs.get(f"trl-{kind}")
        ours = [r for n, r in runs.items() if r["kind"] == kind and n.startswith("ours")]
        best = max(ours, key=lambda r: r["steady_tok_s"], default=None)
        res[f"{kind}_tok_s"] = best and best["steady_tok_s"]
        res[f"{kind}_run_tok_s_end_to_end"] = best and best["tok_s_end_to_end"]
        res[f"{kind}_config"] = best and best["label"]
        res[f"trl_{kind}_tok_s"] = base and base["steady_tok_s"]
        res[f"{kind}_mfu"] = best and best["mfu"]
        res[f"{kind}_mfu_4n"] = best and best.get("mfu_4n")
        res[f"trl_{kind}_mfu"] = base and base["mfu"]
        if kind == "dpo":
            res["dpo_mfu_with_ref"] = best and best.get("mfu_with_ref")
            res["dpo_loop_tok_s"] = best and best["tok_s"]
        if best and base:
            res[f"{kind}_speedup"] = round(best["steady_tok_s"] / base["steady_tok_s"], 2)


def save(res, out: Path | None):
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(res, indent=1))
        if res.get("runs"):
            (out / "result.md").write_text(table(res))


def table(res) -> str:
    rows = [
        (
            "config",
            "batch",
            "ckpt",
            "ref",
            "sampler",
            "liger",
            "loop tok/s",
            "steady tok/s",
            "end-to-end tok/s",
            "MFU (6N)",
            "MFU (8N)",
            "MFU (4N, LoRA)",
            "peak GiB",
            "notes",
        )
    ]
    for r in res.get("runs", {}).values():
        note = (
            (f"LoRA {r['lora']}, {r['trained_params'] / 1e6:.3g}M params trained, " if r.get("lora") else "")
            + "".join(f"{k} {v}, " for k, v in r.get("tuning", {}).items() if k != "lora")
            + f"step {r['step_ms_median']} ms, padding {r['pad_share']:.0%}"
        )
        if r.get("profile"):
            note += f", GPU busy {r['profile']['gpu_busy_share']:.0%} of the step"
        if r.get("precompute_s") is not None:
            note += f"; ref pass {r['precompute_s']}s ({r['precompute_tok_s']:,.0f} tok/s), model hash {r.get('model_hash_s')}s"
        rows.append(
            (
                r["label"],
                str(r["batch_pairs"]),
                "on" if r["gradient_checkpointing"] else "off",
                {"precomputed": "pre", "inline forward": "inline", "sampled": "sampled"}.get(r.get("reference"), "-")
                + (" bf16" if r.get("reference_dtype") == "bfloat16" else ""),
                "grouped" if r.get("sampler") == "group_by_length" else "random",
                "yes" if r["liger"] else "no",
                f"{r['tok_s']:,.0f}",
                # results saved before the end-to-end rate was: their "end_to_end_tok_s" is the steady one
                f"{r.get('steady_tok_s', r.get('end_to_end_tok_s')):,.0f}",
                f"{r['tok_s_end_to_end']:,.0f}" if "tok_s_end_to_end" in r else "-",
                f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-",
                f"{r['mfu_with_ref']:.1%}" if r.get("mfu_with_ref") is not None else "-",
                f"{r['mfu_4n']:.1%}" if r.get("mfu_4n") is not None else "-",
                str(r.get("peak_mem_gib", "-")),
                note,
            )
        )
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(width[i]) for i, c in enumerate(r)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    return "\n".join(lines)


def record(res) -> None:
    """Append one result to bench/RESULTS.md (human) and bench/results.jsonl (one line)."""
    bench = ROOT / "bench"
    if res.get("mode") == "epoch":
        return record_epoch(res, bench)
    keys = (
        "bench",
        "device",
        "date",
        "model",
        "dpo_tok_s",
        "trl_dpo_tok_s",
        "dpo_mfu",
        "rm_tok_s",
        "trl_rm_tok_s",
        "rm_mfu",
    )
    line = {k: res.get(k) for k in keys}
    line.update({k: v for k, v in res.items() if k not in line})
    md = [
        f"\n## training: {res['date']}, {res['device']}",
        f"`{res['command']}` (torch {res['torch']}, transformers {res['transformers']}, trl {res['trl']}, liger-kernel {res.get('liger_kernel')})",
        f"Model: {res['model']}. Workload: {json.dumps(res['workload'])}. Matmul rate (bf16 8192^3): {res.get('matmul_tflops') and round(res['matmul_tflops'])} TFLOP/s.",
        "",
        table(res),
        "",
        "Loop: the timed steps alone. Steady: the same with DPO's reference pass added back (per token). End to end: "
        "from building the trainer (the model's load) through the last timed step, with the reference pass, compiling "
        "and the warm-up steps; not the process start (`--epoch` times a whole epoch from it).",
    ]
    if res.get("lora"):
        md.append(
            f"LoRA, no trl baseline: DPO ({res.get('dpo_config')}) {res.get('dpo_tok_s')} tok/s ({res.get('dpo_run_tok_s_end_to_end')} "
            f"end to end), MFU {res.get('dpo_mfu')} at 6N, {res.get('dpo_mfu_4n')} at 4N. RM ({res.get('rm_config')}) "
            f"{res.get('rm_tok_s')} tok/s ({res.get('rm_run_tok_s_end_to_end')} end to end), MFU {res.get('rm_mfu')} at 6N, "
            f"{res.get('rm_mfu_4n')} at 4N. 6N is the usual 6 x params per token, which counts weight gradients the frozen "
            "weights never get (with checkpointing it is about the FLOPs run: forward, its recompute, the input gradients); "
            "4N counts the model's own: forward 2N + the backward's input gradients 2N."
        )
    else:
        md.append(
            f"DPO: ours ({res.get('dpo_config')}) {res.get('dpo_tok_s')} tok/s steady ({res.get('dpo_run_tok_s_end_to_end')} end to end) vs trl defaults {res.get('trl_dpo_tok_s')}: "
            f"{res.get('dpo_speedup')}x, MFU {res.get('dpo_mfu')} (8N: {res.get('dpo_mfu_with_ref')}) vs {res.get('trl_dpo_mfu')}. "
            f"RM: ours ({res.get('rm_config')}) {res.get('rm_tok_s')} vs {res.get('trl_rm_tok_s')}: {res.get('rm_speedup')}x, MFU {res.get('rm_mfu')} vs {res.get('trl_rm_mfu')}."
        )
    append_result(bench, line, md, res.get("errors"))


def record_epoch(res, bench: Path) -> None:
    summarize_epoch(res)  # again: a result saved before a figure was added to it gets it too
    keys = (
        "bench",
        "mode",
        "device",
        "date",
        "model",
        "dpo_tok_s_end_to_end",
        "dpo_loop_tok_s",
        "trl_dpo_tuned_tok_s",
        "dpo_speedup_end_to_end",
        "dpo_tok_s_end_to_end_cold",
        "compile_cold_s",
        "compile_warm_s",
    )
    line = {k: res.get(k) for k in keys}
    line.update({k: v for k, v in res.items() if k not in line})
    md = [
        f"\n## training, a whole DPO epoch from process start: {res['date']}, {res['device']}",
        f"`{res['command']}` (torch {res['torch']}, transformers {res['transformers']}, trl {res['trl']})",
        f"Model: {res['model']}. Workload: {json.dumps(res['workload'])}. Matmul rate (bf16 8192^3): {res.get('matmul_tflops') and round(res['matmul_tflops'])} TFLOP/s.",
        "",
        epoch_table(res),
        "",
        "End to end: the epoch's trained tokens over the time from the process's start to the epoch's end (imports, "
        "model load, data, compiling, warm-up included). Loop: the steps after the first "
        f"{res['workload']['loop_skips_steps']} alone. Compile s: torch's own count (dynamo, AOTAutograd, Inductor, "
        "the backward's first call), compiling or loading from the cache.",
    ]
    if res.get("dpo_tok_s_end_to_end"):
        md.append(
            f"DPO end to end, warm cache (every e-step after a machine's first): ours {res.get('dpo_tok_s_end_to_end')} tok/s "
            f"vs trl with the same batch and no checkpointing {res.get('trl_dpo_tuned_tok_s')}: {res.get('dpo_speedup_end_to_end')}x "
            f"(loop: {res.get('dpo_loop_tok_s')} vs {res.get('trl_dpo_tuned_loop_tok_s')}). Cold cache (a machine's first): "
            f"{res.get('dpo_tok_s_end_to_end_cold')} tok/s, {res.get('dpo_speedup_end_to_end_cold')}x. "
            f"Compile: {res.get('compile_cold_s')} s cold, {res.get('compile_warm_s')} s warm "
            f"({res.get('compile_warm_cache_hits')} cache hits, {res.get('compile_warm_cache_misses')} misses)."
        )
    if res.get("dpo_tok_s_end_to_end_eager"):
        md.append(
            f"Uncompiled (ours_eager): {res['dpo_tok_s_end_to_end_eager']} tok/s end to end, "
            f"{res.get('dpo_speedup_end_to_end_eager')}x trl's."
        )
    append_result(bench, line, md, res.get("errors"))


if __name__ == "__main__":
    main()
