"""Does a Sparsity Forcing update make the probes' attention more concentrated?

The top-p selection is discrete and the token ratio tau is a function of the prompt's probe
attention alone, so GRPO's gradient reaches tau only through weights the completion's forward
shares with the probes. This script measures that link on real rollouts: for each batch it
computes the gradient of the GRPO loss with the advantages of the efficiency reward alone, of the
correctness reward alone and of the joint reward, and the gradient of tau itself made
differentiable (sf_train.soft_token_ratio at the deployment p: the exact rule with its step
smoothed), and prints the cosine between each loss gradient and tau's. A positive cosine means
the update lowers tau (more concentrated attention, fewer tokens kept at fixed p).

With --resamples K each batch's rollouts are drawn K times and the K gradients averaged:
``mean_ratio`` = |mean of the K gradients| / mean of their norms. A gradient whose expectation is
zero (pure sampling noise) gives ~1/sqrt(K); one with a real direction stays near 1. tau is fixed
by the prompt and p before anything is sampled, so on-policy the efficiency reward's expected
gradient is zero wherever the gate C is 1: E[A(p) grad log pi_p(o)] = A(p) E[grad log pi_p(o)] = 0.

    python bench/sf_gradient_probe.py --model sf_train/worlds/vqa/checkpoint --batches 4 \
        [--resamples 16] [--set lr=... temperature=...] [--out bench/results/sf_gradient_probe.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from sf_train.batch import sequence_logp, training_batch
from sf_train.config import SFConfig, parse_overrides
from sf_train.loss import grpo_loss
from sf_train.replay import replaying
from sf_train.rewards import group_advantages, joint_rewards, score_rollouts
from sf_train.soft_token_ratio import probe_scores, soft_token_ratio
from sf_train.trainer import SparsityForcingTrainer
from sf_train.worlds.registry import load_models_and_task


def flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


REWARDS = ("efficiency", "correctness", "joint")


def reward_gradients(trainer, task, config, params, samples, inputs) -> dict:
    """One draw of the batch's rollouts: the GRPO loss gradient for each reward of REWARDS."""
    groups = trainer.rollouts(inputs)
    correct, tau = score_rollouts(task, samples, groups)
    joint = joint_rewards(
        correct, tau, gate=config.efficiency_gate, weight=config.efficiency_weight
    )
    efficiency = joint_rewards(correct, tau, gate=config.efficiency_gate) - correct.float()
    rewards = {"efficiency": efficiency, "correctness": correct.float(), "joint": joint}
    out = {
        "accuracy": float(correct.float().mean()),
        "token_ratio": float(tau.mean()),
        "gate_open": float(correct.amax(dim=1).float().mean()),
    }
    for name, r in rewards.items():
        advantages, _ = group_advantages(r)
        batch = training_batch(inputs, groups, advantages, task.pad_token_id)
        with replaying(batch.selections, batch.prompt_length):
            logp, _ = sequence_logp(
                trainer.policy, batch, config.temperature, task.suppressed_token_ids
            )
        loss, _ = grpo_loss(
            logp,
            batch.logp_old,
            logp.detach(),
            batch.advantages,
            batch.mask,
            clip_eps=config.clip_eps,
            beta=0.0,
            normalization=config.normalization,
            max_completion_length=config.max_new_tokens,
        )
        out[name] = flat_grad(loss, params)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument(
        "--resamples", type=int, default=1, help="rollout draws per batch, gradients averaged"
    )
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    config = SFConfig(**{"model": args.model, **parse_overrides(args.set)})
    torch.manual_seed(config.seed)
    policy, reference, task = load_models_and_task(config)
    trainer = SparsityForcingTrainer(config, policy, reference, task)
    params = [p for p in policy.parameters() if p.requires_grad]

    rows = []
    for step in range(args.batches):
        samples = task.samples("train", step * config.prompts_per_step, config.prompts_per_step)
        inputs = dict(task.encode(samples))
        scores = probe_scores(policy, inputs, config.n_probe)
        tau_grad = flat_grad(
            soft_token_ratio(
                scores,
                inputs["attention_mask"].bool(),
                config.policy(config.deploy_p),
                [config.deploy_p],
                config.soft_tau_temperature,
            ).mean(),
            params,
        )
        draws = [
            reward_gradients(trainer, task, config, params, samples, inputs)
            for _ in range(args.resamples)
        ]
        row = {
            "step": step,
            "accuracy": sum(d["accuracy"] for d in draws) / len(draws),
            "token_ratio": sum(d["token_ratio"] for d in draws) / len(draws),
            "gate_open": sum(d["gate_open"] for d in draws) / len(draws),
        }
        for name in REWARDS:
            grads = torch.stack([d[name] for d in draws])
            mean = grads.mean(0)
            row[f"cos_{name}"] = float(torch.nn.functional.cosine_similarity(mean, tau_grad, dim=0))
            row[f"grad_norm_{name}"] = float(grads.norm(dim=1).mean())
            row[f"mean_ratio_{name}"] = float(
                mean.norm() / grads.norm(dim=1).mean().clamp_min(1e-30)
            )
        rows.append(row)
        print(
            json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}),
            flush=True,
        )
    summary = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "step"}
    print("mean:", json.dumps({k: round(v, 4) for k, v in summary.items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                {
                    "config": config.to_dict(),
                    "resamples": args.resamples,
                    "batches": rows,
                    "mean": summary,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
