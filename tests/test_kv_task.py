"""The text-only variant: key-value retrieval task, tiny Qwen2 + tokenizer, shipped checkpoint,
and the same CLI commands with task=embedded_kv."""

import json
import re
from pathlib import Path

import pytest
import torch

from sf_train.config import SFConfig
from sf_train.worlds import common
from sf_train.worlds.kv import retrieval
from sf_train.worlds.kv.model import (
    TinyLMConfig,
    build_model,
    build_tokenizer,
    encode_prompts,
    generate_answer,
    load_checkpoint,
    save_checkpoint,
)

KV_BASE_CHECKPOINT = (
    Path(__file__).resolve().parents[1] / "sf_train" / "worlds" / "kv" / "checkpoint"
)
HELDOUT_SLICE = 128


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_samples_are_deterministic_and_the_splits_disjoint():
    a = retrieval.make_samples("train", 0, 50)
    assert a == retrieval.make_samples("train", 0, 50)
    assert retrieval.make_sample("heldout", 7) == retrieval.make_samples("heldout", 5, 3)[2]
    train = {s.prompt for s in retrieval.make_samples("train", 0, 300)}
    heldout = {s.prompt for s in retrieval.make_samples("heldout", 0, 300)}
    assert len(train) == len(heldout) == 300 and not train & heldout
    for s in a:
        keys = [k for k, _ in s.pairs]
        assert retrieval.MIN_PAIRS <= len(keys) <= retrieval.MAX_PAIRS and len(set(keys)) == len(
            keys
        )
    # the asked pair is spread over the listing, not always first or last
    positions = {[k for k, _ in s.pairs].index(s.query) for s in a}
    assert len(positions) > 20
    with pytest.raises(ValueError):
        retrieval.make_sample("test", 0)
    with pytest.raises(ValueError):
        retrieval.make_sample("train", 0, 10, 20, num_keys=16)


def test_the_answer_is_the_value_of_the_asked_key():
    """Re-derived from the prompt text alone: "<k> <v> ... <k> <v> what is <k>"."""
    for s in retrieval.make_samples("heldout", 0, 100) + retrieval.make_samples(
        "train", 0, 50, 2, 8, 16
    ):
        m = re.fullmatch(r"((?:k\d+ v\d+ )+)what is (k\d+)", s.prompt)
        assert m, s.prompt
        words = m.group(1).split()
        table = dict(zip(words[0::2], words[1::2]))
        assert len(table) == len(words) // 2, "keys are distinct"
        assert table[m.group(2)] == s.value
        assert s.answer == f"answer {s.value}" == retrieval.completion_text(s.value)


def test_correctness_is_exact_and_shared_with_the_visual_task():
    s = retrieval.make_sample("heldout", 0)
    from sf_train.worlds.kv import world as kv_world
    from sf_train.worlds.vqa import world as vqa_world

    assert kv_world.is_correct is vqa_world.is_correct is common.is_correct
    right, value = s.answer, s.value
    other = next(v for v in retrieval.VALUES if v != value)
    assert common.is_correct(s.prompt, right, s.answer) == 1
    assert common.is_correct(s.prompt, f" Answer: {value.upper()}. ", s.answer) == 1
    assert (
        common.is_correct(s.prompt, f"answer {value} {other} what", s.answer) == 1
    )  # words after ignored
    for wrong in (
        value,
        f"answer {other}",
        f"answer {value}0",
        f"answer{value}",
        f"{value} answer",
        "answer",
        "",
    ):
        assert common.is_correct(s.prompt, wrong, s.answer) == 0, wrong


def test_tokenizer_round_trip_and_left_padding(tokenizer):
    assert tokenizer.padding_side == "left"
    assert len(tokenizer) == 3 + len(retrieval.vocabulary())
    for s in retrieval.make_samples("train", 0, 20):
        ids = tokenizer(s.prompt).input_ids
        assert len(ids) == 2 * len(s.pairs) + 3 and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == s.prompt
        completion = tokenizer(s.answer).input_ids + [tokenizer.eos_token_id]
        assert len(completion) == 3
        assert tokenizer.decode(completion, skip_special_tokens=True) == s.answer
    samples = retrieval.make_samples("heldout", 0, 4)
    batch = encode_prompts(tokenizer, samples)
    assert set(batch) == {"input_ids", "attention_mask"}
    mask = batch["attention_mask"]
    assert mask[:, -1].all() and (mask.diff(dim=1) >= 0).all()
    assert ((batch["input_ids"] == tokenizer.pad_token_id) == (mask == 0)).all()


