import math

import pytest
import torch

from sf_train.config import SFConfig
from sf_train.loss import distillation_kl, grpo_loss, normalize
from sf_train.rewards import efficiency_gate, group_advantages, joint_rewards


def test_joint_reward_group_gate():
    correct = torch.tensor([[1, 0, 1], [0, 0, 0]])
    tau = torch.tensor([[0.3, 0.5, 0.8], [0.2, 0.9, 0.5]])
    r = joint_rewards(correct, tau)
    # C = 1 in the first group (a correct rollout exists): a wrong rollout still earns 1 - tau;
    # C = 0 in the all-wrong group: no reward for pruning harder.
    torch.testing.assert_close(r, torch.tensor([[1.7, 0.5, 1.2], [0.0, 0.0, 0.0]]))


def test_joint_reward_efficiency_weight():
    correct, tau = (
        torch.tensor([[1, 0, 1], [0, 0, 0]]),
        torch.tensor([[0.2, 0.4, 0.9], [0.1, 0.5, 0.3]]),
    )
    r = joint_rewards(correct, tau, weight=5.0)
    assert torch.allclose(r, torch.tensor([[1 + 5 * 0.8, 5 * 0.6, 1 + 5 * 0.1], [0.0, 0.0, 0.0]]))
    assert torch.equal(joint_rewards(correct, tau, weight=0.0), correct.float())
    with pytest.raises(ValueError, match="weight"):
        joint_rewards(correct, tau, weight=-1.0)
    with pytest.raises(ValueError, match="efficiency_weight"):
        SFConfig(efficiency_weight=float("nan"))


def test_joint_reward_rollout_gate():
    r = joint_rewards(torch.tensor([[1, 0]]), torch.tensor([[0.2, 0.4]]), gate="rollout")
    torch.testing.assert_close(r, torch.tensor([[1.8, 0.0]]))
    with pytest.raises(ValueError, match="gate must be one of"):
        joint_rewards(torch.tensor([[1]]), torch.tensor([[0.1]]), gate="nope")


