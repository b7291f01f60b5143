"""The Sparsity Forcing loop: multi-budget rollouts -> joint reward -> GRPO update
(docs/design.md#the-trainer).

One step: each prompt is decoded once per threshold p of the grid through a TopPCache (the
deployment pipeline), each rollout is scored r = correct + C * (1 - tau), advantages are
normalised within the prompt's group, and the policy is updated with the clipped surrogate +
beta * KL to the dense reference, its forward replaying each rollout's recorded selections.

Distributed: under torchrun every rank takes its own prompts (a group never spans ranks, so
group statistics are local), gradients are averaged by DDP or reduce-scattered by FSDP2
(docs/scale.md#fsdp), and logged metrics are averaged over ranks. LoRA, bf16 and gradient
checkpointing: docs/scale.md.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sparse_attn.attention import visual_token_ids

from . import scale
from .batch import (
    TrainingBatch,
    logp_from_logits,
    sequence_logp,
    shared_prompt_logits,
    training_batch,
)
from .config import SFConfig
from .distributed import all_gather_objects, ensure_process_group, mean_over_ranks, shard, world
from .loss import distillation_kl, grpo_loss, normalize
from .replay import REPLAY_ATTENTION, replaying
from .rewards import efficiency_gate, group_advantages, joint_rewards, score_rollouts
from .rollout import Rollouts, rollout
from .shared_vision import share_image_features
from .soft_token_ratio import probe_scores, soft_token_ratio
from .tasks import TrainingTask

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FORMAT = 2  # tensors and plain values only: loadable with torch.load(weights_only=True)
# SFConfig fields a resumed run may change; every other one must match the checkpoint's run.
RESUMABLE_FIELDS = (
    "steps",
    "out_dir",
    "save_every",
    "eval_samples",
    "baseline_samples",
    "eval_p",
    "distributed",
    "gradient_checkpointing",
)  # the checkpoint is unsharded; recomputation changes no value


class SparsityForcingTrainer:
    def __init__(
        self, config: SFConfig, policy_model, reference_model, task: TrainingTask, device="cpu"
    ):
        self.config, self.task, self.device = config, task, torch.device(device)
        if (
            config.distributed == "fsdp"
        ):  # FSDP on one process too (bf16 compute, fp32 master weights)
            ensure_process_group(self.device)
        self.rank, self.world_size = world()
        if config.prompts_per_step % self.world_size:
            raise ValueError(
                f"prompts_per_step ({config.prompts_per_step}) must divide over {self.world_size} ranks"
            )
        self.policy = policy_model.to(self.device)
        # LoRA (docs/scale.md#lora): adapters on the policy, whose adapter-free forward is the reference.
        self.peft_model = scale.apply_lora(self.policy, config) if config.lora_rank else None
        if self.peft_model is not None:
            if reference_model is not None:
                raise ValueError(
                    "with SFConfig.lora_rank > 0 the reference is the policy with its adapters disabled: "
                    "pass reference_model=None (no second copy)"
                )
            self.reference = None
            scale.freeze_to_dtype(self.policy, config)  # the frozen base; the adapters stay fp32
        else:
            if reference_model is None:
                raise ValueError(
                    "full fine-tuning (SFConfig.lora_rank = 0) needs a reference_model"
                )
            self.reference = reference_model.to(self.device).eval().requires_grad_(False)
            scale.freeze_to_dtype(self.reference, config)
        # Each image once per call, and once per step in the rollouts (sf_train/shared_vision.py).
        for model in (self.policy, self.reference):
            if model is not None:
                share_image_features(model, reuse=not config.lora_rank)
        if (
            config.gradient_checkpointing
        ):  # non-reentrant: works with frozen inputs (LoRA) and FSDP2
            scale.enable_checkpointing(self.policy)
        # Rollouts decode through the TopPCache; the training forward replays their selections.
        import sparse_attn.attention  # noqa: F401  (registers the sparse_topp attention)

        self.policy.set_attn_implementation(REPLAY_ATTENTION)
        self.trained = self.policy
        self.sharded = config.distributed == "fsdp"
        if self.sharded:
            shard(self.policy, bf16=config.dtype == "bfloat16")
            if self.reference is not None:
                shard(self.reference, bf16=config.dtype == "bfloat16")
        elif self.world_size > 1:
            self.trained = torch.nn.parallel.DistributedDataParallel(self.policy)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad],
            lr=config.lr,
            weight_decay=config.weight_decay,
        )
        self.step = 0
        self.resumed = False
        self.out_dir = Path(config.out_dir)
        # The reference computes each prompt once per group (shared_prompt_logits) once that is
        # checked against the whole-batch forward on the first step: None = not yet checked.
        self.shares_prompts: bool | None = None

    def final_model(self):
        """The model to save at the end: the policy; with LoRA, the adapters merged into it
        (SFConfig.lora_merge) or the PeftModel (saves the adapter alone)."""
        if self.peft_model is None:
            return self.policy
        return self.peft_model.merge_and_unload() if self.config.lora_merge else self.peft_model

    def final_state_dict(self) -> dict | None:
        """A sharded policy's full weights (a collective: every rank calls it); None otherwise."""
        return scale.model_state(self.policy, trainable_only=False) if self.sharded else None

    @contextmanager
    def _reference_model(self):
        """The frozen dense reference: the reference copy, or (LoRA) the policy with its adapters
        disabled, in eval mode for the block."""
        if self.peft_model is None:
            yield self.reference
            return
        self.policy.eval()
        try:
            with scale.adapters_disabled(self.peft_model):
                yield self.policy
        finally:
            self.policy.train()

    def reference_logp(
        self, batch: TrainingBatch, distribution: bool = False, prompts: dict | None = None
    ):
        """Log-probs of the completions under the frozen reference (dense attention, no grad);
        with ``distribution``, (log-probs, the whole log-distribution [N, T, V]). With
        ``prompts`` (the B prompts whose groups make the batch's rows), each prompt is computed
        once, its cache copied to its group's rows (shared_prompt_logits): the first call checks
        that against the whole-batch forward and, if they differ, keeps the latter for the run."""
        cfg, task = self.config, self.task
        sampling = (cfg.temperature, task.suppressed_token_ids)
        with torch.no_grad(), self._reference_model() as reference:
            if prompts is None or self.shares_prompts is False:
                out = sequence_logp(reference, batch, *sampling, distribution=distribution)
            else:
                logits = shared_prompt_logits(reference, prompts, batch)
                out = logp_from_logits(
                    logits, batch.completions, *sampling, distribution=distribution
                )
                if self.shares_prompts is None:
                    full = sequence_logp(reference, batch, *sampling, distribution=distribution)
                    same = self._same_logp(out[0], full[0], batch.mask)
                    # every rank takes the same path (a sharded forward is a collective)
                    self.shares_prompts = all(all_gather_objects(same))
                    out = out if self.shares_prompts else full
        return (out[0], out[2]) if distribution else out[0]

    def _same_logp(self, shared: Tensor, full: Tensor, mask: Tensor) -> bool:
        """Whether the shared-prompt reference reproduces the whole-batch forward's log-probs
        (to 1e-4 in fp32, 5e-2 in half precision); warns when it does not."""
        low = self.config.dtype != "float32"
        gap = float(((shared - full).abs() * mask).max()) if mask.any() else 0.0
        if gap <= (5e-2 if low else 1e-4):
            return True
        warnings.warn(
            f"the reference's shared-prompt forward differs from the whole-batch forward by "
            f"{gap:.3g} in log-prob on this model (its positions after a cache?): the reference "
            "runs every row's prompt for the rest of the run (docs/design.md#training-batch)",
            stacklevel=3,
        )
        return False

    def dense_distillation_target(
        self,
        inputs: dict,
        group: Rollouts,
        advantages: Tensor,
        logp_ref_all: Tensor | None = None,
    ):
        """(the batch of one rollout group's sequences - the grid's top p -, the reference's
        log-distribution over it) for dense_distillation: computed once a step. ``logp_ref_all``:
        the reference's log-distribution over the step's whole batch, whose last B rows are that
        group (p-major): taken from it rather than computed again."""
        batch = training_batch(inputs, [group], advantages[:, -1:], self.task.pad_token_id)
        if logp_ref_all is not None:
            B, T = batch.completions.shape
            return batch, logp_ref_all[-B:, :T]
        return batch, self.reference_logp(batch, distribution=True, prompts=inputs)[1]

    def dense_distillation(self, batch: TrainingBatch, logp_ref_all: Tensor) -> Tensor:
        """KL(dense reference || dense policy) over the vocabulary at the completion positions of
        ``batch``, the policy's forward keeping every token: the pruned rollouts train the model
        on inputs where dropped positions got no attention output, and this term keeps what the
        model does when nothing is dropped."""
        cfg, task = self.config, self.task
        # outside a replaying block the replay attention is the dense SDPA
        _, _, logp_all = sequence_logp(
            self.trained, batch, cfg.temperature, task.suppressed_token_ids, distribution=True
        )
        return normalize(
            distillation_kl(logp_all, logp_ref_all),
            batch.mask,
            cfg.normalization,
            cfg.max_new_tokens,
        )

    # --- one step ------------------------------------------------------------------------------

    def rollouts(self, inputs) -> list[Rollouts]:
        """One rollout per prompt and threshold, all through the deployment cache."""
        from sparse_attn.attention import enable

        enable(self.policy)
        self.policy.eval()
        try:
            # Sharded: every forward is a collective, so ranks keep decoding until all are done.
            return [
                rollout(
                    self.policy,
                    inputs,
                    self.config.policy(p),
                    max_new_tokens=self.config.max_new_tokens,
                    eos_token_id=self.task.eos_token_id,
                    pad_token_id=self.task.pad_token_id,
                    temperature=self.config.temperature,
                    suppressed=self.task.suppressed_token_ids,
                    synced_gpus=self.sharded and self.world_size > 1,
                )
                for p in self.config.p_grid
            ]
        finally:
            self.policy.set_attn_implementation(REPLAY_ATTENTION)
            self.policy.train()

    def candidate_mask(self, input_ids: Tensor) -> Tensor | None:
        """bool, input_ids' shape: the rule's candidates under prune="visual" (the image / video
        tokens); None under prune="all" (every valid token is one)."""
        if self.config.prune == "all":
            return None
        ids = visual_token_ids(self.policy.config)
        if not ids:
            raise ValueError(
                "SFConfig.prune='visual' needs a model whose config has image_token_id / "
                "video_token_id"
            )
        return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))

    def soft_tau(self, inputs: dict, replayed_scores: list[Tensor] | None = None) -> Tensor:
        """[B] the smoothed token ratio of each prompt over the p grid, differentiable in the weights.

        Under the dense prefill every rollout's selection scores the dense model's probe attention,
        the same for every p: one dense forward of the prompts. Under the sparse prefill each
        layer's scores depend on what the earlier layers kept at that rollout's p: the training
        forward's replay collects them (``replayed_scores``, per layer [G * B, P], p-major rows),
        and each rollout's smoothed ratio is taken at its own p."""
        cfg = self.config
        valid = inputs["attention_mask"].bool()
        candidates = self.candidate_mask(inputs["input_ids"])
        if replayed_scores is None:
            scores = probe_scores(self.policy, inputs, cfg.n_probe)
            return soft_token_ratio(
                scores,
                valid,
                cfg.policy(cfg.deploy_p),
                cfg.p_grid,
                cfg.soft_tau_temperature,
                candidates,
            )
        scores = torch.stack(replayed_scores)  # [n_layers, G * B, P]
        B = valid.shape[0]
        per_p = [
            soft_token_ratio(
                scores[:, g * B : (g + 1) * B],
                valid,
                cfg.policy(cfg.deploy_p),
                [p],
                cfg.soft_tau_temperature,
                candidates,
            )
            for g, p in enumerate(cfg.p_grid)
        ]
        return torch.stack(per_p).mean(0)

    def train_step(self) -> dict[str, float]:
        cfg, task = self.config, self.task
        per_rank = cfg.prompts_per_step // self.world_size
        samples = task.samples(
            "train", (self.step * self.world_size + self.rank) * per_rank, per_rank
        )
        inputs = {
            k: v.to(self.device) if isinstance(v, Tensor) else v
            for k, v in task.encode(samples).items()
        }

        started = time.perf_counter()
        groups = self.rollouts(inputs)
        rollout_seconds = time.perf_counter() - started

        correct, tau = score_rollouts(task, samples, groups)  # [B, G] each
        rewards = joint_rewards(
            correct, tau, gate=cfg.efficiency_gate, weight=cfg.efficiency_weight
        )
        advantages, zero_variance = group_advantages(rewards, eps=cfg.advantage_eps)

        batch = training_batch(inputs, groups, advantages, task.pad_token_id)
        distill = cfg.distill_weight > 0
        logp_ref = self.reference_logp(batch, distribution=distill, prompts=inputs)
        logp_ref_all = None
        if distill:
            logp_ref, logp_ref_all = logp_ref
        if cfg.distill_dense:  # the reference side once; the policy side in every inner epoch
            dense_target = self.dense_distillation_target(
                inputs, groups[-1], advantages, logp_ref_all
            )
        # Under the sparse prefill the smoothed token ratio scores the replayed forward itself.
        replay_scores = cfg.n_probe if cfg.soft_tau_weight and cfg.prefill == "sparse" else None
        candidates = self.candidate_mask(batch.inputs["input_ids"][:, : batch.prompt_length])
        for _ in range(cfg.inner_epochs):
            with replaying(
                batch.selections,
                batch.prompt_length,
                cfg.replay_gradient(),
                probe_scores=replay_scores,
                answer_leak=cfg.leak_weight > 0,
                candidate_mask=candidates,
            ) as replay:
                logp, entropy, *logp_all = sequence_logp(
                    self.trained,
                    batch,
                    cfg.temperature,
                    task.suppressed_token_ids,
                    distribution=distill,
                )
            loss, stats = grpo_loss(
                logp,
                batch.logp_old,
                logp_ref,
                batch.advantages,
                batch.mask,
                clip_eps=cfg.clip_eps,
                clip_eps_high=cfg.clip_eps_high,
                beta=cfg.beta,
                normalization=cfg.normalization,
                max_completion_length=cfg.max_new_tokens,
            )
            if distill:  # the dense reference's whole next-token distribution, every rollout
                distill_kl = normalize(
                    distillation_kl(logp_all[0], logp_ref_all),
                    batch.mask,
                    cfg.normalization,
                    cfg.max_new_tokens,
                )
                loss = loss + cfg.distill_weight * distill_kl
            if cfg.leak_weight:  # the first token's dense attention outside the kept sets
                leak = torch.stack(replay.leaks).mean()
                loss = loss + cfg.leak_weight * leak
            if cfg.distill_dense:  # and of the dense policy (every token kept), top p's completions
                dense_kl = self.dense_distillation(*dense_target)
                loss = loss + cfg.distill_weight * dense_kl
            if (
                cfg.soft_tau_weight
            ):  # the efficiency reward's pathwise gradient, gated like the reward
                gate = efficiency_gate(correct, cfg.efficiency_gate).mean(1).to(self.device)
                soft_tau = self.soft_tau(inputs, replay.scores if replay_scores else None)
                excess = (soft_tau - cfg.soft_tau_target).clamp_min(0.0)
                loss = loss + cfg.soft_tau_weight * (gate * excess).mean()
            self.optimizer.zero_grad(set_to_none=True)
            # Under gradient checkpointing the layers recompute their forward during backward: it
            # must replay the same selections (docs/scale.md#gradient-checkpointing).
            with replaying(
                batch.selections,
                batch.prompt_length,
                cfg.replay_gradient(),
                candidate_mask=candidates,
            ):
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.policy.parameters() if p.requires_grad], cfg.max_grad_norm
            )
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                grad_norm = grad_norm.full_tensor()
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
            **(
                {"soft_token_ratio": float(soft_tau.detach().mean())} if cfg.soft_tau_weight else {}
            ),
            **({"distill_kl": float(distill_kl.detach())} if distill else {}),
            **({"answer_leak": float(leak.detach())} if cfg.leak_weight else {}),
            **({"distill_dense_kl": float(dense_kl.detach())} if cfg.distill_dense else {}),
            "rollout_tokens_per_s": n_tokens / max(rollout_seconds, 1e-9),
        }
        for g, group in enumerate(groups):
            metrics[f"accuracy@{group.p}"] = float(correct[:, g].float().mean())
            metrics[f"token_ratio@{group.p}"] = float(tau[:, g].mean())
        for layer, ratio in enumerate(np.mean([g.layer_ratios for g in groups], axis=0)):
            metrics[f"layer_retention/{layer}"] = float(ratio)
        return {"step": self.step, **mean_over_ranks(metrics)}

    # --- the loop, checkpoints -----------------------------------------------------------------

    def train(self, progress: bool = True, overwrite: bool = False) -> list[dict]:
        """Run to config.steps. A fresh run (no resume()) refuses an out_dir that already holds a
        run's checkpoint or metrics, unless ``overwrite`` (then they are deleted first)."""
        from sparse_attn.progress import progress as progress_bar

        if not self.resumed:
            check_fresh_out_dir(self.out_dir, overwrite, delete=self.rank == 0)
        history = []
        self.out_dir.mkdir(parents=True, exist_ok=True)
        bar = progress_bar(
            total=self.config.steps,
            initial=self.step,
            disable=not progress or self.rank != 0,
            desc="sparsity forcing",
        )
        while self.step < self.config.steps:
            metrics = self.train_step()
            history.append(metrics)
            if self.rank == 0:
                with open(self.out_dir / METRICS_FILE, "a") as f:
                    f.write(json.dumps(metrics) + "\n")
                bar.set_postfix(
                    reward=f"{metrics['reward']:.3f}",
                    acc=f"{metrics['accuracy']:.2f}",
                    tau=f"{metrics['token_ratio']:.3f}",
                    kl=f"{metrics['kl']:.4f}",
                )
            bar.update(1)
            if self.step % self.config.save_every == 0 or self.step == self.config.steps:
                self.save_checkpoint()
        bar.close()
        return history

    def save_checkpoint(self) -> None:
        """out_dir/checkpoint.pt: step, config, the trained tensors (all weights; LoRA: the
        adapters), optimizer and every rank's RNG, as tensors and plain values only. Every rank
        calls it (gathering a sharded model is a collective); rank 0 writes, durably."""
        lora = self.peft_model is not None
        state = {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config": self.config.to_dict(),
            "lora": lora,
            "model": scale.model_state(self.policy, trainable_only=lora),
            "optimizer": scale.optimizer_state(self.policy, self.optimizer),
            "rng": gather_rng_states(),
        }
        if self.rank == 0:
            write_durably(state, self.out_dir / CHECKPOINT_FILE)

    def resume(self) -> None:
        """Continue exactly where the checkpoint in out_dir stopped (weights, optimizer, every
        rank's RNG, step). The run's config must be the checkpoint's, but for RESUMABLE_FIELDS."""
        state = load_checkpoint(self.out_dir / CHECKPOINT_FILE)
        check_resumed_config(state["config"], self.config, self.out_dir / CHECKPOINT_FILE)
        if state["lora"] != (self.peft_model is not None):
            raise ValueError(
                f"{self.out_dir / CHECKPOINT_FILE} holds a {'LoRA' if state['lora'] else 'full'} "
                "fine-tuning run; SFConfig.lora_rank must match it"
            )
        scale.load_model_state(self.policy, state["model"], trainable_only=state["lora"])
        scale.load_optimizer_state(self.policy, self.optimizer, state["optimizer"])
        rngs = state["rng"]
        if len(rngs) != self.world_size:
            warnings.warn(
                f"the checkpoint holds the RNG states of {len(rngs)} ranks and this run has "
                f"{self.world_size}: rollouts will not repeat the uninterrupted run's samples",
                stacklevel=2,
            )
        set_rng_state(rngs[self.rank % len(rngs)])
        self.step = state["step"]
        self.resumed = True
        if self.rank == 0:
            truncate_metrics(self.out_dir / METRICS_FILE, self.step)


