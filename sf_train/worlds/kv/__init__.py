"""The text-only key-value retrieval world: prompts (retrieval.py), the tiny Qwen2 (model.py), its
supervised training (sft.py), the world as a TrainingTask (world.py), the shipped checkpoint."""
