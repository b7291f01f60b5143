"""Replay consistency on the tiny Qwen2.5-VL: images, mRoPE, visual-only pruning."""

import pytest
import torch
from test_replay import assert_replay_matches_rollouts


@pytest.mark.parametrize("prefill", ["sparse", "dense"])
@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
@pytest.mark.parametrize("prune", ["all", "visual"])
def test_replay_on_the_tiny_vlm(granularity, prune, prefill):
    from sf_train.worlds.vqa import model as tiny_vlm
    from sf_train.worlds.vqa.world import embedded_vqa

    config = tiny_vlm.TinyVLMConfig()
    processor = tiny_vlm.build_processor(config)
    model = tiny_vlm.build_model(config, processor.tokenizer).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(16.0)
    vqa = embedded_vqa(processor)
    inputs = dict(vqa.encode(vqa.samples("train", 0, 3)))
    assert_replay_matches_rollouts(
        model,
        inputs,
        granularity,
        vqa.eos_token_id,
        vqa.pad_token_id,
        max_tau=0.97,
        suppressed=vqa.suppressed_token_ids,
        n_probe=8,
        keep_first=1,
        keep_last=4,
        prune=prune,
        prefill=prefill,
    )
