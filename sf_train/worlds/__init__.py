"""The synthetic worlds sf_train ships (visual QA, key-value retrieval), each a TrainingTask with
a tiny model and its base checkpoint; sf_train/worlds/registry.py knows them by name."""
