"""The synthetic visual QA world: scenes (scene.py), the tiny Qwen2.5-VL (model.py), its
supervised training (sft.py), the world as a TrainingTask (world.py), the shipped checkpoint."""
