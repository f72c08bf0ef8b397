"""The model shapes the benchmarks run at (random weights: speed does not depend on their values)."""
SHAPES = {  # LLaMA-7B and 13B (Touvron et al. 2023, Table 2), SmolLM2-135M, the embedded base, a small one
    "7b": dict(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008, vocab_size=32000),
    "13b": dict(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824, vocab_size=32000),
    "smollm2": dict(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152,
                    rope_theta=100000.0, tie_word_embeddings=True),
    "embedded": dict(dim=128, n_layers=4, n_heads=4, hidden_dim=341, vocab_size=768),
    "small": dict(dim=512, n_layers=4, n_heads=8, hidden_dim=1376, vocab_size=32000),
}
