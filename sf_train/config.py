"""Sparsity Forcing run configuration (one dataclass; YAML or JSON files override defaults)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from sparse_attn.policy import TopPPolicy

from .loss import NORMALIZATIONS
from .replay import SelectionGradient
from .rewards import EFFICIENCY_GATES

LR_SCHEDULES = ("constant", "linear", "cosine")


def default_p_grid() -> tuple[float, ...]:
    """The paper's multi-budget grid: p in [0.94, 0.975], step 0.005 (group size 8)."""
    return tuple(round(0.94 + 0.005 * i, 3) for i in range(8))


@dataclass
class SFConfig:
    # what to train
    model: str = "sf_train/checkpoints/base"  # checkpoint directory
    task: str = "embedded_vqa"
    out_dir: str = "runs/sparsity_forcing"
    seed: int = 0
    # multi-budget rollouts
    steps: int = 40
    prompts_per_step: int = 8  # over all ranks; each prompt gets one rollout per p
    p_grid: tuple[float, ...] = field(default_factory=default_p_grid)
    deploy_p: float = 0.975  # the grid's upper bound, fixed at deployment
    temperature: float = 1.0
    max_new_tokens: int = 4
    # top-p cache (TopPPolicy fields other than p)
    n_probe: int = 64
    keep_first: int = 4
    keep_last: int = 16
    granularity: str = "layer"
    prune: str = "all"
    # "sparse" (ZipVL / the paper): each layer's prefill attends only among its kept tokens;
    # "dense": exact prefill, then compaction (TopPPolicy.prefill, docs/sparse_prefill.md)
    prefill: str = "sparse"
    # reward and objective
    efficiency_gate: str = "group"  # "group": the paper's C; "rollout": only correct rollouts
    efficiency_weight: float = 1.0  # r = correct + efficiency_weight * C * (1 - tau); 1 = the paper
    # beyond the paper: + soft_tau_weight * C * (smoothed tau over the grid) in the loss, the pathwise
    # gradient of the efficiency reward that GRPO leaves out (sf_train/soft_token_ratio.py); 0 = off
    soft_tau_weight: float = 0.0
    soft_tau_temperature: float = 0.01
    # beyond the paper: the training forward's completion attention takes a straight-through keep
    # mask, so the loss also reaches which prompt tokens the selection keeps (sf_train/replay.py)
    selection_gradient: bool = False
    selection_gradient_temperature: float = 1.0
    advantage_eps: float = 1e-4
    beta: float = 0.04
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    normalization: str = "grpo"
    inner_epochs: int = 1
    lr: float = 1e-5
    # the learning rate over the run: "constant" (after warm-up), or "cosine" / "linear" decay
    # from lr to lr * min_lr_ratio at the last step (TRL's lr_scheduler_type)
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # bookkeeping
    save_every: int = 10
    eval_samples: int = 128
    baseline_samples: int = 128  # held-out samples per point of `main`'s selection-rule comparison
    eval_p: tuple[float, ...] = (0.975, 1.0)

    def __post_init__(self):
        self.p_grid = tuple(float(p) for p in self.p_grid)
        self.eval_p = tuple(float(p) for p in self.eval_p)
        for name in ("p_grid", "eval_p"):
            bad = [p for p in getattr(self, name) if not 0.0 < p <= 1.0]
            if bad or not getattr(self, name):
                raise ValueError(f"SFConfig.{name} must be a non-empty list of p in (0, 1], got {getattr(self, name)}")
        if len(self.p_grid) < 2:
            raise ValueError("SFConfig.p_grid needs at least 2 thresholds: GRPO compares rollouts within a group")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"SFConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"SFConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("SFConfig.warmup_steps must be >= 0 and min_lr_ratio in [0, 1], got "
                             f"{self.warmup_steps} and {self.min_lr_ratio}")
        if self.efficiency_gate not in EFFICIENCY_GATES:
            raise ValueError(f"SFConfig.efficiency_gate must be one of {EFFICIENCY_GATES}, got {self.efficiency_gate!r}")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "inner_epochs", "save_every", "eval_samples",
                     "baseline_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.efficiency_weight >= 0:
            raise ValueError(f"SFConfig.efficiency_weight must be >= 0, got {self.efficiency_weight}")
        if not self.soft_tau_weight >= 0:
            raise ValueError(f"SFConfig.soft_tau_weight must be >= 0, got {self.soft_tau_weight}")
        if not self.soft_tau_temperature > 0:
            raise ValueError(f"SFConfig.soft_tau_temperature must be > 0, got {self.soft_tau_temperature}")
        for name in ("soft_tau_weight", "selection_gradient"):
            if getattr(self, name) and (self.prune != "all" or self.granularity != "layer"):
                raise ValueError(f"SFConfig.{name} needs prune='all' and granularity='layer', got "
                                 f"prune={self.prune!r}, granularity={self.granularity!r}")
        if not self.selection_gradient_temperature > 0:
            raise ValueError(f"SFConfig.selection_gradient_temperature must be > 0, got {self.selection_gradient_temperature}")
        if self.temperature <= 0:
            raise ValueError(f"SFConfig.temperature must be > 0 (rollouts sample), got {self.temperature}")
        self.policy(self.deploy_p)  # TopPPolicy validates the cache fields

    def lr_at(self, step: int) -> float:
        """The learning rate of the update that ends step ``step + 1`` (step counts from 0)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - 1 - self.warmup_steps))
        decay = {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay[self.lr_schedule])

    def replay_gradient(self) -> SelectionGradient | None:
        """What the training forward's replay needs for selection_gradient (None when off)."""
        if not self.selection_gradient:
            return None
        return SelectionGradient(self.n_probe, self.keep_first, self.keep_last, self.selection_gradient_temperature)

    def policy(self, p: float) -> TopPPolicy:
        return TopPPolicy(p=p, n_probe=self.n_probe, keep_first=self.keep_first, keep_last=self.keep_last,
                          granularity=self.granularity, reselect_every=0, prune=self.prune, prefill=self.prefill)

    @staticmethod
    def file_values(path: str | Path) -> dict:
        """The fields a YAML (.yaml / .yml) or JSON config file sets."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        unknown = set(values) - {f.name for f in fields(SFConfig)}
        if unknown:
            raise ValueError(f"unknown SFConfig fields in {path}: {sorted(unknown)}")
        return values

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> "SFConfig":
        """A config from YAML (.yaml / .yml) or JSON, then keyword overrides."""
        return cls(**{**cls.file_values(path), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)