def check_fresh_out_dir(out_dir: Path, overwrite: bool, delete: bool = True) -> None:
    """Refuse to start a run over an earlier one's checkpoint / metrics (it would append to its
    metrics and replace its checkpoint), unless ``overwrite``: then delete them."""
    existing = [
        out_dir / name for name in (CHECKPOINT_FILE, METRICS_FILE) if (out_dir / name).exists()
    ]
    if not existing:
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds a run ({', '.join(p.name for p in existing)}): continue it "
            "with --resume, start over with --overwrite, or pick another out_dir"
        )
    if delete:
        for path in existing:
            path.unlink(missing_ok=True)


def write_durably(state: dict, path: Path) -> None:
    """torch.save to a temporary file, flushed and fsynced, then renamed over ``path`` (and the
    directory fsynced): a crash leaves the old or the new checkpoint, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """A checkpoint written by save_checkpoint, loaded with torch.load(weights_only=True): a
    file holding anything but tensors and plain values (code, in a pickle) is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint to resume at {path} (SFConfig.out_dir = {path.parent}): "
            "start the run without --resume, or point out_dir at the run to continue"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} is not a checkpoint sf_train loads: it holds objects other than tensors and plain "
            f"values, which torch.load(weights_only=True) refuses to run ({str(e).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is not a format-{CHECKPOINT_FORMAT} sf_train checkpoint (written by another "
            "version?): start a new run"
        )
    return state


