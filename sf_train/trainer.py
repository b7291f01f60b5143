"""The Sparsity Forcing loop: multi-budget rollouts -> joint reward -> GRPO update (SPEC section 5).

One step: each prompt is decoded once per threshold p of the grid through a TopPCache (the
deployment pipeline), each rollout is scored r = correct + C * (1 - tau), advantages are
normalised within the prompt's group, and the policy is updated with the clipped surrogate +
beta * KL to the dense reference, its forward replaying each rollout's recorded selections.

Distributed: under torchrun every rank takes its own prompts (a group never spans ranks, so
group statistics are local), gradients are averaged by DDP, and logged metrics are averaged
over ranks.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from .config import SFConfig
from .datasets import TrainingTask
from .loss import grpo_loss
from .replay import REPLAY_ATTENTION, concat_selections, replaying
from .rewards import efficiency_gate, group_advantages, joint_rewards
from .rollout import Rollouts, append_completions, completion_logp, repeat_inputs, rollout
from .soft_token_ratio import probe_scores, soft_token_ratio

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    if world()[1] == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world()[1] for k, v in zip(keys, t)}


def pad_right(x: Tensor, length: int, value) -> Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


@dataclass
class TrainingBatch:
    """The rollouts of one step as one batch of [prompt + completion] sequences (p-major)."""

    inputs: dict  # model inputs of the full sequences
    completions: Tensor  # [N, T]
    mask: Tensor  # [N, T]
    logp_old: Tensor  # [N, T]
    advantages: Tensor  # [N]
    prompt_length: int
    selections: list


def training_batch(inputs: dict, groups: list[Rollouts], advantages: Tensor, pad_token_id: int) -> TrainingBatch:
    """The [prompt + completion] sequences of all rollouts, p-major (row g * B + b);
    advantages [B, G]."""
    G, P = len(groups), inputs["input_ids"].shape[1]
    T = max(g.completions.shape[1] for g in groups)
    completions = torch.cat([pad_right(g.completions, T, pad_token_id) for g in groups])
    return TrainingBatch(
        inputs=append_completions(repeat_inputs(inputs, G), completions),
        completions=completions,
        mask=torch.cat([pad_right(g.mask, T, 0.0) for g in groups]),
        logp_old=torch.cat([pad_right(g.logp, T, 0.0) for g in groups]),
        advantages=advantages.t().reshape(-1).to(completions.device),
        prompt_length=P,
        selections=concat_selections([g.selections for g in groups]),
    )


def sequence_logp(model, batch: "TrainingBatch", temperature: float, suppressed: tuple[int, ...]):
    """(log-probs [N, T] of the completion tokens, entropy [N, T]) from one forward of the
    [prompt + completion] sequences: the logits at position i predict token i + 1."""
    logits = model(**batch.inputs).logits
    P, T = batch.prompt_length, batch.completions.shape[1]
    return completion_logp(logits[:, P - 1 : P - 1 + T], batch.completions, temperature, suppressed)


class SparsityForcingTrainer:
    def __init__(self, config: SFConfig, policy_model, reference_model, task: TrainingTask, device="cpu"):
        self.config, self.task, self.device = config, task, torch.device(device)
        self.rank, self.world_size = world()
        if config.prompts_per_step % self.world_size:
            raise ValueError(f"prompts_per_step ({config.prompts_per_step}) must divide over {self.world_size} ranks")
        self.policy = policy_model.to(self.device)
        self.reference = reference_model.to(self.device).eval().requires_grad_(False)
        # Rollouts decode through the TopPCache; the training forward replays their selections.
        import sparse_attn.attention  # noqa: F401  (registers the sparse_topp attention)

        self.policy.set_attn_implementation(REPLAY_ATTENTION)
        self.trained = self.policy
        if self.world_size > 1:
            self.trained = torch.nn.parallel.DistributedDataParallel(self.policy)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
        )
        self.step = 0
        self.out_dir = Path(config.out_dir)

    # --- one step ------------------------------------------------------------------------------

    def rollouts(self, inputs) -> list[Rollouts]:
        """One rollout per prompt and threshold, all through the deployment cache."""
        from sparse_attn.attention import enable

        enable(self.policy)
        self.policy.eval()
        try:
            return [
                rollout(self.policy, inputs, self.config.policy(p), max_new_tokens=self.config.max_new_tokens,
                        eos_token_id=self.task.eos_token_id, pad_token_id=self.task.pad_token_id,
                        temperature=self.config.temperature, suppressed=self.task.suppressed_token_ids)
                for p in self.config.p_grid
            ]
        finally:
            self.policy.set_attn_implementation(REPLAY_ATTENTION)
            self.policy.train()

    def soft_tau(self, inputs: dict, replayed_scores: list[Tensor] | None = None) -> Tensor:
        """[B] the smoothed token ratio of each prompt over the p grid, differentiable in the weights.

        Under the dense prefill every rollout's selection scores the dense model's probe attention,
        the same for every p: one dense forward of the prompts. Under the sparse prefill each
        layer's scores depend on what the earlier layers kept at that rollout's p: the training
        forward's replay collects them (``replayed_scores``, per layer [G * B, P], p-major rows),
        and each rollout's smoothed ratio is taken at its own p."""
        cfg = self.config
        valid = inputs["attention_mask"].bool()
        if replayed_scores is None:
            scores = probe_scores(self.policy, inputs, cfg.n_probe)
            return soft_token_ratio(scores, valid, cfg.policy(cfg.deploy_p), cfg.p_grid, cfg.soft_tau_temperature)
        scores = torch.stack(replayed_scores)  # [n_layers, G * B, P]
        B = valid.shape[0]
        per_p = [soft_token_ratio(scores[:, g * B:(g + 1) * B], valid, cfg.policy(cfg.deploy_p), [p],
                                  cfg.soft_tau_temperature) for g, p in enumerate(cfg.p_grid)]
        return torch.stack(per_p).mean(0)

    def train_step(self) -> dict[str, float]:
        cfg, task = self.config, self.task
        per_rank = cfg.prompts_per_step // self.world_size
        samples = task.samples("train", (self.step * self.world_size + self.rank) * per_rank, per_rank)
        inputs = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in task.encode(samples).items()}

        started = time.perf_counter()
        groups = self.rollouts(inputs)
        rollout_seconds = time.perf_counter() - started

        texts = [task.decode(g.completions) for g in groups]  # [G][B]
        correct = torch.tensor([[task.is_correct(task.prompt(s), texts[g][b], task.answer(s))
                                 for g in range(len(groups))] for b, s in enumerate(samples)])  # [B, G]
        tau = torch.stack([g.token_ratio for g in groups], dim=1).cpu()  # [B, G]
        rewards = joint_rewards(correct, tau, gate=cfg.efficiency_gate, weight=cfg.efficiency_weight)
        advantages, zero_variance = group_advantages(rewards, eps=cfg.advantage_eps)

        batch = training_batch(inputs, groups, advantages, task.pad_token_id)
        with torch.no_grad():
            logp_ref, _ = sequence_logp(self.reference, batch, cfg.temperature, task.suppressed_token_ids)
        # Under the sparse prefill the smoothed token ratio scores the replayed forward itself.
        replay_scores = cfg.n_probe if cfg.soft_tau_weight and cfg.prefill == "sparse" else None
        for _ in range(cfg.inner_epochs):
            with replaying(batch.selections, batch.prompt_length, cfg.replay_gradient(),
                           probe_scores=replay_scores) as replay:
                logp, entropy = sequence_logp(self.trained, batch, cfg.temperature, task.suppressed_token_ids)
            loss, stats = grpo_loss(
                logp, batch.logp_old, logp_ref, batch.advantages, batch.mask, clip_eps=cfg.clip_eps,
                clip_eps_high=cfg.clip_eps_high, beta=cfg.beta, normalization=cfg.normalization,
                max_completion_length=cfg.max_new_tokens,
            )
            if cfg.soft_tau_weight:  # the efficiency reward's pathwise gradient, gated like the reward
                gate = efficiency_gate(correct, cfg.efficiency_gate).mean(1).to(self.device)
                soft_tau = self.soft_tau(inputs, replay.scores if replay_scores else None)
                loss = loss + cfg.soft_tau_weight * (gate * soft_tau).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.max_grad_norm)
            for group in self.optimizer.param_groups:  # a function of the step: resume stays exact
                group["lr"] = cfg.lr_at(self.step)
            self.optimizer.step()
        self.step += 1

        n_tokens = float(batch.mask.sum())
        metrics = {
            "loss": loss.item(),
            "reward": float(rewards.mean()),
            "accuracy": float(correct.float().mean()),
            "token_ratio": float(tau.mean()),
            "kl": stats.kl,
            "clip_fraction": stats.clip_fraction,
            "entropy": float((entropy.detach() * batch.mask).sum() / max(n_tokens, 1.0)),
            "grad_norm": float(grad_norm),
            "lr": cfg.lr_at(self.step - 1),
            "zero_variance_groups": float(zero_variance.float().mean()),
            **({"soft_token_ratio": float(soft_tau.detach().mean())} if cfg.soft_tau_weight else {}),
            "rollout_tokens_per_s": n_tokens / max(rollout_seconds, 1e-9),
        }
        for g, group in enumerate(groups):
            metrics[f"accuracy@{group.p}"] = float(correct[:, g].float().mean())
            metrics[f"token_ratio@{group.p}"] = float(tau[:, g].mean())
        for layer, ratio in enumerate(np.mean([g.layer_ratios for g in groups], axis=0)):
            metrics[f"layer_retention/{layer}"] = float(ratio)
        return {"step": self.step, **mean_over_ranks(metrics)}

    # --- the loop, checkpoints -----------------------------------------------------------------

    def train(self, progress: bool = True) -> list[dict]:
        from tqdm.auto import tqdm

        history = []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = tqdm(total=self.config.steps, initial=self.step, disable=not progress or self.rank != 0, desc="sparsity forcing")
        while self.step < self.config.steps:
            metrics = self.train_step()
            history.append(metrics)
            if self.rank == 0:
                with open(self.out_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                bar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                                tau=f"{metrics['token_ratio']:.3f}", kl=f"{metrics['kl']:.4f}")
            bar.update(1)
            if self.step % self.config.save_every == 0 or self.step == self.config.steps:
                self.save_checkpoint()
        bar.close()
        return history

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        state = {
            "step": self.step,
            "config": self.config.to_dict(),
            "model": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        }
        tmp = self.out_dir / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.out_dir / CHECKPOINT_FILE)  # never leave a half-written checkpoint

    def resume(self) -> None:
        """Continue exactly where the checkpoint in out_dir stopped (weights, optimizer, RNG, step)."""
        state = torch.load(self.out_dir / CHECKPOINT_FILE, weights_only=False)
        self.policy.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        self.step = state["step"]
        metrics = self.out_dir / METRICS_FILE
        if self.rank == 0 and metrics.exists():  # drop lines logged after the checkpoint
            lines = [l for l in metrics.read_text().splitlines() if json.loads(l)["step"] <= self.step]
            metrics.write_text("".join(l + "\n" for l in lines))
