"""The dense reference's forward with each prompt computed once per group (shared_prompt_logits)
equals the forward of the whole [prompt + completion] batch: left padding, completions that stop
at different lengths, mRoPE with images, both attention functions the reference meets."""

import pytest
import torch
from test_replay import EOS, PAD, grid_rollouts, left_padded_prompts, tiny_qwen2

from sf_train.batch import shared_prompt_logits, training_batch
from sf_train.replay import REPLAY_ATTENTION


def full_logits(model, batch):
    P, T = batch.prompt_length, batch.completions.shape[1]
    with torch.no_grad():
        return model(**batch.inputs).logits[:, P - 1 : P - 1 + T]


def tiny_vlm_and_prompts(rows=3):
    from sf_train.worlds.vqa import model as tiny_vlm
    from sf_train.worlds.vqa.world import embedded_vqa

    config = tiny_vlm.TinyVLMConfig()
    processor = tiny_vlm.build_processor(config)
    model = tiny_vlm.build_model(config, processor.tokenizer).eval()
    vqa = embedded_vqa(processor)
    return model, dict(vqa.encode(vqa.samples("train", 0, rows))), vqa


@pytest.mark.parametrize("attention", ["sdpa", REPLAY_ATTENTION])
def test_shared_prompt_logits_equal_the_full_forward_qwen2(attention):
    model = tiny_qwen2()
    inputs = left_padded_prompts([40, 27, 33])
    groups = grid_rollouts(model, inputs, "layer", EOS, PAD, n_probe=8, keep_last=2)
    batch = training_batch(inputs, groups, torch.zeros(3, len(groups)), PAD)
    assert batch.mask.min() == 0 < batch.mask.max(), "completions of several lengths"
    model.set_attn_implementation(attention)
    shared = shared_prompt_logits(model, inputs, batch)
    assert shared.shape == (24, batch.completions.shape[1], 64)
    torch.testing.assert_close(shared, full_logits(model, batch), rtol=0, atol=2e-5)


def test_shared_prompt_logits_equal_the_full_forward_tiny_vlm():
    model, inputs, vqa = tiny_vlm_and_prompts()
    lengths = inputs["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "left padding: mRoPE positions continue per row"
    groups = grid_rollouts(
        model, inputs, "layer", vqa.eos_token_id, vqa.pad_token_id, vqa.suppressed_token_ids
    )
    batch = training_batch(inputs, groups, torch.zeros(3, len(groups)), vqa.pad_token_id)
    model.set_attn_implementation(REPLAY_ATTENTION)
    shared = shared_prompt_logits(model, inputs, batch)
    full = full_logits(model, batch)
    torch.testing.assert_close(shared, full, rtol=0, atol=2e-5)


def test_shared_prompt_logits_refuse_a_batch_of_other_prompts():
    model = tiny_qwen2()
    inputs = left_padded_prompts([40, 27, 33])
    groups = grid_rollouts(model, inputs, "layer", EOS, PAD, n_probe=8, keep_last=2)
    batch = training_batch(inputs, groups, torch.zeros(3, len(groups)), PAD)
    with pytest.raises(ValueError, match="whole groups"):
        shared_prompt_logits(model, left_padded_prompts([40, 27, 33, 20, 9]), batch)