def test_efficiency_gate():
    correct = torch.tensor([[1, 0, 0], [0, 0, 0]])
    assert torch.equal(efficiency_gate(correct), torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(efficiency_gate(correct, "rollout"), correct.float())


def test_group_advantages():
    adv, zero = group_advantages(torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[-1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    assert zero.tolist() == [False, True]
    adv, _ = group_advantages(torch.tensor([[0.0, 1.0]]), eps=1e-4)
    s = math.sqrt(0.5)  # sample std of {0, 1}
    torch.testing.assert_close(adv, torch.tensor([[-0.5 / (s + 1e-4), 0.5 / (s + 1e-4)]]))


MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("normalization,expect", [("grpo", 0.5), ("dapo", 0.8), ("dr_grpo", 4 / 6)])
def test_loss_normalizations_on_policy(normalization, expect):
    logp = torch.zeros(2, 3)
    loss, stats = grpo_loss(
        logp, logp, None, torch.tensor([1.0, -2.0]), MASK, normalization=normalization
    )
    torch.testing.assert_close(loss, torch.tensor(expect))
    assert stats.clip_fraction == 0.0 and stats.kl == 0.0 and stats.ratio_mean == pytest.approx(1.0)


def test_clipping():
    logp_old = torch.zeros(1, 2)
    logp = torch.full((1, 2), math.log(1.5))
    mask = torch.ones(1, 2)
    loss, stats = grpo_loss(logp, logp_old, None, torch.tensor([1.0]), mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(-1.2))  # positive advantage: ratio capped at 1.2
    assert stats.clip_fraction == 1.0
    loss, stats = grpo_loss(logp, logp_old, None, torch.tensor([-1.0]), mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(1.5))  # negative advantage: the pessimistic term
    assert stats.clip_fraction == 0.0
    loss, _ = grpo_loss(
        logp, logp_old, None, torch.tensor([1.0]), mask, clip_eps=0.2, clip_eps_high=0.28
    )
    torch.testing.assert_close(loss, torch.tensor(-1.28))


def test_k3_kl():
    logp = torch.tensor([[-1.0, -2.0]])
    logp_ref = torch.tensor([[-1.5, -1.0]])
    mask = torch.ones(1, 2)
    loss, stats = grpo_loss(logp, logp, logp_ref, torch.tensor([0.0]), mask, beta=0.5)
    d = logp_ref - logp
    kl = torch.exp(d) - d - 1
    torch.testing.assert_close(loss, 0.5 * kl.mean())
    assert stats.kl == pytest.approx(float(kl.mean()))


def straightforward_loss(logp, logp_old, logp_ref, adv, mask, eps, beta, normalization, max_len):
    """One token at a time, as the formulas read."""
    N, T = logp.shape
    per_seq, total, n_tokens = [], 0.0, 0
    for i in range(N):
        seq = []
        for t in range(T):
            if mask[i, t] == 0:
                continue
            ratio = torch.exp(logp[i, t] - logp_old[i, t])
            surrogate = torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps, 1 + eps) * adv[i])
            kl = torch.exp(logp_ref[i, t] - logp[i, t]) - (logp_ref[i, t] - logp[i, t]) - 1
            seq.append(-(surrogate - beta * kl))
        per_seq.append(sum(seq) / max(len(seq), 1))
        total = total + sum(seq)
        n_tokens += len(seq)
    if normalization == "grpo":
        return sum(per_seq) / N
    if normalization == "dapo":
        return total / n_tokens
    return total / (N * max_len)


@pytest.mark.parametrize("normalization", ["grpo", "dapo", "dr_grpo"])
def test_loss_gradient_matches_straightforward(normalization):
    g = torch.Generator().manual_seed(0)
    N, T = 4, 6
    logp_old = -torch.rand(N, T, generator=g) * 3
    logp_ref = -torch.rand(N, T, generator=g) * 3
    base = logp_old + 0.3 * torch.randn(N, T, generator=g)
    adv = torch.randn(N, generator=g)
    mask = (torch.arange(T)[None] < torch.tensor([[6], [3], [1], [5]])).float()
    grads = []
    for fn in ("ours", "straightforward"):
        logp = base.clone().requires_grad_()
        if fn == "ours":
            loss, _ = grpo_loss(
                logp,
                logp_old,
                logp_ref,
                adv,
                mask,
                clip_eps=0.2,
                beta=0.1,
                normalization=normalization,
                max_completion_length=8,
            )
        else:
            loss = straightforward_loss(
                logp, logp_old, logp_ref, adv, mask, 0.2, 0.1, normalization, 8
            )
        loss.backward()
        grads.append((loss.detach(), logp.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert (grads[0][1][mask == 0] == 0).all(), "tokens after EOS get no gradient"


def test_lr_schedules():
    constant = SFConfig(lr=1e-3, steps=5)
    assert [constant.lr_at(s) for s in range(5)] == [1e-3] * 5
    warm = SFConfig(lr=1e-3, steps=6, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.1)
    # warm-up to lr over 2 steps, then linear from lr (step 2) to 0.1 * lr (the last step, 5)
    expected = [5e-4, 1e-3, 1e-3, 7e-4, 4e-4, 1e-4]
    assert [warm.lr_at(s) for s in range(6)] == pytest.approx(expected)
    cosine = SFConfig(lr=2.0, steps=3, lr_schedule="cosine")
    assert [cosine.lr_at(s) for s in range(3)] == pytest.approx([2.0, 1.0, 0.0], abs=1e-12)
    with pytest.raises(ValueError, match="lr_schedule"):
        SFConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        SFConfig(min_lr_ratio=1.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        SFConfig(warmup_steps=-1)


def test_distillation_kl_is_the_kl_of_the_reference_to_the_policy():
    g = torch.Generator().manual_seed(0)
    N, T, V = 3, 4, 7
    logits, ref_logits = torch.randn(N, T, V, generator=g), torch.randn(N, T, V, generator=g)
    logits[..., 2] = ref_logits[..., 2] = float("-inf")  # a suppressed token: both exclude it
    logp_all, ref_all = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    got = distillation_kl(logp_all, ref_all)
    for n in range(N):
        for t in range(T):
            p = ref_all[n, t].exp()
            expected = sum(
                float(p[v] * (ref_all[n, t, v] - logp_all[n, t, v])) for v in range(V) if v != 2
            )
            assert float(got[n, t]) == pytest.approx(expected, rel=1e-5)
    assert (got >= -1e-6).all()
    torch.testing.assert_close(distillation_kl(ref_all, ref_all), torch.zeros(N, T))
    with pytest.raises(ValueError, match="one shape"):
        distillation_kl(logp_all, ref_all[:, :2])


def test_distillation_kl_gradient_is_policy_minus_reference():
    """d KL(ref || softmax(z)) / dz = softmax(z) - ref: the policy is pulled to the reference."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).log_softmax(-1)
    distillation_kl(z.log_softmax(-1), ref).sum().backward()
    torch.testing.assert_close(z.grad, z.detach().softmax(-1) - ref.exp())


@pytest.mark.parametrize("normalization", ["grpo", "dapo", "dr_grpo"])
def test_normalize_is_the_loss_normalization(normalization):
    g = torch.Generator().manual_seed(2)
    per_token = torch.randn(4, 6, generator=g)
    mask = (torch.arange(6)[None] < torch.tensor([[6], [3], [1], [5]])).float()
    if normalization == "grpo":
        want = ((per_token * mask).sum(-1) / mask.sum(-1)).mean()
    elif normalization == "dapo":
        want = (per_token * mask).sum() / mask.sum()
    else:
        want = (per_token * mask).sum() / (4 * 8)
    torch.testing.assert_close(normalize(per_token, mask, normalization, 8), want)
    with pytest.raises(ValueError, match="normalization must be one of"):
        normalize(per_token, mask, "mean")
