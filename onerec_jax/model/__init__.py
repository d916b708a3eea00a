"""Models: shared layers, MoE, V1 encoder-decoder, V2 lazy decoder."""
