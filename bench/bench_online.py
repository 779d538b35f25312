"""One online (GRPO) E-step step, rollouts and update, ours vs trl's (issue 28, item 4): our GRPO trainer
(policy/online.py: trl's GRPOTrainer with its rollouts sampled by our backend, `generation.backend`
static) against trl's GRPOTrainer sampling with HF `generate`, on the same model, prompts and batch, one
after the other in one process.

Workload: a Qwen2-0.5B-shaped model (random weights, saved in bf16 and loaded by trl in fp32 with bf16
autocast, as our steps do), a word-level tokenizer over its ids, prompts of 64 random tokens, 16 prompts
x 8 rollouts of 256 new tokens per step (random weights almost never sample EOS, so every rollout is
full length), no KL term. Its logits are as peaked as a trained model's (`--logit-std`, common.peaked),
so that ours draws about as many tokens by its exact top-p fallback as on a real model; the share is
reported. Both sample the trainer's fp32 weights as its bf16 autocast computes, as the online E-step
does (ours from bf16 casts made on the device at each rollout; trl unwraps the model for `generate`,
whose forward accelerate runs under autocast). The reward is a cheap function of the text
(distinct words over words): the RM's time is the same for both and is not what is compared. Each trainer runs `--warmup` steps (the
first includes the static engine's CUDA graph capture and its pieces' compilation), then `--steps` timed ones; step time is wall
time from trl's step begin to step end, generation time that of `_generate_single_turn`, both synced.
tok/s counts sampled completion tokens per second of step time.

On the GPU machine, with the wheels of `bash bench/carry.sh` carried in `.whl`:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:. && bash bench/device_layout.sh
    python3 bench/bench_online.py --out OUT                     # ~100 s on an H200
    python3 bench/bench_online.py --set generation.static.fallback_rows=16 --out OUT   # an engine setting of ours
    python3 bench/bench_online.py --device cpu --tiny           # a smoke run
    python3 bench/bench_online.py --record OUT/result.json      # here: RESULTS.md, results.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_training import build_tokenizer, save_model  # noqa: E402
from common import MODELS, TRAINED_LOGIT_STD, append_result, log, record_args  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(base, device: str):
    """`base` (a GRPO trainer class) timing each step and each rollout call, synced on the GPU."""
    from transformers import TrainerCallback

    class Timed(base):
        def _generate_single_turn(self, *a, **k):
            sync(device)
            start = time.perf_counter()
            completions, logprobs = super()._generate_single_turn(*a, **k)
            sync(device)
            self.gen_s.append(time.perf_counter() - start)
            self.gen_tokens.append(sum(len(c) for c in completions))
            return completions, logprobs

    class Steps(TrainerCallback):
        def __init__(self, trainer):
            self.trainer, self.start = trainer, 0.0

        def on_step_begin(self, *_, **__):
            sync(device)
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync(device)
            self.trainer.step_s.append(time.perf_counter() - self.start)

    def make(**kw):
        trainer = Timed(**kw)
        trainer.gen_s, trainer.gen_tokens, trainer.step_s = [], [], []
        trainer.add_callback(Steps(trainer))
        return trainer

    return make


def distinct_words(completions, **_) -> list[float]:
    return [len(set(c.split())) / max(1, len(c.split())) for c in completions]


def run_one(name: str, folder: Path, tok, prompts: list[str], a, device: str) -> dict:
    import datasets
    from coevolve.policy import online
    from trl import GRPOConfig, GRPOTrainer

    from coevolve.core.config import load_config

    args = GRPOConfig(
        output_dir=str(folder / name),
        learning_rate=1e-6,
        per_device_train_batch_size=a.prompts * a.n,
        gradient_accumulation_steps=1,
        num_generations=a.n,
        max_completion_length=a.max_new,
        temperature=0.8,
        top_p=0.95,
        beta=0.0,
        max_steps=a.warmup + a.steps,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    rows = datasets.Dataset.from_list([{"prompt": p} for p in prompts])
    base = online.GRPO if name == "ours" else GRPOTrainer
    trainer = timed(base, device)(
        model=str(folder / "model"), reward_funcs=distinct_words, args=args, train_dataset=rows, processing_class=tok
    )
    if name == "ours":
        cfg = load_config(
            ROOT / "configs" / "tiny.yaml",
            [
                f"device={device}",
                f"generation.backend={'static' if device == 'cuda' else 'hf'}",
                f"generation.batch_size={a.prompts * a.n}",
                f"sampling.max_new_tokens={a.max_new}",
                "sampling.temperature=0.8",
                "sampling.top_p=0.95",
                *a.set,
            ],
        )
        trainer.use_engine(cfg, 0)
    trainer.train()
    steady = slice(a.warmup, None)
    step_s, gen_s = statistics.median(trainer.step_s[steady]), statistics.median(trainer.gen_s[steady])
    out = {
        "first_step_s": round(trainer.step_s[0], 2),
        "first_gen_s": round(trainer.gen_s[0], 2),
        "step_s": round(step_s, 3),
        "gen_s": round(gen_s, 3),
        "gen_share": round(gen_s / step_s, 3),
        "tok_s": round(statistics.median(trainer.gen_tokens[steady]) / step_s, 1),
        "steps_s": [round(s, 3) for s in trainer.step_s],
        "gen_tokens": trainer.gen_tokens,
    }
    if name == "ours":
        out["top_p_fallback_share"] = round(trainer.top_p_fallback_share(), 4)
        out["deferred_steps"] = trainer.rollout_stats["deferred_steps"]
    del trainer
    gc.collect()  # the step callback and the trainer refer to each other
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny model, for a smoke run")
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--n", type=int, default=8, help="rollouts per prompt (trl's num_generations)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--logit-std", type=float, default=TRAINED_LOGIT_STD, help="the logits' std (0: as initialised, near-uniform)"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a coevolve config override for ours, as on the CLI (e.g. generation.static.fallback_rows=16)",
    )
    ap.add_argument("--out", type=Path)
    record_args(ap, "result.json", "bench_online.py")
    a = ap.parse_args()
    if a.record:
        return record(json.loads(a.record.read_text()), a.command)
    import transformers
    import trl

    t0 = time.perf_counter()
    model = "tiny" if a.tiny else "qwen2-0.5b"
    device = a.device
    folder = Path(tempfile.mkdtemp(prefix="bench-online-"))
    tok = build_tokenizer(MODELS[model]["vocab_size"])
    n_params = save_model(model, tok, folder / "model", logit_std=a.logit_std)
    g = torch.Generator().manual_seed(0)
    steps = a.warmup + a.steps
    prompts = [
        " ".join(f"t{i}" for i in torch.randint(0, len(tok) - 3, (a.prompt_len,), generator=g).tolist())
        for _ in range(a.prompts * steps)
    ]
    res = {
        "bench": "online",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "command": "python3 bench/bench_online.py " + " ".join(sys.argv[1:]),
        "model": f"{model} shape, random weights, {n_params / 1e6:.0f}M params",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "settings": {
            "prompts_per_step": a.prompts,
            "num_generations": a.n,
            "prompt_len": a.prompt_len,
            "max_new_tokens": a.max_new,
            "warmup_steps": a.warmup,
            "timed_steps": a.steps,
            "T": 0.8,
            "top_p": 0.95,
            "kl": 0.0,
            "logit_std": a.logit_std,
            "ours_overrides": a.set,
        },
    }
    for name in ("ours", "trl_hf"):
        res[name] = run_one(name, folder, tok, prompts, a, device)
        log(f"[{name}] {json.dumps(res[name])}")
    ours, trl_hf = res["ours"], res["trl_hf"]
    res.update(
        {
            "ours_step_s": ours["step_s"],
            "trl_hf_step_s": trl_hf["step_s"],
            "speedup": round(trl_hf["step_s"] / ours["step_s"], 2),
            "ours_first_step_s": ours["first_step_s"],
            "trl_hf_first_step_s": trl_hf["first_step_s"],
            "ours_tok_s": ours["tok_s"],
            "trl_hf_tok_s": trl_hf["tok_s"],
            "ours_gen_share": ours["gen_share"],
            "trl_gen_share": trl_hf["gen_share"],
            "ours_top_p_fallback_share": ours["top_p_fallback_share"],
            "bench_wall_s": round(time.perf_counter() - t0, 1),
        }
    )
    log("\n" + table(res))
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "result.json").write_text(json.dumps(res, indent=1))


def table(res: dict) -> str:
    lines = [
        "| trainer | step s (steady) | first step s | completion tok/s | generation share |",
        "|---|---|---|---|---|",
    ]
    for key, label in (("ours", "ours (GRPO, static engine)"), ("trl_hf", "trl GRPOTrainer, HF generate")):
        r = res[key]
        lines.append(
            f"| {label} | {r['step_s']:.2f} | {r['first_step_s']:.2f} | {r['tok_s']:,.0f} | {r['gen_share']:.2f} |"
        )
    ours = res["ours"]
    fallback = (
        f" Ours drew {ours['top_p_fallback_share']:.1%} of its tokens by the exact top-p fallback"
        f" ({ours['deferred_steps']} row-steps waited for it)."
        if "top_p_fallback_share" in ours
        else ""
    )
    return "\n".join(lines) + f"\n\nSpeedup (steady step time): {res['speedup']}x.{fallback}"


def record(res: dict, command: str) -> None:
    line = {
        k: res[k]
        for k in (
            "bench",
            "device",
            "date",
            "model",
            "ours_step_s",
            "trl_hf_step_s",
            "speedup",
            "ours_tok_s",
            "trl_hf_tok_s",
            "ours_gen_share",
            "trl_gen_share",
        )
    }
    line.update({k: v for k, v in res.items() if k not in line})
    line["command"] = command
    md = [
        f"\n## online: {res['date']}, {res['device']}",
        f"`{command}` (torch {res['torch']}, transformers {res['transformers']}, trl {res['trl']})",
        f"Model: {res['model']}. Settings: {json.dumps(res['settings'])}.",
        "",
        table(res),
        "",
    ]
    append_result(ROOT / "bench", line, md)
    log("\n".join(md))


if __name__ == "__main__":
    main()
