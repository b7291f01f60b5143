import json
import math
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from toy_task import toy_model, toy_task

from sf_train.config import SFConfig
from sf_train.trainer import METRICS_FILE, SparsityForcingTrainer


def make_config(tmp_path, **over):
    values = dict(
        out_dir=str(tmp_path / "run"),
        steps=3,
        prompts_per_step=4,
        p_grid=(0.5, 0.7, 0.9, 0.975),
        max_new_tokens=3,
        n_probe=4,
        keep_first=1,
        keep_last=2,
        lr=1e-3,
        save_every=1,
        beta=0.1,
    )
    values.update(over)
    return SFConfig(**values)


def new_trainer(config):
    return SparsityForcingTrainer(config, toy_model(), toy_model(), toy_task())


def test_short_run_logs_finite_metrics(tmp_path):
    torch.manual_seed(0)
    trainer = new_trainer(make_config(tmp_path))
    history = trainer.train(progress=False)
    assert [m["step"] for m in history] == [1, 2, 3]
    for m in history:
        for key in (
            "loss",
            "reward",
            "kl",
            "clip_fraction",
            "entropy",
            "zero_variance_groups",
            "token_ratio@0.5",
            "accuracy@0.975",
            "layer_retention/0",
            "rollout_tokens_per_s",
        ):
            assert math.isfinite(m[key]), key
        assert 0.0 <= m["kl"] and 0.0 <= m["clip_fraction"] <= 1.0
        assert m["token_ratio@0.5"] < m["token_ratio@0.975"] <= 1.0, "lower p keeps fewer tokens"
    logged = [json.loads(l) for l in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert logged == history
    assert history[-1]["kl"] > 0.0, "the policy moved away from the reference"


def test_lr_schedule_is_applied_and_logged(tmp_path):
    torch.manual_seed(0)
    config = make_config(tmp_path, steps=3, lr_schedule="cosine", warmup_steps=1, min_lr_ratio=0.5)
    trainer = new_trainer(config)
    history = trainer.train(progress=False)
    assert [m["lr"] for m in history] == pytest.approx([1e-3, 1e-3, 5e-4])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_soft_tau_term_is_logged_and_changes_the_update(tmp_path):
    # Every rollout correct: the gate C is open; with no efficiency reward GRPO's advantages are
    # all 0, and with beta = 0 only the soft term can move the weights.
    always_right = replace(toy_task(), is_correct=lambda prompt, completion, answer: 1)
    weights = {}
    for w in (0.0, 5.0):
        torch.manual_seed(0)
        config = make_config(
            tmp_path / str(w), steps=2, soft_tau_weight=w, beta=0.0, efficiency_weight=0.0
        )
        trainer = SparsityForcingTrainer(config, toy_model(), toy_model(), always_right)
        history = trainer.train(progress=False)
        weights[w] = torch.cat([p.detach().flatten() for p in trainer.policy.parameters()])
        if w:
            assert all(0.0 < m["soft_token_ratio"] <= 1.0 for m in history)
        else:
            assert "soft_token_ratio" not in history[0]
    assert torch.equal(
        weights[0.0], torch.cat([p.detach().flatten() for p in toy_model().parameters()])
    )
    assert not torch.allclose(weights[0.0], weights[5.0])


def test_leak_term_is_logged_and_changes_the_update(tmp_path):
    """Only the leak term can move the weights (every rollout correct, no efficiency reward,
    beta = 0): it is logged, in [0, 1], and the weights move."""
    always_right = replace(toy_task(), is_correct=lambda prompt, completion, answer: 1)
    torch.manual_seed(0)
    config = make_config(tmp_path, steps=2, leak_weight=5.0, beta=0.0, efficiency_weight=0.0)
    trainer = SparsityForcingTrainer(config, toy_model(), toy_model(), always_right)
    history = trainer.train(progress=False)
    assert all(0.0 < m["answer_leak"] < 1.0 for m in history)
    start = torch.cat([p.detach().flatten() for p in toy_model().parameters()])
    moved = torch.cat([p.detach().flatten() for p in trainer.policy.parameters()])
    assert not torch.allclose(moved, start)


def test_soft_tau_target_stops_the_push_below_it(tmp_path):
    """The same setting: only the soft term moves the weights. A target above every prompt's
    smoothed tau leaves them where they started; a target of 0 is the plain term."""
    always_right = replace(toy_task(), is_correct=lambda prompt, completion, answer: 1)
    weights, taus = {}, {}
    for target in (0.0, 0.999):
        torch.manual_seed(0)
        config = make_config(
            tmp_path / str(target),
            steps=2,
            soft_tau_weight=5.0,
            soft_tau_target=target,
            beta=0.0,
            efficiency_weight=0.0,
        )
        trainer = SparsityForcingTrainer(config, toy_model(), toy_model(), always_right)
        taus[target] = [m["soft_token_ratio"] for m in trainer.train(progress=False)]
        weights[target] = torch.cat([p.detach().flatten() for p in trainer.policy.parameters()])
    assert max(taus[0.999]) < 0.999
    start = torch.cat([p.detach().flatten() for p in toy_model().parameters()])
    assert torch.equal(weights[0.999], start)
    assert not torch.allclose(weights[0.0], start)
    with pytest.raises(ValueError, match="soft_tau_target"):
        SFConfig(soft_tau_target=1.0)
    with pytest.raises(ValueError, match="soft_tau_target"):
        SFConfig(soft_tau_target=-0.1)


@pytest.mark.parametrize("dense", [False, True])
def test_distillation_term_is_logged_and_pulls_the_policy_to_the_reference(tmp_path, dense):
    """With no reward signal (every rollout correct, no efficiency reward: all advantages 0) and
    beta = 0, only the distillation term moves the weights; a policy that starts away from the
    reference is pulled back towards it."""
    always_right = replace(toy_task(), is_correct=lambda prompt, completion, answer: 1)
    kls = {}
    for w in (0.0, 2.0):
        torch.manual_seed(0)
        policy = toy_model()
        with torch.no_grad():  # start the policy away from the reference
            policy.lm_head.weight.add_(0.5 * torch.randn_like(policy.lm_head.weight))
        start = policy.lm_head.weight.detach().clone()
        config = make_config(
            tmp_path / str(w),
            steps=4,
            distill_weight=w,
            distill_dense=dense and w > 0,
            beta=0.0,
            efficiency_weight=0.0,
        )
        trainer = SparsityForcingTrainer(config, policy, toy_model(), always_right)
        history = trainer.train(progress=False)
        if w:
            kls[w] = [m["distill_kl"] for m in history]
            assert all(math.isfinite(k) and k >= 0 for k in kls[w])
            if dense:
                dense_kls = [m["distill_dense_kl"] for m in history]
                assert all(math.isfinite(k) and k >= 0 for k in dense_kls)
                assert dense_kls[-1] < dense_kls[0], dense_kls
            else:
                assert "distill_dense_kl" not in history[0]
        else:
            assert "distill_kl" not in history[0]
            assert torch.equal(trainer.policy.lm_head.weight.detach(), start)
    assert kls[2.0][-1] < kls[2.0][0], kls


def test_distill_weight_is_checked():
    with pytest.raises(ValueError, match="distill_weight must be >= 0"):
        SFConfig(distill_weight=-1.0)
    with pytest.raises(ValueError, match="distill_dense needs distill_weight > 0"):
        SFConfig(distill_dense=True)


def test_resume_continues_exactly(tmp_path):
    torch.manual_seed(0)
    uninterrupted = new_trainer(make_config(tmp_path / "a")).train(progress=False)

    torch.manual_seed(0)
    first = new_trainer(make_config(tmp_path / "b", steps=2))
    first.train(progress=False)
    torch.manual_seed(123)  # whatever happens in between, resume restores the RNG
    resumed = new_trainer(make_config(tmp_path / "b", steps=3))
    resumed.resume()
    assert resumed.step == 2
    last = resumed.train(progress=False)
    assert len(last) == 1
    for key, value in uninterrupted[2].items():
        if key == "rollout_tokens_per_s":  # wall-clock
            continue
        assert last[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def _distributed_worker(rank, world_size, port, out_dir, soft_tau_weight, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(rank)
        # With the soft term, every rollout counts as correct so that the gate C is open and the
        # term's gradient (from a forward outside the DDP wrapper) must be all-reduced too.
        task = replace(toy_task(), is_correct=lambda *_: 1) if soft_tau_weight else toy_task()
        config = make_config(out_dir, steps=2, soft_tau_weight=soft_tau_weight)
        trainer = SparsityForcingTrainer(config, toy_model(), toy_model(), task)
        history = trainer.train(progress=False)
        params = torch.cat([p.detach().flatten() for p in trainer.policy.parameters()])
        results[rank] = (history, params)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("soft_tau_weight", [0.0, 5.0])
def test_two_process_gloo(tmp_path, soft_tau_weight):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(
        _distributed_worker, args=(2, port, tmp_path, soft_tau_weight, results), nprocs=2, join=True
    )
    (h0, w0), (h1, w1) = results[0], results[1]
    assert h0 == h1, "metrics are averaged over ranks"
    assert torch.equal(w0, w1), "DDP keeps the replicas identical"
    assert all(math.isfinite(m["loss"]) for m in h0)


def test_prune_visual_run_on_the_tiny_vlm(tmp_path):
    """prune="visual" with the soft term and the selection gradient: the text tokens are forced,
    so every rollout keeps them, and the smoothed ratio scores the visual tokens only."""
    from sf_train.worlds.vqa import model as tiny_vlm
    from sf_train.worlds.vqa.world import embedded_vqa

    config = tiny_vlm.TinyVLMConfig()
    processor = tiny_vlm.build_processor(config)
    torch.manual_seed(0)
    policy = tiny_vlm.build_model(config, processor.tokenizer)
    reference = tiny_vlm.build_model(config, processor.tokenizer)
    reference.load_state_dict(policy.state_dict())
    task = replace(embedded_vqa(processor), is_correct=lambda prompt, completion, answer: 1)
    sf = make_config(
        tmp_path,
        steps=1,
        prompts_per_step=2,
        p_grid=(0.5, 0.9),
        n_probe=1,
        prune="visual",
        soft_tau_weight=1.0,
        soft_tau_temperature=1e-4,
        selection_gradient=True,
    )
    trainer = SparsityForcingTrainer(sf, policy, reference, task)
    inputs = dict(task.encode(task.samples("train", 0, 2)))
    groups = trainer.rollouts(inputs)
    text = inputs["attention_mask"].bool() & (inputs["input_ids"] != policy.config.image_token_id)
    for group in groups:
        assert (group.token_ratio < 1).all(), "the rule prunes"
        for selection in group.selections:
            kept = torch.zeros_like(text)
            for b in range(2):
                kept[b, selection.indices[b, : int(selection.counts[b])].long()] = True
            assert (kept | ~text).all(), "every text token is kept"
    (metrics,) = trainer.train(progress=False)
    assert all(math.isfinite(v) for v in metrics.values())
    assert abs(metrics["soft_token_ratio"] - metrics["token_ratio"]) < 0.02, metrics


def test_reference_shares_each_prompt_once_checked_against_the_whole_batch(tmp_path):
    """The first step checks the shared-prompt reference against the whole-batch forward and
    keeps it; both give the same log-probs and distributions."""
    torch.manual_seed(0)
    trainer = new_trainer(make_config(tmp_path, steps=1, distill_weight=1.0, distill_dense=True))
    assert trainer.shares_prompts is None
    trainer.train(progress=False)
    assert trainer.shares_prompts is True


def test_reference_falls_back_to_the_whole_batch_when_the_shared_prompt_differs(
    tmp_path, monkeypatch
):
    import sf_train.trainer as trainer_module

    real = trainer_module.shared_prompt_logits
    monkeypatch.setattr(
        trainer_module, "shared_prompt_logits", lambda *a: real(*a) + torch.randn(real(*a).shape)
    )
    torch.manual_seed(0)
    trainer = new_trainer(make_config(tmp_path, steps=1, distill_weight=1.0))
    with pytest.warns(UserWarning, match="shared-prompt forward differs"):
        trainer.train(progress=False)
    assert trainer.shares_prompts is False
    monkeypatch.setattr(trainer_module, "shared_prompt_logits", None)  # never called again
    assert math.isfinite(trainer.train_step()["loss"])
