"""Building blocks of the hybrid decoder: norms, MLP, RoPE, softmax and linear-attention mixers."""
