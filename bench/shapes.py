"""Model shapes the GPU benches build with random weights (no download), shared by every bench."""

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
