"""Inference consistency: the training forward that replays a rollout's selections gives the
log-probs the rollout sampled with (same weights), for every p of the grid and both
granularities."""
import pytest
import torch

import sparse_attn.attention  # noqa: F401  (registers sparse_topp)
from sf_train.config import default_p_grid
from sf_train.replay import REPLAY_ATTENTION, concat_selections, replaying
from sf_train.rollout import repeat_inputs, rollout
from sf_train.trainer import completion_logp
from sparse_attn.attention import enable
from sparse_attn.policy import TopPPolicy

EOS, PAD = 1, 0


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=EOS, pad_token_id=PAD)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # sharper attention than random init gives, so that p < 1 prunes
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    return model


def left_padded_prompts(lengths, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, P - n:] = torch.randint(2, vocab, (n,), generator=g)
        mask[b, P - n:] = 1
    return {"input_ids": ids, "attention_mask": mask}


def replayed_logp(model, inputs, groups, temperature):
    G, P = len(groups), inputs["input_ids"].shape[1]
    T = max(g.completions.shape[1] for g in groups)
    pad = lambda x, v: torch.nn.functional.pad(x, (0, T - x.shape[1]), value=v)
    completions = torch.cat([pad(g.completions, PAD) for g in groups])
    full = repeat_inputs(inputs, G)
    full["input_ids"] = torch.cat([full["input_ids"], completions], 1)
    full["attention_mask"] = torch.cat([full["attention_mask"], torch.ones_like(completions)], 1)
    model.set_attn_implementation(REPLAY_ATTENTION)
    with torch.no_grad(), replaying(concat_selections([g.selections for g in groups]), P):
        logp, _ = completion_logp(model, full, completions, P, temperature)
    mask = torch.cat([pad(g.mask, 0.0) for g in groups])
    logp_old = torch.cat([pad(g.logp, 0.0) for g in groups])
    return logp, logp_old, mask


@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_replay_reproduces_rollout_logprobs(granularity):
    model = tiny_qwen2()
    inputs = left_padded_prompts([40, 27, 33])
    enable(model)
    groups = []
    for p in default_p_grid():
        policy = TopPPolicy(p=p, n_probe=8, keep_first=1, keep_last=2, granularity=granularity)
        groups.append(rollout(model, inputs, policy, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, temperature=1.0))
    assert min(float(g.token_ratio.min()) for g in groups) < 0.9, "the test must really prune"
    logp, logp_old, mask = replayed_logp(model, inputs, groups, 1.0)
    m = mask.bool()
    torch.testing.assert_close(logp[m], logp_old[m], rtol=0, atol=2e-5)


def test_replay_differs_from_dense_when_pruned():
    """The check above can fail: a dense forward (no replay) does not match pruned rollouts."""
    model = tiny_qwen2()
    inputs = left_padded_prompts([40, 27, 33])
    enable(model)
    group = rollout(model, inputs, TopPPolicy(p=0.5, n_probe=8, keep_first=1, keep_last=2),
                    max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, temperature=1.0)
    logp, logp_old, mask = replayed_logp(model, inputs, [group], 1.0)
    m = mask.bool()
    torch.testing.assert_close(logp[m], logp_old[m], rtol=0, atol=2e-5)
    model.set_attn_implementation("sdpa")
    full = {k: v.clone() for k, v in inputs.items()}
    full["input_ids"] = torch.cat([full["input_ids"], group.completions], 1)
    full["attention_mask"] = torch.cat([full["attention_mask"], torch.ones_like(group.completions)], 1)
    with torch.no_grad():
        dense, _ = completion_logp(model, full, group.completions, inputs["input_ids"].shape[1], 1.0)
    assert (dense[m] - logp_old[m]).abs().max() > 1e-3
