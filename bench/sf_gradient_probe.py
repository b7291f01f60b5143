"""Does a Sparsity Forcing update make the probes' attention more concentrated?

The top-p selection is discrete and the token ratio tau is a function of the prompt's probe
attention alone, so GRPO's gradient reaches tau only through weights the completion's forward
shares with the probes. This script measures that link on real rollouts: for each batch it
computes the gradient of the GRPO loss with the advantages of the efficiency reward alone, of the
correctness reward alone and of the joint reward, and the gradient of a differentiable stand-in
for tau - the probes' attention "effective support" exp(entropy) / valid tokens, averaged over
layers - and prints the cosine between each loss gradient and the stand-in's. A positive cosine
means the update lowers the stand-in (more concentrated attention, fewer tokens at fixed p).

    python bench/sf_gradient_probe.py --model sf_train/checkpoints/base --batches 4 \
        [--set lr=... temperature=...] [--out bench/results/sf_gradient_probe.json]
"""
from __future__ import annotations

import argparse
import json

import torch

from sf_train.cli import load_models_and_task, parse_overrides
from sf_train.config import SFConfig
from sf_train.loss import grpo_loss
from sf_train.replay import replaying
from sf_train.rewards import group_advantages, joint_rewards
from sf_train.trainer import SparsityForcingTrainer, sequence_logp, training_batch


def probe_support(model, inputs: dict, n_probe: int) -> torch.Tensor:
    """exp(entropy of the probes' summed attention over keys) / valid tokens, mean over layers and
    rows: differentiable, and lower when fewer tokens hold the probes' attention mass."""
    model.set_attn_implementation("eager")
    try:
        attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    valid = inputs["attention_mask"].bool()
    supports = []
    for a in attentions:  # [B, Hq, L, L]
        mass = a[:, :, -n_probe:, :].sum(dim=(1, 2)).masked_fill(~valid, 0.0)
        dist = mass / mass.sum(-1, keepdim=True)
        entropy = -(dist * dist.clamp_min(1e-30).log()).sum(-1)
        supports.append(entropy.exp() / valid.sum(-1))
    return torch.stack(supports).mean()


def flat_grad(loss: torch.Tensor, params: list) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", type=int, default=4)
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
        groups = trainer.rollouts(inputs)
        texts = [task.decode(g.completions) for g in groups]
        correct = torch.tensor([[task.is_correct(task.prompt(s), texts[g][b], task.answer(s))
                                 for g in range(len(groups))] for b, s in enumerate(samples)])
        tau = torch.stack([g.token_ratio for g in groups], dim=1).cpu()
        joint = joint_rewards(correct, tau, gate=config.efficiency_gate, weight=config.efficiency_weight)
        efficiency = joint_rewards(correct, tau, gate=config.efficiency_gate) - correct.float()
        rewards = {"efficiency": efficiency, "correctness": correct.float(), "joint": joint}
        proxy_grad = flat_grad(probe_support(policy, inputs, config.n_probe), params)
        row = {"step": step, "accuracy": float(correct.float().mean()), "token_ratio": float(tau.mean())}
        for name, r in rewards.items():
            advantages, _ = group_advantages(r)
            batch = training_batch(inputs, groups, advantages, task.pad_token_id)
            with replaying(batch.selections, batch.prompt_length):
                logp, _ = sequence_logp(policy, batch, config.temperature, task.suppressed_token_ids)
            loss, _ = grpo_loss(logp, batch.logp_old, logp.detach(), batch.advantages, batch.mask,
                                clip_eps=config.clip_eps, beta=0.0, normalization=config.normalization,
                                max_completion_length=config.max_new_tokens)
            g = flat_grad(loss, params)
            row[f"cos_{name}"] = float(torch.nn.functional.cosine_similarity(g, proxy_grad, dim=0))
            row[f"grad_norm_{name}"] = float(g.norm())
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    summary = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if k != "step"}
    print("mean:", json.dumps({k: round(v, 4) for k, v in summary.items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": config.to_dict(), "batches": rows, "mean": summary}, f, indent=2)


if __name__ == "__main__":
    main()
