"""What the GPU benches share: model shapes built with random weights (no download), logging, recording."""

MODELS = {
    # Qwen2-0.5B's shape (494M parameters).
    "qwen2-0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1e6,
    ),
    # Qwen2-1.5B's shape (1.54B parameters): the several-GPU bench (issue 10).
    "qwen2-1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1e6,
    ),
    # Llama-3-8B's shape (8.03B parameters), the paper's policy: Llama's architecture, untied head.
    "llama3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    # For a CPU smoke run of a bench.
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    ),
}


# A random model's next-token distribution at initialisation is near-uniform over its vocabulary (logit
# std ~0.6 on the 0.5B shape), which no trained model's is: every top-p draw would need the static
# engine's exact fallback, a sort of the whole row. With this std (before temperature), at T 0.8 and
# top-p 0.95 about 15% of draws do on the 0.5B shape, as on SmolLM2-135M-Instruct's real logits (15.4%,
# bench/RESULTS.md); HF's top-p sorts every row whatever the distribution.
TRAINED_LOGIT_STD = 5.4


def peaked(model, logit_std: float = TRAINED_LOGIT_STD):
    """`model` (random weights) with its final norm's weight scaled so that its logits' std is about
    `logit_std`: the normed hidden state has unit RMS, the LM head's entries std initializer_range."""
    import torch

    c = model.config
    if logit_std:
        with torch.no_grad():
            model.model.norm.weight.mul_(logit_std / (c.initializer_range * c.hidden_size**0.5))
    return model


def model_config(name: str, model_type: str | None = None, **extra):
    """The transformers config of a MODELS shape, in the architecture named (else the entry's own, else
    Qwen2's)."""
    from transformers import AutoConfig

    shape = dict(MODELS[name])
    own = shape.pop("model_type", "qwen2")
    return AutoConfig.for_model(model_type or own, **shape, **extra)


def record_args(ap, saved: str, script: str) -> None:
    """`--record FILE`: a result saved on the GPU machine, appended here to RESULTS.md and
    results.jsonl, with `--command`, the command that made it."""
    from pathlib import Path

    ap.add_argument("--record", type=Path, help=f"a saved {saved} to append to bench/RESULTS.md and results.jsonl")
    ap.add_argument(
        "--command", default=f"python3 bench/{script} --out OUT", help="the command that made it, for the record"
    )


def folders(a, bench: str):
    """The bench's work folder (`--work`, else a new temporary one) and output folder (`--out`, else the
    work folder), both made."""
    import tempfile
    from pathlib import Path

    work = a.work or Path(tempfile.mkdtemp(prefix=f"bench-{bench}-"))
    out = a.out or work
    for folder in (work, out):
        folder.mkdir(parents=True, exist_ok=True)
    return work, out


def log(*a):
    print(*a, flush=True)


def append_result(bench_dir, line: dict | list[dict], md: list[str], errors=None) -> None:
    """Append one result: its JSON line(s) to results.jsonl and a section to RESULTS.md."""
    import json

    with open(bench_dir / "results.jsonl", "a") as f:
        for one in line if isinstance(line, list) else [line]:
            f.write(json.dumps(one) + "\n")
    if errors:
        md = md + [f"Errors: {json.dumps(errors)}"]
    with open(bench_dir / "RESULTS.md", "a") as f:
        f.write("\n".join(md) + "\n")


def sections(res: dict, save) -> "callable":
    """`section(name, fn)`: runs fn and logs its result; a failure is recorded in res["errors"] and the
    bench goes on with the next section (its GPU memory freed first); `save()` runs after each."""
    import gc
    import json
    import time
    import traceback

    import torch

    def section(name, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
            log(f"[{name}] {time.perf_counter() - t0:.1f}s: {json.dumps(out, default=str)[:3000]}")
            return out
        except Exception as e:  # a failed section is reported, the others still run
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"[:500]
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        finally:
            save()

    return section
