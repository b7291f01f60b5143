"""The smoothed token ratio: the exact top-p rule in the limit, the cache's tau on a real model,
a gradient that concentrates attention, and clear errors."""

import pytest
import torch
from toy_task import toy_encode, toy_model, toy_samples

from sf_train.config import SFConfig
from sf_train.rollout import rollout
from sf_train.soft_token_ratio import probe_scores, soft_token_ratio, soft_topp_count
from sparse_attn.attention import enable
from sparse_attn.policy import TopPPolicy
from sparse_attn.reference import forced_positions, topp_select


def random_rows(R, L, generator, ties=False):
    scores = torch.randn(R, L, generator=generator).mul(2.0).exp()
    if ties:  # few distinct values: many equal scores, including at the selection boundary
        scores = torch.randint(1, 4, (R, L), generator=generator).float()
    lengths = torch.randint(L // 2, L + 1, (R,), generator=generator)
    valid = torch.arange(L)[None, :] >= (L - lengths)[:, None]  # left padding
    return scores.masked_fill(~valid, 0.0), valid


@pytest.mark.parametrize(
    "L,keep_first,keep_last,ties", [(37, 0, 0, False), (129, 2, 5, False), (64, 1, 3, True)]
)
@pytest.mark.parametrize("p", [0.3, 0.7137, 0.9, 0.975])
def test_soft_count_is_the_top_p_count_in_the_limit(L, keep_first, keep_last, ties, p):
    g = torch.Generator().manual_seed(L + int(1000 * p))
    scores, valid = random_rows(6, L, g, ties)
    forced = forced_positions(valid, keep_first, keep_last, None)
    _, counts = topp_select(scores, p, valid_mask=valid, keep_first=keep_first, keep_last=keep_last)
    soft = soft_topp_count(scores, p, valid, forced, temperature=1e-7)
    torch.testing.assert_close(soft, counts.float(), atol=1e-3, rtol=0)
    assert torch.equal(soft_topp_count(scores, 1.0, valid, forced, 0.01), valid.sum(-1).float())


def test_soft_ratio_equals_the_caches_token_ratio():
    torch.manual_seed(0)
    model = toy_model()
    inputs = toy_encode(toy_samples("train", 0, 5))  # variable lengths, left padding
    with torch.no_grad():
        scores = probe_scores(model, inputs, n_probe=4)
    enable(model)
    for p in (0.5, 0.9, 0.975):
        policy = TopPPolicy(p=p, n_probe=4, keep_first=1, keep_last=2)
        measured = rollout(
            model,
            inputs,
            policy,
            max_new_tokens=1,
            eos_token_id=1,
            pad_token_id=0,
            temperature=None,
        ).token_ratio
        soft = soft_token_ratio(
            scores, inputs["attention_mask"].bool(), policy, [p], temperature=1e-7
        )
        torch.testing.assert_close(soft, measured.float(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("p", [0.5, 0.9, 0.975])
def test_soft_ratio_with_visual_candidates_is_the_exact_rule_in_the_limit(p):
    g = torch.Generator().manual_seed(int(1000 * p))
    scores, valid = random_rows(10, 53, g)
    candidates = torch.rand(10, 53, generator=g) < 0.6  # the "visual" tokens
    policy = TopPPolicy(p=p, keep_first=2, keep_last=3, prune="visual")
    _, counts = topp_select(
        scores, p, valid_mask=valid, keep_first=2, keep_last=3, candidate_mask=candidates
    )
    soft = soft_token_ratio(
        scores[None], valid, policy, [p], temperature=1e-7, candidate_mask=candidates
    )
    torch.testing.assert_close(soft, counts.float() / valid.sum(-1), atol=1e-4, rtol=0)
    every = soft_token_ratio(scores[None], valid, TopPPolicy(p=p, keep_first=2, keep_last=3), [p])
    assert not torch.allclose(soft, every), "the non-candidates are forced"


def test_soft_ratio_equals_the_caches_token_ratio_on_the_tiny_vlm_under_prune_visual():
    from sf_train.worlds.vqa import model as tiny_vlm
    from sf_train.worlds.vqa.world import embedded_vqa

    torch.manual_seed(0)
    config = tiny_vlm.TinyVLMConfig()
    processor = tiny_vlm.build_processor(config)
    model = tiny_vlm.build_model(config, processor.tokenizer).eval()
    vqa = embedded_vqa(processor)
    inputs = dict(vqa.encode(vqa.samples("train", 0, 3)))
    visual = torch.isin(inputs["input_ids"], torch.tensor([model.config.image_token_id]))
    with torch.no_grad():
        scores = probe_scores(model, inputs, n_probe=4)
    enable(model)
    for p in (0.5, 0.9):
        # dense prefill: every layer's selection scores the dense forward's probe attention
        policy = TopPPolicy(
            p=p, n_probe=4, keep_first=1, keep_last=2, prune="visual", prefill="dense"
        )
        measured = rollout(
            model,
            inputs,
            policy,
            max_new_tokens=1,
            eos_token_id=vqa.eos_token_id,
            pad_token_id=vqa.pad_token_id,
            temperature=None,
        ).token_ratio
        soft = soft_token_ratio(
            scores,
            inputs["attention_mask"].bool(),
            policy,
            [p],
            temperature=1e-7,
            candidate_mask=visual,
        )
        torch.testing.assert_close(soft, measured.float(), atol=1e-4, rtol=0)
        assert (measured < 1).all()


def test_descending_the_soft_ratio_concentrates_attention():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 200, generator=g).requires_grad_()
    valid = torch.ones(4, 200, dtype=torch.bool)
    forced = forced_positions(valid, 2, 4, None)

    def exact_count():
        return topp_select(torch.softmax(logits.detach(), -1), 0.9, keep_first=2, keep_last=4)[
            1
        ].float()

    before = exact_count()
    optimizer = torch.optim.SGD([logits], lr=20.0)
    for _ in range(20):
        optimizer.zero_grad()
        soft_topp_count(
            torch.softmax(logits, -1), 0.9, valid, forced, temperature=0.01
        ).mean().backward()
        optimizer.step()
    after = exact_count()
    assert (after < before).all(), (before, after)


def test_bad_input_is_named():
    scores, valid = torch.rand(1, 2, 8), torch.ones(2, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="candidate_mask"):
        soft_token_ratio(scores, valid, TopPPolicy(p=0.9, prune="visual"), [0.9])
    with pytest.raises(ValueError, match="candidate_mask"):
        soft_token_ratio(scores, valid, TopPPolicy(p=0.9), [0.9], candidate_mask=valid)
    with pytest.raises(ValueError, match="candidate_mask must have"):
        soft_token_ratio(
            scores, valid, TopPPolicy(p=0.9, prune="visual"), [0.9], candidate_mask=valid[:1]
        )
    with pytest.raises(ValueError, match="granularity='layer'"):
        soft_token_ratio(scores, valid, TopPPolicy(p=0.9, granularity="kv_head"), [0.9])
    with pytest.raises(ValueError, match="temperature"):
        soft_token_ratio(scores, valid, TopPPolicy(p=0.9), [0.9], temperature=0.0)
    with pytest.raises(ValueError, match="soft_tau_weight"):
        SFConfig(soft_tau_weight=-1.0)
    with pytest.raises(ValueError, match="soft_tau_weight needs granularity"):
        SFConfig(soft_tau_weight=1.0, granularity="kv_head")
    SFConfig(soft_tau_weight=1.0, prune="visual")  # supported: the visual tokens are candidates
    with pytest.raises(ValueError, match="soft_tau_temperature"):
        SFConfig(soft_tau_temperature=0.0)
