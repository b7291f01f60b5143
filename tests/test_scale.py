"""Training at scale on CPU (docs/scale.md): LoRA through peft, bf16 autocast, gradient
checkpointing, FSDP2 over 2 gloo processes."""

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_replay import assert_replay_matches_rollouts, left_padded_prompts
from test_trainer import make_config
from toy_task import EOS, PAD, toy_model, toy_task

from sf_train.batch import training_batch
from sf_train.trainer import SparsityForcingTrainer

pytest.importorskip("peft")


def flat(named):
    return {k: v.detach().clone() for k, v in named}


def lora_trainer(config):
    return SparsityForcingTrainer(config, toy_model(), None, toy_task())


def fixed_batch(trainer):
    """A training batch of the trainer's first prompts with rollouts decoded now (p = 0.5, 1.0)."""
    samples = trainer.task.samples("train", 0, 3)
    inputs = trainer.task.encode(samples)
    groups = trainer.rollouts(inputs)[:2]
    return training_batch(inputs, groups, torch.zeros(3, 2), PAD)


def test_lora_trains_only_adapters_and_the_reference_is_the_adapter_free_policy(tmp_path):
    torch.manual_seed(0)
    base = flat(toy_model().named_parameters())
    trainer = lora_trainer(
        make_config(tmp_path, steps=2, lora_rank=4, lora_target_modules=("q_proj", "v_proj"))
    )
    assert trainer.reference is None, "no second copy of the model"
    before = flat(trainer.policy.named_parameters())
    adapters = {k for k in before if "lora_" in k}
    assert adapters and all(
        v.requires_grad for k, v in trainer.policy.named_parameters() if k in adapters
    )
    batch = fixed_batch(trainer)
    ref_before = trainer.reference_logp(batch)
    history = trainer.train(progress=False)
    assert all(math.isfinite(m["loss"]) for m in history) and history[-1]["kl"] > 0
    after = flat(trainer.policy.named_parameters())
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and changed <= adapters, (
        f"non-adapter weights moved: {sorted(changed - adapters)[:3]}"
    )
    assert any("lora_B" in k for k in changed)
    # the reference: unchanged by training, and equal to the base model without adapters
    torch.testing.assert_close(trainer.reference_logp(batch), ref_before, rtol=0, atol=0)
    plain = toy_model()
    from sf_train.batch import sequence_logp

    with torch.no_grad():
        base_logp, _ = sequence_logp(plain, batch, 1.0, ())
    torch.testing.assert_close(ref_before, base_logp, rtol=0, atol=1e-5)
    stripped = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert all(torch.equal(stripped[k], base[k]) for k in base), "base weights are frozen"
    # the trained policy is not the reference
    with torch.no_grad():
        assert not torch.allclose(
            sequence_logp(trainer.policy, batch, 1.0, ())[0], base_logp, atol=1e-4
        )


def test_lora_replay_matches_rollouts(tmp_path):
    torch.manual_seed(0)
    trainer = lora_trainer(make_config(tmp_path, steps=1, lora_rank=4, lr=1e-2))
    trainer.train(progress=False)
    assert any(
        float(p.detach().abs().max()) > 0
        for k, p in trainer.policy.named_parameters()
        if "lora_B" in k
    )
    assert_replay_matches_rollouts(
        trainer.policy,
        left_padded_prompts([30, 21, 25], vocab=32),
        "layer",
        EOS,
        PAD,
        max_tau=0.97,
        n_probe=4,
        keep_first=1,
        keep_last=2,
    )


