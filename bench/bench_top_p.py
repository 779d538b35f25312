"""Top-p on a real model's logits (issue 27): how often the nucleus fits the sampler's 64 candidates, and
the static backend vs HF `generate` on the same model, prompts and sampling parameters.

SmolLM2-135M-Instruct (a plain HF folder, e.g. the GGUF dequantised by bench_real.py) answers the
`instruct` task's prompts in its chat template at the shipped sampling settings (configs/smollm2-gpu.yaml:
T 0.8, top-p 0.95). `top_p_exact_share` is the share of sampled tokens whose nucleus fitted the 64
candidates; the others were drawn by the exact fallback (sampling.py), past whose budget rows wait a step
(`deferred_steps`, row-steps spent waiting). Recorded as a `generation` row with `model: smollm2`.

    python3 bench/bench_top_p.py --model-path /tmp/smollm2 --out OUT          # on a GPU, ~1 min
    python3 bench/bench_top_p.py --record OUT/result.json --command "..."     # here
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import append_result, log, record_args  # noqa: E402  (bench/ is on sys.path when a bench runs)

from coevolve.core.chat import policy_prompt_text  # noqa: E402
from coevolve.core.fastgen import StaticGraphBackend  # noqa: E402
from coevolve.core.generation import SamplingParams  # noqa: E402
from data.tasks import load_task  # noqa: E402


def load(args, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    where = dict(gguf_file=args.gguf.name) if args.gguf else {}
    folder = args.gguf.parent if args.gguf else args.model_path
    tok = AutoTokenizer.from_pretrained(folder, **where)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **where).to(device).eval()
    log(f"loaded {folder} in {time.perf_counter() - start:.1f} s")
    return model, tok


def hf_generate(model, tok, prompts: list[str], params: SamplingParams, device: str) -> dict:
    """One padded batch (left padding), n samples per prompt; tokens counted up to each row's EOS."""
    tok.padding_side = "left"
    if tok.pad_token is None:  # the dequantised folder's tokenizer has none; padded rows are masked anyway
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    torch.manual_seed(params.seed)
    start = time.perf_counter()
    out = model.generate(
        **batch,
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=0,
        max_new_tokens=params.max_new_tokens,
        num_return_sequences=params.n,
        pad_token_id=tok.pad_token_id,
    )
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1] :]
    ended = (new == tok.eos_token_id).int().cumsum(-1)
    tokens = int(((ended == 0) | ((ended == 1) & (new == tok.eos_token_id))).sum())  # EOS counted, as ours
    return dict(rows=new.shape[0], tokens=tokens, wall_s=round(wall, 2), tok_s=round(tokens / wall, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", type=Path, default=Path("/tmp/smollm2"))
    ap.add_argument("--gguf", type=Path, help="load this GGUF file instead (slower: dequantised on load)")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--slots", type=int, default=512)
    ap.add_argument("--fallback-rows", type=int, default=64, help="the exact fallback's rows per step under graphs")
    ap.add_argument("--hf-prompts", type=int, default=32, help="prompts (x n rows) in HF's one padded batch")
    ap.add_argument("--out", type=Path)
    record_args(ap, "result.json", "bench_top_p.py")
    args = ap.parse_args()
    if args.record:
        return record(json.loads(args.record.read_text()), args.command)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load(args, device)
    task, rng = load_task("instruct"), random.Random(0)
    prompts = [policy_prompt_text(tok, task.draw_prompt(rng)) for _ in range(args.prompts)]
    params = SamplingParams(n=args.n, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new, seed=0)

    be = StaticGraphBackend(model, tok, batch_size=args.slots, fallback_rows=args.fallback_rows)
    be.generate(prompts[:8], params)  # warm-up: kernels, first graphs
    gens = be.generate(prompts, params)
    tokens = sum(sum(row) for row in gens.num_tokens)
    st = gens.stats
    ours = dict(
        tokens=tokens,
        wall_s=round(gens.seconds, 2),
        tok_s=round(tokens / gens.seconds, 1),
        truncated_steps=st["truncated_steps"],
        deferred_steps=st["deferred_steps"],
        graphs=st["graphs"],
    )
    log(f"ours: {ours}")
    hf = hf_generate(model, tok, prompts[: args.hf_prompts], params, device)
    log(f"HF generate: {hf}")
    res = dict(
        bench="generation",
        model="smollm2",
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        ours_tok_s=ours["tok_s"],
        hf_generate_tok_s=hf["tok_s"],
        top_p_exact_share=round(1 - ours["truncated_steps"] / tokens, 6),
        deferred_steps=ours["deferred_steps"],
        ours=ours,
        hf_generate=hf,
        workload=dict(
            task="instruct",
            prompts=args.prompts,
            n=args.n,
            max_new=args.max_new,
            temperature=0.8,
            top_p=0.95,
            slots=args.slots,
            fallback_rows=args.fallback_rows,
            hf_prompts=args.hf_prompts,
        ),
        torch=torch.__version__,
        transformers=__import__("transformers").__version__,
    )
    log(json.dumps(res))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "result.json").write_text(json.dumps(res, indent=1))


def record(res: dict, command: str) -> None:
    res["command"] = command
    o, h = res["ours"], res["hf_generate"]
    md = [
        f"\n## generation (top-p on SmolLM2's logits): {res['date']}, {res['device']}",
        f"`{command}` (torch {res['torch']}, transformers {res['transformers']})",
        f"Workload: {json.dumps(res['workload'])}.",
        "",
        "| backend | tokens/s | notes |",
        "|---|---|---|",
        f"| ours (static) | {o['tok_s']:,.0f} | {o['tokens']} tokens in {o['wall_s']} s, {o['graphs']} graphs |",
        f"| HF generate, padded | {h['tok_s']:,.0f} | {h['rows']} rows, {h['tokens']} tokens in {h['wall_s']} s |",
        "",
        f"Nucleus within the 64 candidates: {res['top_p_exact_share']:.4%} of {o['tokens']} sampled tokens "
        f"({o['truncated_steps']} drawn by the exact fallback; {res['deferred_steps']} row-steps spent waiting for it).",
    ]
    append_result(ROOT / "bench", res, md)


if __name__ == "__main__":
    main()
