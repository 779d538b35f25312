"""Generation throughput on the E-step workload: the "static" backend vs HF `generate` (padded) vs HF
`generate` with a static cache (compiled), same model, prompts and sampling parameters.

Workload (issue 9): a Qwen2-0.5B-shaped model with random bf16 weights (no download), prompts of 32-128
random tokens, n=8 samples per prompt, T=0.8, top-p 0.95, response lengths drawn uniformly in
[1, 512]. Random weights never emit a meaningful EOS, so each sample's length is imposed: our backend
stops each row at its own length (EOS ignored); HF's padded batches cannot stop rows one by one, so a
batch runs to its longest row and only the imposed lengths count as useful tokens (what a real padded
batch spends when its longest row ends last).

    python3 bench/bench_generation.py --model qwen2-0.5b --out OUT        # on a GPU: check, time, profile
    python3 bench/bench_generation.py --record OUT/result.json            # append to RESULTS.md, results.jsonl

Also checked on the GPU: greedy tokens vs HF generate (bf16, and fp32 where they should agree exactly),
the three attention variants against each other, and that the same seed gives the same samples. The
decode step's profile gives its time beside its floor (`step_floor`).

Other models: `--model llama3-8b` (the paper's policy's shape, random bf16 weights, ~16 GB; leave room
for its KV cache: e.g. --slots 256 --hf-prompts 16), `--model smollm2 --model-path FOLDER` (real weights,
the same random-token workload).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import MODELS, TRAINED_LOGIT_STD, append_result, log, model_config, peaked, sections  # noqa: E402

from coevolve.core.fastgen import StaticGraphBackend  # noqa: E402
from coevolve.core.generation import SamplingParams  # noqa: E402


def build_model(
    name: str, device: str, dtype=torch.bfloat16, path: Path | None = None, logit_std: float = TRAINED_LOGIT_STD
):
    """A MODELS shape with random weights, its logits as peaked as a trained model's (common.peaked), or
    with `path` a model folder (e.g. SmolLM2 dequantised by bench_real.py). EOS is switched off either
    way: the workload imposes each row's length."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if path:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    else:
        with torch.device(device):
            model = peaked(AutoModelForCausalLM.from_config(model_config(name), dtype=dtype), logit_std)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


# Per GPU: HBM bandwidth (bytes/s) and dense bf16 matmul rate (FLOP/s), from NVIDIA's data sheets (SXM).
PEAKS = {"H100": (3.35e12, 989e12), "H200": (4.8e12, 989e12)}


def step_floor(model, rows: int, mean_pos: float, device_name: str) -> dict:
    """What a decode step of `rows` rows at mean position `mean_pos` cannot beat: its weights and KV
    cache read once at the bandwidth, or its FLOPs at the matmul rate, whichever takes longer
    (`floor_ms`); `serial_ms` is the two one after the other, a floor for a step that overlaps nothing."""
    peak = next((v for k, v in PEAKS.items() if k in device_name), None)
    if peak is None:
        return {"floor": f"no peak figures for {device_name}"}
    c = model.config
    width = next(model.parameters()).element_size()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    params = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    # An untied input embedding is gathered (a row per token), not read whole, and multiplies nothing.
    gathered = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    kv = rows * mean_pos * 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * width
    attention_flops = 4 * rows * mean_pos * c.num_attention_heads * head_dim * c.num_hidden_layers
    flops = 2 * (params - gathered) * rows + attention_flops
    bytes_ms = ((params - gathered) * width + kv) / peak[0] * 1e3
    flops_ms = flops / peak[1] * 1e3
    return {
        "floor_ms": round(max(bytes_ms, flops_ms), 3),
        "serial_ms": round(bytes_ms + flops_ms, 3),
        "bytes_ms": round(bytes_ms, 3),
        "flops_ms": round(flops_ms, 3),
    }


