"""Per-k evaluation of MoE checkpoints: quality, cross-sparsity agreement, latency."""
