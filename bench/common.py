"""What the GPU benches share: model shapes built with random weights (no download), logging, recording."""

MODELS = {
    # Qwen2-0.5B's shape (494M parameters).
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6),
    # For a CPU smoke run of a bench.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 vocab_size=1024, tie_word_embeddings=True, max_position_embeddings=4096),
}


def log(*a):
    print(*a, flush=True)


def append_result(bench_dir, line: dict, md: list[str], errors=None) -> None:
    """Append one result: a JSON line to results.jsonl and a section to RESULTS.md."""
    import json

    with open(bench_dir / "results.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    if errors:
        md = md + [f"Errors: {json.dumps(errors)}"]
    with open(bench_dir / "RESULTS.md", "a") as f:
        f.write("\n".join(md) + "\n")