def test_lora_resume_is_exact_and_checkpoint_holds_adapters_only(tmp_path):
    torch.manual_seed(0)
    config = dict(lora_rank=4, lr=1e-2)
    uninterrupted = lora_trainer(make_config(tmp_path / "a", **config))
    full = uninterrupted.train(progress=False)
    torch.manual_seed(0)
    lora_trainer(make_config(tmp_path / "b", steps=2, **config)).train(progress=False)
    state = torch.load(tmp_path / "b" / "run" / "checkpoint.pt", weights_only=True)
    assert state["lora"] and state["model"] and all("lora_" in k for k in state["model"])
    assert set(state["optimizer"]["state"]) == set(state["model"])
    torch.manual_seed(123)
    resumed = lora_trainer(make_config(tmp_path / "b", steps=3, **config))
    resumed.resume()
    last = resumed.train(progress=False)
    for key, value in full[2].items():
        if key != "rollout_tokens_per_s":
            assert last[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    a, b = flat(uninterrupted.policy.named_parameters()), flat(resumed.policy.named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(
        ValueError, match="lora_rank"
    ):  # a LoRA checkpoint is not a full fine-tuning one
        SparsityForcingTrainer(
            make_config(tmp_path / "b", steps=3, lr=1e-2), toy_model(), toy_model(), toy_task()
        ).resume()


def test_lora_final_save_merges_or_saves_the_adapter(tmp_path):
    from transformers import Qwen2ForCausalLM

    from sf_train.experiments import save_final

    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    toy_model().save_pretrained(base_dir)
    for merge in (True, False):
        trainer = lora_trainer(
            make_config(tmp_path / str(merge), steps=1, lora_rank=4, lr=1e-2, lora_merge=merge)
        )
        trainer.train(progress=False)
        ids = torch.randint(2, 32, (2, 9))
        with torch.no_grad():
            expected = trainer.policy(input_ids=ids).logits
        save_final(trainer.final_model(), str(base_dir), tmp_path / f"final_{merge}")
        if merge:
            merged = Qwen2ForCausalLM.from_pretrained(tmp_path / f"final_{merge}")
            assert not any("lora" in k for k in merged.state_dict())
            with torch.no_grad():
                torch.testing.assert_close(
                    merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4
                )
        else:
            assert (tmp_path / f"final_{merge}" / "adapter_config.json").exists()
            assert (tmp_path / f"final_{merge}" / "adapter_model.safetensors").exists()


def test_lora_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="lora_target_modules"):
        lora_trainer(make_config(tmp_path, lora_rank=2, lora_target_modules=("no_such_proj",)))
    with pytest.raises(ValueError, match="reference_model=None"):
        SparsityForcingTrainer(
            make_config(tmp_path, lora_rank=2), toy_model(), toy_model(), toy_task()
        )
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        make_config(tmp_path, lora_rank=-1)
    with pytest.raises(ValueError, match="lora_rank > 0 runs with distributed='ddp'"):
        make_config(tmp_path, lora_rank=2, distributed="fsdp")


# --- FSDP2 over 2 gloo processes ------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _row_sampler(probs, num_samples=1, **_):
    """torch.multinomial with the draw a function of each row's distribution alone: a prompt's
    rollouts are then the same whichever rank and batch it is in (only for tests; the draw is not
    uniform, which no test here needs)."""
    probs = probs.double()
    u = ((probs * torch.arange(probs.shape[-1], dtype=torch.float64)).sum(-1) / 3.0) % 1.0
    cdf = probs.cumsum(-1)
    return (cdf < u[:, None] * cdf[:, -1:]).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)