def checkpoint_config(out_dir) -> dict:
    """The SFConfig fields of the run whose checkpoint is in ``out_dir``."""
    return load_checkpoint(Path(out_dir) / CHECKPOINT_FILE, mmap=True)["config"]


def check_resumed_config(stored: dict, config: SFConfig, path: Path) -> None:
    plain = lambda v: json.loads(json.dumps(v))  # tuples and lists compare equal
    current = config.to_dict()
    differ = {
        k: (v, current[k])
        for k, v in stored.items()
        if k in current and k not in RESUMABLE_FIELDS and plain(v) != plain(current[k])
    }
    if differ:
        lines = ", ".join(
            f"{k}={new!r} (checkpoint: {old!r})" for k, (old, new) in sorted(differ.items())
        )
        raise ValueError(
            f"--resume continues the run of {path} with its config; this run asks for {lines}. "
            f"Only {', '.join(RESUMABLE_FIELDS)} may change on resume: drop the other settings, or start "
            "a new run in another out_dir"
        )


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines up to ``step`` (lines logged after the checkpoint are redone). A
    torn last line (a crash mid-write) is dropped with a warning; a bad line elsewhere is an error."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(
                    f"{path}: dropped a torn last line (a crash while it was written): {line[:60]!r}",
                    stacklevel=2,
                )
                continue
            raise ValueError(f"{path}, line {i + 1} is not JSON: {line[:60]!r}") from None
        if record["step"] <= step:
            kept.append(line)
    path.write_text("".join(l + "\n" for l in kept))


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (torch.load(weights_only=True))."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": version,
            "state": torch.tensor(mt, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's RNG states (rank order): each rank's rollouts sample from its own stream."""
    return all_gather_objects(rng_state())
