"""sf_train: Sparsity Forcing (multi-budget GRPO) post-training with the sparse_attn top-p cache."""
