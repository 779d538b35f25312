"""Training throughput of the two trl trainers our steps run: DPOTrainer (e-step) and RewardTrainer
(rm-init, m-step), at trl's defaults vs with the settings our config turns on (issue 9, bench 2).

"ours" is trl itself: the same trainers, built by `coevolve.core.training.trainer_args` from a
TrainConfig whose fields and `extra` (passed to the trl config unchanged) hold the settings below.
Nothing in trl is patched. What differs from trl's defaults:
  - gradient checkpointing off (trl turns it on by default; ours is off by default already), and so
    32 pairs per step (trl's: DPO 16, RM 32), which amortizes the step's fixed host cost;
  - DPO: reference log-probs computed once before training (`precompute_ref_log_probs`, at 4x the
    batch), so a training step runs no reference forward; its time is added back in the end-to-end
    rate, which is the headline; `*-inline-ref` configs keep trl's reference forward in each step,
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
    torch.compile (`torch_compile`) with lengths padded to multiples of 64 (`*-compile` configs; run them
    before any liger config, and give them minutes: each compiles for 2-3 minutes with a cold cache).
trl 1.16 has no padding-free DPO (it warns and pads), so packing is not measured.

Workload: a Qwen2-0.5B-shaped model (random weights, saved in bf16 and loaded by trl in fp32 as our
steps do), a word-level tokenizer made here over the ids, pairs of a prompt of 96-160 tokens and two
responses of 256..(511 - prompt) tokens (each sequence <= 512 tokens with its EOS). Trained tokens are
the non-pad tokens the model forwards (trl's own `num_tokens`: prompt+chosen and prompt+rejected).
MFU = 6 x params x tokens/s over the measured bf16 matmul rate (8192^3); for DPO also 8 x params,
counting the reference forward. `--profile` names configs whose GPU kernels are summed over 3 steps
after the timed ones (kernel time by kind against the step's wall time).

On the GPU machine, with the wheels of `bash bench/carry.sh liger` carried in `.whl`:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:.
    python3 bench/bench_training.py --model qwen2-0.5b --out OUT      # ~200 s on an H100
    python3 bench/bench_training.py --model tiny --warmup 1 --steps 2  # a smoke run (CPU or GPU)
    python3 bench/bench_training.py --record OUT/result.json          # append to RESULTS.md, results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import MODELS, append_result, log, sections  # noqa: E402  (bench/ is on sys.path when a bench runs)

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


def save_model(name: str, tok, folder: Path, model_type: str = "qwen2") -> int:
    """A random-weight causal LM of the named shape and architecture, saved in bf16 with its tokenizer;
    returns params."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, **MODELS[name], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    return n_params


def make_pairs(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Token ids: prompt 96-160, chosen and rejected each 256..(511 - prompt), so that every
    prompt + response + EOS fits in 512."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = int(torch.randint(96, 161, (1,), generator=g))
        rc, rr = (int(x) for x in torch.randint(256, MAX_LEN - p, (2,), generator=g))
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
    """The trl config our steps build (coevolve.core.training.trainer_args) for these TrainConfig values;
    `tuning` holds further fields of the trl config, set through `train.extra` as a user would."""
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
    extra.update(tuning or {})
    fields = dict(
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        max_length=MAX_LEN,
        gradient_checkpointing=False,
        extra=extra,
    )
    try:
        from coevolve.core.config import DPOTrainConfig, RMTrainConfig
        from coevolve.core.training import trainer_args

        cfg = our_config(folder)
        train = (DPOTrainConfig if kind == "dpo" else RMTrainConfig)(**fields)
        step_fields = {"beta": cfg.e_step.beta} if kind == "dpo" else {}
        return trainer_args(
            DPOConfig if kind == "dpo" else RewardConfig, train, cfg, out, **step_fields
        ), "coevolve.core.training.trainer_args"
    except ImportError as err:
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
            gradient_checkpointing=False,
            bf16=torch.cuda.is_available(),
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=0,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
            dataloader_num_workers=0,
            **extra,
        )
        if kind == "dpo":
            args["beta"] = 0.01
        return cls(**args), f"by hand ({err})"