def workload(vocab: int, prompts: int, n: int, max_new: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(32, 129, (prompts,), generator=g).tolist()
    ids = [torch.randint(0, vocab, (L,), generator=g).tolist() for L in lens]
    new = torch.randint(1, max_new + 1, (prompts, n), generator=g).tolist()
    return ids, new


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


# -- HF baselines -------------------------------------------------------------------------------------
def hf_generate(model, prompts, new, params: SamplingParams, static: bool, device: str, budget_s: float):
    """HF generate on one padded batch of len(prompts) * n rows. Each step's time is read by a logits
    processor (HF syncs with the host every step anyway)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self):
            self.t = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :] = torch.tensor(p)
        mask[i, T - len(p) :] = 1
    steps = max(m for row in new for m in row)
    clock = Clock()
    kw = dict(cache_implementation="static") if static else {}
    sync(device)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        do_sample=True,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=0,
        max_new_tokens=steps,
        min_new_tokens=steps,
        num_return_sequences=params.n,
        pad_token_id=0,
        logits_processor=LogitsProcessorList([clock]),
        **kw,
    )
    sync(device)
    wall = time.perf_counter() - t0
    assert out.shape[1] == T + steps, out.shape
    intervals = [b - a for a, b in zip(clock.t, clock.t[1:])]
    step_s = statistics.median(intervals[len(intervals) // 4 :]) if intervals else wall
    useful = sum(sum(row) for row in new)
    return {
        "rows": len(prompts) * params.n,
        "steps": steps,
        "wall_s": round(wall, 3),
        "median_step_ms": round(step_s * 1e3, 2),
        "useful_tokens": useful,
        "raw_tokens": len(prompts) * params.n * steps,
        "tok_s_wall": round(useful / wall, 1),
        # steady state: the median step times the steps (no prefill, no compile): generous to HF
        "tok_s_steady": round(useful / (step_s * steps), 1),
        "first_step_s": round(clock.t[0] - t0, 3) if clock.t else None,
    }


# -- checks -------------------------------------------------------------------------------------------
def greedy_check(model, prompts, max_new: int, attention: str):
    """Greedy tokens of ours vs HF generate (one prompt per call, no padding)."""
    be = StaticGraphBackend(model, None, batch_size=len(prompts), attention=attention)
    ours, _, _ = be.generate_ids(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new), ignore_eos=True)
    device = model.device
    prefixes = []
    for p, o in zip(prompts, ours):
        ref = model.generate(
            torch.tensor([p], device=device),
            do_sample=False,
            max_new_tokens=max_new,
            min_new_tokens=max_new,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        o = o[0]
        prefixes.append(next((i for i, (a, b) in enumerate(zip(o, ref)) if a != b), len(ref)))
    return {
        "prompts": len(prompts),
        "new_tokens": max_new,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "attention": attention,
        "identical": sum(p == max_new for p in prefixes),
        "matching_prefix": prefixes,
        "prefix_match_rate": round(sum(prefixes) / (len(prompts) * max_new), 4),
    }


def logprob_check(model, prompts, max_new: int, attention: str, fp32_model=None):
    """Sampled tokens' log-probs (T 0.8, top-p 0.95) against a forward pass over the same tokens, the
    way DPO's reference computes them (log_softmax of the untempered logits): per token and summed per
    completion. With `fp32_model`, the bf16 forward against the fp32 one too, the noise a bf16
    reference already carries."""
    be = StaticGraphBackend(model, None, batch_size=len(prompts) * 2, attention=attention)
    params = SamplingParams(n=2, temperature=0.8, top_p=0.95, max_new_tokens=max_new, seed=1, logprobs=True)
    tokens, logps, _ = be.generate_ids(prompts, params, ignore_eos=True)

    def forward(m, p, ids):
        x = torch.tensor([p + ids], device=m.device)
        with torch.no_grad():
            logits = m(x).logits[0, len(p) - 1 : -1].float()
        return (
            torch.log_softmax(logits, -1)
            .gather(1, torch.tensor(ids, device=m.device)[:, None])
            .squeeze(1)
            .double()
            .cpu()
        )

    per_token, per_seq, ref_token, ref_seq = [], [], [], []
    for p, rows, lps in zip(prompts, tokens, logps):
        for ids, lp in zip(rows, lps):
            want = forward(model, p, ids)
            diff = torch.tensor(lp, dtype=torch.float64) - want
            per_token.append(diff.abs())
            per_seq.append(abs(float(diff.sum())))
            if fp32_model is not None:
                exact = forward(fp32_model, p, ids)
                ref_token.append((want - exact).abs())
                ref_seq.append(abs(float((want - exact).sum())))
    out = {
        "completions": len(per_seq),
        "tokens_each": max_new,
        "dtype": str(model.dtype).replace("torch.", ""),
        "token_abs_diff_mean": round(float(torch.cat(per_token).mean()), 5),
        "token_abs_diff_max": round(float(torch.cat(per_token).max()), 4),
        "sum_abs_diff_mean": round(statistics.mean(per_seq), 4),
        "sum_abs_diff_max": round(max(per_seq), 4),
    }
    if ref_token:
        out.update(
            bf16_vs_fp32_forward_token_abs_diff_mean=round(float(torch.cat(ref_token).mean()), 5),
            bf16_vs_fp32_forward_sum_abs_diff_mean=round(statistics.mean(ref_seq), 4),
        )
    return out


def attention_check(model, device):
    """The attention variants on one random cache against a float64 reference."""
    from coevolve.core.fastgen import model as m

    w = m.Weights(model)
    torch.manual_seed(1)
    S, L = 64, 640
    kc = torch.randn(S, w.n_kv, L, w.head_dim, device=device, dtype=w.dtype)
    vc = torch.randn_like(kc)
    q = torch.randn(S, w.n_heads, w.head_dim, device=device, dtype=w.dtype)
    pos = torch.randint(0, L, (S,), device=device)
    ref = m.attend_bmm(q.double(), kc.double(), vc.double(), pos, L, w.scale)
    fns = {"bmm": m.attend_bmm, "sdpa": m.attend_sdpa}
    if device == "cuda":
        from coevolve.core.fastgen.kernels import attend_triton, row_stats

        fns["triton"] = attend_triton
    out = {k: float((f(q, kc, vc, pos, L, w.scale).double() - ref).norm() / ref.norm()) for k, f in fns.items()}
    if device == "cuda":  # the fused logits statistics of the sampler
        logits = torch.randn(512, w.padded_vocab, device=device, dtype=w.dtype) * 3
        temp = torch.tensor(0.8, device=device)
        cmax, lse, lse_raw = row_stats(logits, 128, temp)
        out["row_stats_chunk_max_equal"] = bool(torch.equal(cmax, logits.view(512, -1, 128).amax(-1).float()))
        out["row_stats_lse_max_abs_err"] = float((lse.double() - torch.logsumexp(logits.double(), -1)).abs().max())
        out["row_stats_untempered_lse_max_abs_err"] = float(
            (lse_raw.double() - torch.logsumexp(logits.double() * 0.8, -1)).abs().max()
        )
    return out


# -- our backend --------------------------------------------------------------------------------------
def time_ours(model, prompts, new, params, slots: int, attention: str, sync_every: int, compile_ops: bool | None):
    be = StaticGraphBackend(
        model, None, batch_size=slots, attention=attention, sync_every=sync_every, compile_ops=compile_ops
    )
    useful = sum(sum(row) for row in new)
    runs = []
    outs = []
    for label in ("cold", "warm"):
        sync(model.device.type)
        t0 = time.perf_counter()
        out, _, stats = be.generate_ids(prompts, params, max_new=new, ignore_eos=True)
        sync(model.device.type)
        wall = time.perf_counter() - t0
        produced = sum(len(t) for row in out for t in row)
        assert produced == useful, (produced, useful)
        runs.append(
            {
                "call": label,
                "wall_s": round(wall, 3),
                "tok_s": round(useful / wall, 1),
                "logprobs": params.logprobs,
                **stats,
            }
        )
        outs.append(out)
        log(f"  ours[{attention}] {label}: {useful} tokens in {wall:.2f}s = {useful / wall:,.0f} tok/s  {stats}")
    return be, runs, outs[0] == outs[1]


def profile_step(be: StaticGraphBackend, device: str, rows: int):
    """Time one decode step (graph replay) with rows mid-generation, and break it down by kernel."""
    st, cache = be.state, be.cache
    g = torch.Generator().manual_seed(2)
    L = cache.max_len
    lo, hi = min(80, L // 4), max(min(420, L - 64), min(80, L // 4) + 1)  # room for the 60 steps below
    draw = lambda: torch.randint(lo, hi, (rows,), generator=g).to(device)  # noqa: E731
    st.pos[:rows] = draw()  # about the spread of positions in the steady state
    st.step[:rows] = 0
    st.max_new[:rows] = 10**6
    st.done[:rows] = False
    res = {"rows": rows, "attended_len_bucket": L, "mean_pos": float(st.pos[:rows].float().mean())}
    if device != "cuda":
        return res
    res.update(step_floor(be.model, rows, res["mean_pos"], torch.cuda.get_device_name()))
    be.run_steps(rows, L, 1)  # capture
    graph = be._graphs[(rows, L, be.attention, *be.sampler.key)]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.pos[:rows] = draw()
    start.record()
    for _ in range(50):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    res["graph_step_ms"] = round(start.elapsed_time(end) / 50, 3)
    st.pos[:rows] = draw()
    # Eager step timing (what the step costs without a graph: launches and Python).
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        be.step(rows, L)
    torch.cuda.synchronize()
    res["eager_step_ms"] = round((time.perf_counter() - t0) / 5 * 1e3, 3)
    st.pos[:rows] = draw()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            be.step(rows, L)
        torch.cuda.synchronize()
    kernels = {}  # full kernel name -> ms per step
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.count and not e.key.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            kernels[e.key] = kernels.get(e.key, 0.0) + t / 5 / 1e3  # ms per step
    cats = {}
    for name, ms in kernels.items():
        cats[_category(name)] = cats.get(_category(name), 0.0) + ms
    res["kernel_ms_per_step"] = round(sum(kernels.values()), 3)
    res["by_category_ms"] = {k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])}
    res["top_kernels_ms"] = [(k[:140], round(v, 3)) for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:20]]
    res["kernels_per_step"] = round(sum(e.count for e in prof.key_averages() if e.key in kernels) / 5, 1)
    return res


def _category(name: str) -> str:
    n = name.lower()
    if "decode_attention" in n or "fmha" in n or "attention" in n or "flash" in n:
        return "attention kernel"
    if "gemm" in n or "cutlass" in n or "sm90" in n or "matmul" in n or "xmma" in n or "cublas" in n:
        return "matmul (cuBLAS)"
    if "topk" in n or "radix" in n or "sort" in n or "scan" in n or "softmax" in n:
        return "top-k / softmax / cumsum"
    if "norm" in n:
        return "rms norm"
    if "index" in n or "gather" in n or "scatter" in n or "embedding" in n:
        return "gather / scatter / index"
    if "reduce" in n:
        return "reductions"
    return "elementwise / other"


# -- main ---------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2-0.5b", choices=[*sorted(MODELS), "smollm2"])
    ap.add_argument(
        "--model-path",
        type=Path,
        default=Path("/tmp/smollm2"),
        help="--model smollm2: its folder (bench_real.py makes it)",
    )
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=512)
    ap.add_argument(
        "--slots",
        default="512",
        help="slot counts; the first is the headline, others are timed with the first attention",
    )
    ap.add_argument("--sync-every", type=int, default=16)
    ap.add_argument(
        "--eager-ops",
        action="store_true",
        help="the step's elementwise pieces eager, not fused by torch.compile (the engine's default on CUDA)",
    )
    ap.add_argument(
        "--logit-std",
        type=float,
        default=TRAINED_LOGIT_STD,
        help="random weights: the logits' std (common.peaked; 0: as initialised, near-uniform)",
    )
    ap.add_argument(
        "--logprobs",
        action="store_true",
        help="also time the headline attention taking each sampled token's log-prob "
        "(what the e-step asks for when DPO's reference is the sampler)",
    )
    ap.add_argument("--attention", default="triton,bmm,sdpa", help="variants to time; the first is the headline")
    ap.add_argument("--hf-prompts", type=int, default=64, help="prompts (x n rows) in HF's one padded batch")
    ap.add_argument("--hf-max-new", type=int, default=0, help="cap HF's response lengths (0: the workload's)")
    ap.add_argument("--skip-hf-static", action="store_true")
    ap.add_argument("--skip-hf", action="store_true", help="skip both HF baselines")
    ap.add_argument("--deadline-s", type=float, default=400, help="skip HF static when the bench has run this long")
    ap.add_argument("--greedy-prompts", type=int, default=8)
    ap.add_argument("--greedy-new", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--record", type=Path, default=None, help="append a saved result.json to bench/RESULTS.md and results.jsonl"
    )
    args = ap.parse_args()
    if args.record:
        return record(json.loads(args.record.read_text()))

    slots = [int(x) for x in args.slots.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()
    res = {
        "bench": "generation",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "command": "python3 bench/bench_generation.py " + " ".join(sys.argv[1:]),
        "errors": {},
    }
    import transformers

    res["transformers"] = transformers.__version__
    path = args.model_path if args.model == "smollm2" else None
    load = lambda dtype: build_model(args.model, device, dtype, path, args.logit_std)  # noqa: E731
    model = load(torch.bfloat16 if device == "cuda" else torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    weights = f"weights from {path}" if path else f"{args.model} shape, random weights"
    res["model"] = f"{weights}, {n_params / 1e6:.0f}M params, {str(model.dtype).replace('torch.', '')}"
    params = SamplingParams(n=args.n, temperature=0.8, top_p=0.95, max_new_tokens=args.max_new, seed=0)
    prompts, new = workload(model.config.vocab_size, args.prompts, args.n, args.max_new)
    res["workload"] = {
        "prompts": args.prompts,
        "n": args.n,
        "prompt_len": "32-128",
        "response_len": f"1-{args.max_new} uniform",
        "useful_tokens": sum(sum(r) for r in new),
        "T": params.temperature,
        "top_p": params.top_p,
        "slots": slots[0],
        "compiled_ops": not args.eager_ops and device == "cuda",
        "logit_std": None if path else args.logit_std,  # random weights' logits (common.peaked)
    }
    log(json.dumps(res, indent=1))

    section = sections(res, lambda: save(res, args.out))

    variants = args.attention.split(",")
    gp = prompts[: args.greedy_prompts]
    res["attention_rel_err_vs_fp64"] = section("attention check", lambda: attention_check(model, device))
    if gp:
        res["greedy_bf16"] = section("greedy vs HF", lambda: greedy_check(model, gp, args.greedy_new, variants[0]))
    if device == "cuda" and gp:

        def fp32_check():
            m32 = load(torch.float32)
            try:
                return greedy_check(m32, gp, args.greedy_new, "bmm")  # Triton's fp32 dot is tf32
            finally:
                del m32
                torch.cuda.empty_cache()

        res["greedy_fp32"] = section("greedy vs HF fp32", fp32_check)
    if args.logprobs and gp:

        def logprobs_vs_forward():
            m32 = load(torch.float32) if device == "cuda" else None
            try:
                return logprob_check(model, gp, args.greedy_new, variants[0], m32)
            finally:
                del m32
                torch.cuda.empty_cache() if device == "cuda" else None

        res["logprobs_vs_forward"] = section("sampled log-probs vs forward", logprobs_vs_forward)

    res["ours"] = {}
    best = None
    plan = [(v, slots[0], False) for v in variants] + [(variants[0], s, False) for s in slots[1:]]
    for v, n_slots, logprobs in plan + ([(variants[0], slots[0], True)] if args.logprobs else []):
        label = (v if n_slots == slots[0] else f"{v}, {n_slots} slots") + (", logprobs" if logprobs else "")
        p = replace(params, logprobs=logprobs)
        out = section(
            f"ours {label}",
            lambda v=v, n_slots=n_slots, p=p: time_ours(
                model, prompts, new, p, n_slots, v, args.sync_every, False if args.eager_ops else None
            ),
        )
        if out is None:
            continue
        be, runs, deterministic = out
        res["ours"][label] = {"runs": runs, "same_samples_on_repeat": deterministic}
        if label == variants[0]:
            best = be
            res["profile"] = section("profile", lambda: profile_step(be, device, n_slots))
        else:
            del be
        torch.cuda.empty_cache() if device == "cuda" else None
    del best
    if device == "cuda":
        torch.cuda.empty_cache()

    hp, hn = prompts[: args.hf_prompts], new[: args.hf_prompts]
    if args.hf_max_new:
        hn = [[min(m, args.hf_max_new) for m in row] for row in hn]
    res["hf_workload"] = (
        f"first {len(hp)} prompts x {args.n} = {len(hp) * args.n} rows in one left-padded batch, {max(max(r) for r in hn)} steps"
    )
    if not args.skip_hf:
        res["hf_generate"] = section("hf generate", lambda: hf_generate(model, hp, hn, params, False, device, 0))
    if args.skip_hf or args.skip_hf_static:
        pass
    elif time.perf_counter() - t_start > args.deadline_s:
        res["errors"]["hf static"] = f"skipped: the bench had run {time.perf_counter() - t_start:.0f}s (--deadline-s)"
    elif device == "cuda":
        res["hf_static"] = section("hf static", lambda: hf_generate(model, hp, hn, params, True, device, 0))

    profile = res.get("profile") or {}
    res["step_ms"], res["floor_ms"] = profile.get("graph_step_ms"), profile.get("floor_ms")
    head = res["ours"].get(variants[0], {}).get("runs", [{}])[-1].get("tok_s")
    res["ours_tok_s"] = head
    res["hf_generate_tok_s"] = (res.get("hf_generate") or {}).get("tok_s_wall")
    res["hf_static_tok_s"] = (res.get("hf_static") or {}).get("tok_s_steady")
    if head and res["hf_generate_tok_s"]:
        res["speedup_vs_hf_generate"] = round(head / res["hf_generate_tok_s"], 1)
    res["bench_wall_s"] = round(time.perf_counter() - t_start, 1)
    save(res, args.out)
    log("\n" + table(res))


def save(res, out: Path | None):
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(res, indent=1))
        (out / "result.md").write_text(table(res))


def table(res) -> str:
    rows = [("backend", "tokens/s", "notes")]
    for r in (res.get("ours") or {}).values():
        for run in r["runs"]:
            logprobs = ", log-probs taken" if run.get("logprobs") else ""
            rows.append(
                (
                    f"ours ({run['attention']} attention, {run['slots']} slots{logprobs}, {run['call']} call)",
                    f"{run['tok_s']:,.0f}",
                    f"{run['wall_s']}s, {run.get('decode_steps')} steps, {run.get('graphs')} graphs",
                )
            )
    for key, label in (("hf_generate", "HF generate, padded"), ("hf_static", "HF generate, static cache, compiled")):
        h = res.get(key)
        if h:
            rows.append(
                (
                    label,
                    f"{h['tok_s_wall']:,.0f} (wall) / {h['tok_s_steady']:,.0f} (steady)",
                    f"{h['rows']} rows x {h['steps']} steps, {h['median_step_ms']} ms/step, first step {h['first_step_s']}s",
                )
            )
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(c.ljust(width[i]) for i, c in enumerate(r)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in width) + "|")
    return "\n".join(lines)


def record(res) -> None:
    """Append one result to bench/RESULTS.md (human) and bench/results.jsonl (one line)."""
    bench = ROOT / "bench"
    line = {
        k: res.get(k)
        for k in ("bench", "device", "date", "model", "ours_tok_s", "hf_generate_tok_s", "hf_static_tok_s")
    }
    line.update({k: v for k, v in res.items() if k not in line})
    p = res.get("profile") or {}
    md = [
        f"\n## generation: {res['date']}, {res['device']}",
        f"`{res['command']}` (torch {res['torch']}, transformers {res.get('transformers')})",
        f"Model: {res['model']}. Workload: {json.dumps(res['workload'])}. HF: {res.get('hf_workload')}.",
        "",
        table(res),
        "",
        f"Greedy vs HF generate: bf16 {json.dumps(res.get('greedy_bf16'))}; fp32 {json.dumps(res.get('greedy_fp32'))}.",
        f"Decode step profile: {json.dumps(p)}.",
    ]
    if res.get("logprobs_vs_forward"):
        md.append(f"Sampled log-probs vs a forward over the same tokens: {json.dumps(res['logprobs_vs_forward'])}.")
    append_result(bench, line, md, res.get("errors"))


if __name__ == "__main__":
    main()
