"""Inference consistency: the training forward that replays a rollout's selections gives the
log-probs the rollout sampled with (same weights), for every p of the grid, both granularities
and both prefill modes."""

import dataclasses

import pytest
import torch

import sparse_attn.attention  # noqa: F401  (registers sparse_topp)
from sf_train.batch import sequence_logp, training_batch
from sf_train.config import default_p_grid
from sf_train.replay import REPLAY_ATTENTION, replaying
from sf_train.rollout import rollout
from sparse_attn.attention import enable
from sparse_attn.policy import TopPPolicy

EOS, PAD = 1, 0


def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
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
        ids[b, P - n :] = torch.randint(2, vocab, (n,), generator=g)
        mask[b, P - n :] = 1
    return {"input_ids": ids, "attention_mask": mask}


def replayed_logp(
    model, inputs, groups, temperature, suppressed=(), gradient=None, no_grad=True, selections=None
):
    """The trainer's training forward over the rollouts: (log-probs, rollout log-probs, mask).
    ``selections`` replaces the recorded ones (controls)."""
    batch = training_batch(
        inputs, groups, torch.zeros(inputs["input_ids"].shape[0], len(groups)), PAD
    )
    model.set_attn_implementation(REPLAY_ATTENTION)
    with (
        torch.set_grad_enabled(not no_grad),
        replaying(selections or batch.selections, batch.prompt_length, gradient),
    ):
        logp, _ = sequence_logp(model, batch, temperature, suppressed)
    return logp, batch.logp_old, batch.mask


def grid_rollouts(model, inputs, granularity, eos, pad, suppressed=(), **policy_kw):
    enable(model)
    return [
        rollout(
            model,
            inputs,
            TopPPolicy(p=p, granularity=granularity, **policy_kw),
            max_new_tokens=6,
            eos_token_id=eos,
            pad_token_id=pad,
            temperature=1.0,
            suppressed=suppressed,
        )
        for p in default_p_grid()
    ]


def assert_replay_matches_rollouts(
    model, inputs, granularity, eos, pad, max_tau=0.9, suppressed=(), gradient=None, **policy_kw
):
    """Returns the rollouts, and the replay of the sparse ones with their selections marked
    "dense" (the control: a dense-prefill replay must not match a sparse-prefill rollout)."""
    groups = grid_rollouts(model, inputs, granularity, eos, pad, suppressed, **policy_kw)
    assert min(float(g.token_ratio.min()) for g in groups) < max_tau, "the test must really prune"
    logp, logp_old, mask = replayed_logp(model, inputs, groups, 1.0, suppressed, gradient)
    m = mask.bool()
    torch.testing.assert_close(logp[m], logp_old[m], rtol=0, atol=2e-5)
    if policy_kw.get("prefill", "sparse") == "sparse":
        batch = training_batch(
            inputs, groups, torch.zeros(inputs["input_ids"].shape[0], len(groups)), PAD
        )
        as_dense = [dataclasses.replace(s, prefill="dense") for s in batch.selections]
        dense, _, _ = replayed_logp(
            model, inputs, groups, 1.0, suppressed, gradient, selections=as_dense
        )
        assert (dense[m] - logp_old[m]).abs().max() > 1e-3, "a dense-prefill replay must not match"


@pytest.mark.parametrize("prefill", ["sparse", "dense"])
@pytest.mark.parametrize("granularity", ["layer", "kv_head"])
def test_replay_reproduces_rollout_logprobs(granularity, prefill):
    assert_replay_matches_rollouts(
        tiny_qwen2(),
        left_padded_prompts([40, 27, 33]),
        granularity,
        EOS,
        PAD,
        n_probe=8,
        keep_first=1,
        keep_last=2,
        prefill=prefill,
    )


def test_replayed_probe_scores_reproduce_the_sparse_selection():
    """Under the sparse prefill each layer's scores depend on what earlier layers kept: the
    replay's collected probe scores, selected again at each rollout's p, give its recorded set."""
    from sparse_attn import reference

    model, inputs = tiny_qwen2(), left_padded_prompts([40, 27, 33])
    kw = dict(n_probe=8, keep_first=1, keep_last=2)
    groups = grid_rollouts(model, inputs, "layer", EOS, PAD, **kw)
    batch = training_batch(inputs, groups, torch.zeros(3, len(groups)), PAD)
    model.set_attn_implementation(REPLAY_ATTENTION)
    with torch.no_grad(), replaying(batch.selections, batch.prompt_length, probe_scores=8) as state:
        sequence_logp(model, batch, 1.0, ())
    valid = batch.inputs["attention_mask"][:, : batch.prompt_length].bool()
    assert len(state.scores) == len(batch.selections) == 2
    for scores, selection in zip(state.scores, batch.selections):
        p_rows = torch.tensor(default_p_grid()).repeat_interleave(3)
        for r in range(scores.shape[0]):
            indices, counts = reference.topp_select(
                scores[r : r + 1],
                float(p_rows[r]),
                valid_mask=valid[r : r + 1],
                keep_first=1,
                keep_last=2,
            )
            assert int(counts[0]) == int(selection.counts[r])
            assert torch.equal(indices[0, : counts[0]], selection.indices[r, : counts[0]])


def test_replay_differs_from_dense_when_pruned():
    """The check above can fail: a dense forward (no replay) does not match pruned rollouts."""
    model = tiny_qwen2()
    inputs = left_padded_prompts([40, 27, 33])
    enable(model)
    group = rollout(
        model,
        inputs,
        TopPPolicy(p=0.5, n_probe=8, keep_first=1, keep_last=2),
        max_new_tokens=6,
        eos_token_id=EOS,
        pad_token_id=PAD,
        temperature=1.0,
    )
    logp, logp_old, mask = replayed_logp(model, inputs, [group], 1.0)
    m = mask.bool()
    torch.testing.assert_close(logp[m], logp_old[m], rtol=0, atol=2e-5)
    model.set_attn_implementation("sdpa")  # the same forward without the replay: dense
    batch = training_batch(inputs, [group], torch.zeros(3, 1), PAD)
    with torch.no_grad():
        dense, _ = sequence_logp(model, batch, 1.0, ())
    assert (dense[m] - logp_old[m]).abs().max() > 1e-3