def _fsdp_worker(rank, world_size, port, runs, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    sample = torch.multinomial
    try:
        for name, over, resume, by_row in runs:
            torch.multinomial = _row_sampler if by_row else sample  # this spawned process only
            torch.manual_seed(rank)
            trainer = SparsityForcingTrainer(
                make_config(**over), toy_model(), toy_model(), toy_task()
            )
            if resume:
                trainer.resume()
            history = trainer.train(progress=False)
            from sf_train.scale import model_state

            weights = model_state(trainer.policy, trainable_only=False)  # a collective: every rank
            results[(name, rank)] = (history, weights)
            if name == "fsdp":  # the final save gathers the sharded weights (a collective too)
                from sf_train.experiments import save_final

                base = make_config(**over).out_dir + "_base"
                if rank == 0:
                    toy_model().save_pretrained(base)
                dist.barrier()
                final = make_config(**over).out_dir + "_final"
                state = trainer.final_state_dict()
                save_final(trainer.final_model(), base, Path(final), state, write=rank == 0)
    finally:
        dist.destroy_process_group()


def spawn(runs, world_size=2):
    results = mp.Manager().dict()
    mp.spawn(
        _fsdp_worker, args=(world_size, _free_port(), runs, results), nprocs=world_size, join=True
    )
    return dict(results)


def test_fsdp_two_processes_match_ddp_and_one_process_and_resume_exactly(tmp_path):
    base = dict(tmp_path=tmp_path, steps=2, lr=1e-2)
    runs = [
        ("ddp", dict(base, tmp_path=tmp_path / "ddp"), False, False),
        ("fsdp", dict(base, tmp_path=tmp_path / "fsdp", distributed="fsdp"), False, False),
        (
            "first",
            dict(base, tmp_path=tmp_path / "resume", distributed="fsdp", steps=1),
            False,
            False,
        ),
        ("resumed", dict(base, tmp_path=tmp_path / "resume", distributed="fsdp"), True, False),
        (
            "fsdp_by_row",
            dict(base, tmp_path=tmp_path / "fsdp_by_row", distributed="fsdp"),
            False,
            True,
        ),
    ]
    results = spawn(runs)
    results.update(
        spawn(
            [("one_by_row", dict(base, tmp_path=tmp_path / "one_by_row"), False, True)],
            world_size=1,
        )
    )
    (h_ddp, w_ddp), (h_fsdp, w_fsdp) = results[("ddp", 0)], results[("fsdp", 0)]
    assert w_fsdp and set(w_fsdp) == set(w_ddp)
    for k in w_ddp:  # same rollouts (per-rank RNG streams), the same update up to reduction order
        torch.testing.assert_close(w_fsdp[k], w_ddp[k], rtol=0, atol=1e-5)
    assert any(not torch.equal(w_fsdp[k], toy_model().state_dict()[k]) for k in w_fsdp), (
        "the weights moved"
    )
    for key in ("loss", "reward", "kl", "token_ratio"):
        assert h_fsdp[-1][key] == pytest.approx(h_ddp[-1][key], rel=1e-4, abs=1e-6), key
    from transformers import Qwen2ForCausalLM

    saved = Qwen2ForCausalLM.from_pretrained(tmp_path / "fsdp" / "run_final").state_dict()
    assert all(torch.equal(saved[k], w_fsdp[k]) for k in w_fsdp), (
        "final/ holds the gathered weights"
    )
    # resume under FSDP: weights, optimizer and each rank's RNG continue exactly
    h_resumed, w_resumed = results[("resumed", 0)]
    assert [m["step"] for m in h_resumed] == [2]
    assert all(torch.equal(w_resumed[k], w_fsdp[k]) for k in w_fsdp)
    assert h_resumed[-1]["loss"] == h_fsdp[-1]["loss"]
    # against one process with the same global batch (4 prompts; 2 a rank): with rollouts that
    # depend on the prompt alone, the sharded 2-rank update is the 1-process update
    (h_two, w_two), (h_one, w_one) = results[("fsdp_by_row", 0)], results[("one_by_row", 0)]
    assert [m["token_ratio"] for m in h_two] == pytest.approx(
        [m["token_ratio"] for m in h_one], abs=1e-6
    )
    # Padding a batch of 2 or of 4 prompts changes float rounding, which Adam's m / sqrt(v)
    # amplifies in elements whose gradient is tiny: the tolerance is relative to the update (the
    # weights moved by about 2 steps of lr 1e-2 each); seen: up to 1.5e-3 in single elements of
    # 8,192 (the norm of the difference stays far below 1e-3 of the update's).
    start = toy_model().state_dict()
    diff = torch.cat([(w_two[k] - w_one[k]).flatten() for k in w_one])
    update = torch.cat([(w_one[k] - start[k]).flatten() for k in w_one])
    assert float(diff.abs().max()) < 5e-3, "at most half of one step"
    assert float(diff.norm() / update.norm()) < 1e-3, float(diff.norm() / update.norm())
    # (kl is a mean over each rank's completion tokens, then over ranks: not the 1-process mean)
    for key in ("loss", "reward", "accuracy", "token_ratio"):
        assert h_two[-1][key] == pytest.approx(h_one[-1][key], rel=1e-4, abs=1e-6), key
    # the checkpoint is unsharded: it loads into a single-process run
    single = SparsityForcingTrainer(
        make_config(tmp_path / "resume", steps=3, lr=1e-2), toy_model(), toy_model(), toy_task()
    )
    with pytest.warns(UserWarning, match="RNG states of 2 ranks"):
        single.resume()
    assert single.step == 2


# --- gradient checkpointing, bf16 -----------------------------------------------------------------


@pytest.fixture
def no_process_group():
    yield
    if dist.is_initialized():  # distributed="fsdp" on one process starts a one-rank group
        dist.destroy_process_group()


def trained(tmp_path, name, **over):
    """(history, trained tensors as fp32, trainer) of 2 steps at lr 1e-2 from the same seed."""
    from sf_train.scale import model_state

    torch.manual_seed(0)
    lora = over.get("lora_rank", 0) > 0
    trainer = SparsityForcingTrainer(
        make_config(tmp_path / name, steps=2, lr=1e-2, **over),
        toy_model(),
        None if lora else toy_model(),
        toy_task(),
    )
    history = trainer.train(progress=False)
    state = model_state(trainer.policy, trainable_only=lora)
    return history, {k: v.float() for k, v in state.items()}, trainer


def update_cosine(a, b, start):
    da = torch.cat([(a[k] - start.get(k, 0)).flatten() for k in sorted(a)])
    db = torch.cat([(b[k] - start.get(k, 0)).flatten() for k in sorted(b)])
    return float(da @ db / (da.norm() * db.norm()))


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_changes_nothing(tmp_path, lora_rank):
    h0, w0, _ = trained(tmp_path, "plain", lora_rank=lora_rank)
    h1, w1, t1 = trained(tmp_path, "checkpointed", lora_rank=lora_rank, gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in t1.policy.modules())
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "recomputation replays the same selections"
    assert [m["loss"] for m in h0] == [m["loss"] for m in h1]


def test_bf16_lora_keeps_fp32_adapters_and_follows_fp32(tmp_path):
    h32, w32, _ = trained(tmp_path, "fp32", lora_rank=4)
    h16, w16, t16 = trained(tmp_path, "bf16", lora_rank=4, dtype="bfloat16")
    dtypes = {k: p.dtype for k, p in t16.policy.named_parameters()}
    assert all(d == torch.float32 for k, d in dtypes.items() if "lora_" in k)
    assert all(d == torch.bfloat16 for k, d in dtypes.items() if "lora_" not in k)
    assert [m["token_ratio"] for m in h16] == [m["token_ratio"] for m in h32], "the same rollouts"
    # Adam's per-element step makes tiny gradients' signs count: compare the update's direction.
    assert update_cosine(w16, w32, {}) > 0.95
    assert h16[-1]["loss"] == pytest.approx(h32[-1]["loss"], abs=2e-3)


def test_fsdp_on_one_process_equals_plain_and_bf16_keeps_fp32_masters(tmp_path, no_process_group):
    start = {k: v.float() for k, v in toy_model().state_dict().items()}
    h, w, _ = trained(tmp_path, "plain")
    hf, wf, _ = trained(tmp_path, "fsdp", distributed="fsdp")
    for k in w:
        torch.testing.assert_close(wf[k], w[k], rtol=0, atol=1e-6)
    h16, w16, t16 = trained(tmp_path, "fsdp_bf16", distributed="fsdp", dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in t16.policy.parameters()), (
        "sharded master weights stay fp32"
    )
    assert all(p.dtype == torch.bfloat16 for p in t16.reference.parameters()), (
        "the frozen reference is bf16"
    )
    assert [m["token_ratio"] for m in h16] == [m["token_ratio"] for m in h]
    assert update_cosine(w16, w, start) > 0.6
    assert h16[-1]["loss"] == pytest.approx(h[-1]["loss"], abs=2e-3)
    with pytest.raises(
        ValueError, match="dtype='bfloat16' with full fine-tuning needs distributed='fsdp'"
    ):
        make_config(tmp_path, dtype="bfloat16")