def test_checkpoint_save_load_round_trip(tmp_path, tokenizer):
    config = TinyLMConfig(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2)
    model = build_model(config, tokenizer, seed=1).eval()
    save_checkpoint(tmp_path, model, tokenizer, config)
    loaded, loaded_tokenizer, loaded_config = load_checkpoint(tmp_path)
    assert loaded_config == config and type(loaded).__name__ == "Qwen2ForCausalLM"
    assert loaded.config.num_key_value_heads == 2 and loaded.config.num_attention_heads == 4
    batch = encode_prompts(loaded_tokenizer, retrieval.make_samples("train", 0, 2))
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_shipped_checkpoint_scores_90_percent_dense():
    """The packaged base model: >= 90% greedy held-out accuracy with dense attention
    (training_run.json reports the 1024-sample figure)."""
    model, tokenizer, _ = load_checkpoint(KV_BASE_CHECKPOINT)
    assert (KV_BASE_CHECKPOINT / "model.safetensors").stat().st_size < 8 * 2**20
    hits = 0
    for start in range(0, HELDOUT_SLICE, 64):
        samples = retrieval.make_samples("heldout", start, 64)
        hits += sum(
            common.is_correct(s.prompt, c, s.answer)
            for s, c in zip(samples, generate_answer(model, tokenizer, samples))
        )
    assert hits / HELDOUT_SLICE >= 0.9
    report = json.loads((KV_BASE_CHECKPOINT / "training_run.json").read_text())
    assert report["heldout_accuracy"] >= 0.9


def test_embedded_kv_resolves_its_packaged_checkpoint():
    from sf_train.worlds.registry import EMBEDDED_TASKS, load_models_and_task, resolve_model

    config = SFConfig(task="embedded_kv")
    assert Path(resolve_model(config).model) == EMBEDDED_TASKS["embedded_kv"].checkpoint
    assert Path(resolve_model(SFConfig()).model) == EMBEDDED_TASKS["embedded_vqa"].checkpoint
    assert resolve_model(SFConfig(task="embedded_kv", model="/some/dir")).model == "/some/dir"
    assert EMBEDDED_TASKS["embedded_kv"].train_command.startswith(
        "python -m sf_train.worlds.kv.sft --out "
    )
    policy, reference, training_task = load_models_and_task(config)
    assert policy is not reference and training_task.name == "embedded_kv"
    assert training_task.suppressed_token_ids == ()
    samples = training_task.samples("heldout", 0, 2)
    assert training_task.answer(samples[0]) == samples[0].answer
    batch = training_task.encode(samples)
    assert batch["input_ids"].shape[0] == 2


def test_main_end_to_end_smoke(tmp_path, monkeypatch):
    """python -m sf_train main --set task=embedded_kv ... through the CLI function, tiny."""
    from sf_train import cli, experiments
    from sf_train.worlds.kv.world import KV_BASE_CHECKPOINT as PACKAGED_KV_CHECKPOINT

    compare = experiments.compare_checkpoints
    # fewer calibration samples for the baselines comparison, to keep the test fast
    monkeypatch.setattr(
        experiments, "compare_checkpoints", lambda *a, **kw: compare(*a, **{**kw, "calibration": 4})
    )
    out = tmp_path / "run"
    cli.main(
        [
            "main",
            "--set",
            "task=embedded_kv",
            "steps=1",
            "prompts_per_step=2",
            "eval_samples=4",
            "baseline_samples=4",
            "p_grid=[0.9,0.975]",
            "eval_p=[0.975]",
            "save_every=1",
            f"out_dir={out}",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["task"] == "embedded_kv"
    assert Path(report["config"]["model"]) == PACKAGED_KV_CHECKPOINT
    for when in ("before", "after"):
        for _p, r in report[when].items():
            assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 < r["token_ratio"] <= 1.0
            assert r["visual_token_ratio"] is None
    assert report["before"]["1.0"]["token_ratio"] == 1.0
    assert (out / "final" / "tiny_lm.json").exists() and (out / "final" / "tokenizer.json").exists()
    assert (out / "plots.png").exists()


def test_main_applies_the_embedded_recipe_under_config_and_set(tmp_path):
    import argparse

    from sf_train.experiments import load_config
    from sf_train.worlds.registry import EMBEDDED_TASKS

    recipe = EMBEDDED_TASKS["embedded_vqa"].main_recipe
    assert recipe, "the VQA world's main job has a recipe"
    plain = load_config(argparse.Namespace(config=None, set=[]))
    assert plain == SFConfig(), "train / eval take the defaults (the paper's objective)"
    main = load_config(argparse.Namespace(config=None, set=["lr=3e-5"]), recipe=True)
    for key, value in recipe.items():
        assert getattr(main, key) == (3e-5 if key == "lr" else value), key
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"steps": 7}))
    from_file = load_config(argparse.Namespace(config=str(config_file), set=[]), recipe=True)
    assert from_file.steps == 7 and from_file.soft_tau_weight == recipe["soft_tau_weight"]
    kv = load_config(argparse.Namespace(config=None, set=["task=embedded_kv"]), recipe=True)
    assert kv == SFConfig(task="embedded_kv", **EMBEDDED_TASKS["embedded_kv"].main_recipe)