def our_config(folder: Path):
    """A coevolve config whose policy and RM are the model in `folder`."""
    from coevolve.core.config import build_config

    return build_config(
        {"policy": {"name_or_path": str(folder)}, "rm": {"name_or_path": str(folder)}, "data": {"task": "toy"}}, "bench"
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
) -> dict:
    """One config's run; `ref_model` is DPO's reference, passed loaded (None: trl builds it); `sampled`:
    DPO on rows carrying their reference log-probs, as the e-step trains when the sampler is the reference."""
    import trl.trainer.dpo_trainer as dpo_mod
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
            )
        elif kind == "dpo":
            trainer = DPOTrainer(
                model=str(folder),
                ref_model=ref_model,
                args=args,
                train_dataset=dpo_dataset(rows),
                processing_class=tok,
                callbacks=[clock],
            )
        else:
            trainer = RewardTrainer(
                model=str(folder),
                args=args,
                train_dataset=rm_dataset(rows, tok.eos_token_id),
                processing_class=tok,
                callbacks=[clock],
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
        # `is None`, not `or`: a compiled module has no truth value.
        reference = model if trainer.ref_model is None else trainer.ref_model
        res["reference_dtype"] = str(next(reference.parameters()).dtype).replace("torch.", "")
        if not sampled and args.precompute_ref_log_probs and "precompute_s" in fixed:
            # One epoch: every trained pair had its reference pass once, before training.
            ref_tokens = sum(seq_tokens(r) for r in rows)
            res["precompute_tokens"] = ref_tokens
            res["precompute_tok_s"] = round(ref_tokens / fixed["precompute_s"], 1)
            res["end_to_end_tok_s"] = round(1 / (1 / res["tok_s"] + fixed["precompute_s"] / ref_tokens), 1)
        else:
            res["end_to_end_tok_s"] = res["tok_s"]
    else:
        res["end_to_end_tok_s"] = res["tok_s"]
    if device == "cuda":
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    clock.trainer = trainer.data_collator = None
    del trainer, model, ref_model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        res["mem_left_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    return res


# -- main ---------------------------------------------------------------------------------------------
# Padded lengths in steps of 64: a few shapes instead of one per batch, for cuDNN's plans and for
# torch.compile, which compiles each new shape (and makes them dynamic from the second on).
PAD64 = {"pad_to_multiple_of": 64}
COMPILE = {"torch_compile": True, **PAD64}
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
}
DEFAULT_CONFIGS = "trl-dpo,ours-dpo,trl-rm,ours-rm,ours-dpo-liger,ours-dpo-liger-inline-ref,ours-rm-liger"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2-0.5b", choices=list(MODELS))
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"which to run, in this order, of: {','.join(CONFIGS)}")
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
    ap.add_argument("--deadline-s", type=float, default=330, help="skip the configs not yet started after this long")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--record", type=Path, default=None, help="append a saved result.json to bench/RESULTS.md and results.jsonl"
    )
    args = ap.parse_args()
    if args.record:
        return record(json.loads(args.record.read_text()))

    import datasets
    import transformers
    import trl

    datasets.disable_progress_bars()
    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = {
        "bench": "training",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "command": "python3 bench/bench_training.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "errors": {},
        "runs": {},
    }
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        res["liger_kernel"] = version("liger-kernel")
    except ImportError:
        res["liger_kernel"] = None

    section = sections(res, lambda: save(res, args.out))

    res["matmul_tflops"] = section("matmul", lambda: matmul_rate(device))
    work = Path(tempfile.mkdtemp(prefix="bench_training_"))
    folder = work / "model"
    tok = build_tokenizer(MODELS[args.model]["vocab_size"])
    n_params = save_model(args.model, tok, folder)
    res["params"] = n_params
    res["model"] = (
        f"{args.model} shape, random weights, {n_params / 1e6:.0f}M params, saved bf16, trained as fp32 weights + bf16 autocast"
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
        if time.perf_counter() - t_start > args.deadline_s:
            res["errors"][name] = f"skipped: the bench had run {time.perf_counter() - t_start:.0f}s (--deadline-s)"
            continue
        if liger and res["liger_kernel"] is None:
            res["errors"][name] = "skipped: liger-kernel is not installed"
            continue
        batch = batch_of[(kind, ours)]
        out = work / name
        n_steps = total + (PROFILE_STEPS if name in profiled else 0)
        if ours:
            trainer_cfg, via = our_args(kind, folder, out, batch, n_steps, liger, reference, tuning)
        else:
            trainer_cfg, via = trl_args(kind, out, batch, n_steps), "trl defaults"
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


def mfu(res, tok_s, per_token=6):
    rate = res.get("matmul_tflops")
    return round(per_token * res["params"] * tok_s / (rate * 1e12), 4) if rate and tok_s else None


def summarize(res):
    """Headline fields: the best 'ours' run of each kind (end to end) against trl's defaults."""
    runs = res["runs"]
    for r in runs.values():
        r["mfu"] = mfu(res, r["end_to_end_tok_s"])
        if r["kind"] == "dpo" and r["reference"] != "sampled":  # a sampled reference has no forward here to count
            r["mfu_with_ref"] = mfu(res, r["end_to_end_tok_s"], 8)
            r["loop_mfu"] = mfu(res, r["tok_s"])
    for kind in ("dpo", "rm"):
        base = runs.get(f"trl-{kind}")
        ours = [r for n, r in runs.items() if r["kind"] == kind and n.startswith("ours")]
        best = max(ours, key=lambda r: r["end_to_end_tok_s"], default=None)
        res[f"{kind}_tok_s"] = best and best["end_to_end_tok_s"]
        res[f"{kind}_config"] = best and best["label"]
        res[f"trl_{kind}_tok_s"] = base and base["end_to_end_tok_s"]
        res[f"{kind}_mfu"] = best and best["mfu"]
        res[f"trl_{kind}_mfu"] = base and base["mfu"]
        if kind == "dpo":
            res["dpo_mfu_with_ref"] = best and best.get("mfu_with_ref")
            res["dpo_loop_tok_s"] = best and best["tok_s"]
        if best and base:
            res[f"{kind}_speedup"] = round(best["end_to_end_tok_s"] / base["end_to_end_tok_s"], 2)


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
            "end-to-end tok/s",
            "MFU (6N)",
            "MFU (8N)",
            "peak GiB",
            "notes",
        )
    ]
    for r in res.get("runs", {}).values():
        note = (
            "".join(f"{k} {v}, " for k, v in r.get("tuning", {}).items())
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
                f"{r['end_to_end_tok_s']:,.0f}",
                f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-",
                f"{r['mfu_with_ref']:.1%}" if r.get("mfu_with_ref") is not None else "-",
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
        f"DPO: ours ({res.get('dpo_config')}) {res.get('dpo_tok_s')} tok/s end to end vs trl defaults {res.get('trl_dpo_tok_s')}: "
        f"{res.get('dpo_speedup')}x, MFU {res.get('dpo_mfu')} (8N: {res.get('dpo_mfu_with_ref')}) vs {res.get('trl_dpo_mfu')}. "
        f"RM: ours ({res.get('rm_config')}) {res.get('rm_tok_s')} vs {res.get('trl_rm_tok_s')}: {res.get('rm_speedup')}x, MFU {res.get('rm_mfu')} vs {res.get('trl_rm_mfu')}.",
    ]
    append_result(bench, line, md, res.get("errors"))


if __name__ == "__main__":
    main()
