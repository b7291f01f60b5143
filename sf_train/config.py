"""Sparsity Forcing run configuration (one dataclass; YAML or JSON files override defaults)."""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from sparse_attn.policy import TopPPolicy

from .loss import NORMALIZATIONS
from .replay import SelectionGradient
from .rewards import EFFICIENCY_GATES

LR_SCHEDULES = ("constant", "linear", "cosine")
DISTRIBUTED = ("ddp", "fsdp")
DTYPES = ("float32", "bfloat16")
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _typed(name: str, annotation: str, value):
    """``value`` as the type ``annotation`` names (the dataclass's string annotations), or a
    TypeError naming the field. Strings are parsed where a command line or YAML 1.1 leaves them
    (``--set flag=False``, ``lr: 1e-5``); nothing is rounded (``steps=2.5`` is refused)."""
    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None and optional:
        return None
    expected = {
        "bool": "a boolean",
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "tuple[float, ...]": "a list of numbers",
        "tuple[str, ...]": "a list of strings",
    }[base]
    bad = TypeError(
        f"SFConfig.{name} must be {expected}{' or null' if optional else ''}, got {value!r}"
    )
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if base == "int":
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if base == "float":
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if base == "str":
        if not isinstance(value, str):
            raise bad
        return value
    item = base[len("tuple[") : -len(", ...]")]
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]  # one value for a list field
    if not isinstance(value, (list, tuple)):
        raise bad
    try:
        return tuple(_typed(name, item, v) for v in value)
    except TypeError:
        raise bad from None


def check_types(config) -> None:
    """Set every field of ``config`` to its declared type, or raise a TypeError naming it."""
    for f in fields(config):
        setattr(config, f.name, _typed(f.name, f.type, getattr(config, f.name)))


def parse_overrides(pairs: list[str]) -> dict:
    """key=value pairs; values are read as JSON when they parse (numbers, lists, null)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def lr_factor(
    step: int,
    *,
    warmup_steps: int,
    decay_steps: int,
    min_lr_ratio: float,
    schedule: str = "cosine",
    stable_steps: int = 0,
) -> float:
    """The learning-rate multiplier of update ``step`` (from 0), for Sparsity Forcing
    (SFConfig.lr_at) and the worlds' supervised training (sf_train/worlds/sft_loop.py) alike.

    Linear warm-up over the first ``warmup_steps`` updates ((step + 1) / warmup_steps), 1 for
    ``stable_steps`` more (warmup-stable-decay), then a decay from 1 to ``min_lr_ratio`` over
    ``decay_steps`` more updates, constant after them: schedule "constant" (no decay), "linear"
    or "cosine".
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max(0, step - warmup_steps - stable_steps) / max(1, decay_steps))
    decay = {
        "constant": 1.0,
        "linear": 1.0 - progress,
        "cosine": 0.5 * (1.0 + math.cos(math.pi * progress)),
    }
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay[schedule]


def default_p_grid() -> tuple[float, ...]:
    """The paper's multi-budget grid: p in [0.94, 0.975], step 0.005 (group size 8)."""
    return tuple(round(0.94 + 0.005 * i, 3) for i in range(8))


def _field(default=MISSING, help: str = "", **kwargs):
    """A dataclass field whose help text sits next to its default (TRL's style); ``--help`` of
    every sf-train command prints it (SFConfig.help_text)."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class SFConfig:
    """One Sparsity Forcing run; every field's meaning is its ``help`` metadata (docs/design.md#the-trainer)."""

    # what to train
    model: str = _field(
        "", "checkpoint directory; empty: the embedded task's packaged base checkpoint"
    )
    task: str = _field(
        "embedded_vqa",
        "embedded_vqa, embedded_kv, or package.module:factory, where "
        "factory(model_dir) -> (policy, reference, TrainingTask)",
    )
    out_dir: str = _field(
        "runs/sparsity_forcing", "metrics.jsonl, checkpoint.pt, final/ and reports go here"
    )
    seed: int = _field(0, "torch seed at the start of training")
    # multi-budget rollouts
    steps: int = _field(40, "optimizer steps (each: rollouts, rewards, inner_epochs updates)")
    prompts_per_step: int = _field(
        8, "prompts per step over all ranks; each gets one rollout per p of p_grid"
    )
    p_grid: tuple[float, ...] = _field(
        help="the thresholds p of the multi-budget rollouts (one GRPO group per "
        "prompt); default the paper's 0.940..0.975, step 0.005",
        default_factory=default_p_grid,
    )
    deploy_p: float = _field(0.975, "the threshold fixed at deployment (the grid's upper bound)")
    temperature: float = _field(
        1.0, "sampling temperature of the rollouts (and of the log-probs of the loss)"
    )
    max_new_tokens: int = _field(4, "completion length limit of rollouts and evaluation")
    # top-p cache (TopPPolicy fields other than p)
    n_probe: int = _field(64, "TopPPolicy: probe queries, the last n_probe prompt positions")
    keep_first: int = _field(4, "TopPPolicy: the first valid tokens always kept (attention sinks)")
    keep_last: int = _field(16, "TopPPolicy: the last valid tokens always kept (local window)")
    granularity: str = _field(
        "layer", "TopPPolicy: 'layer' (one budget per layer, the paper's) or 'kv_head'"
    )
    prune: str = _field(
        "all", "TopPPolicy: 'all' (every token a candidate) or 'visual' (image / video tokens only)"
    )
    prefill: str = _field(
        "sparse",
        "TopPPolicy: 'sparse' (ZipVL, the paper's: each layer's prefill attends only "
        "among its kept tokens) or 'dense' (exact prefill, then compaction); "
        "docs/sparse_prefill.md",
    )
    # reward and objective
    efficiency_gate: str = _field(
        "group",
        "C of the reward: 'group' (the paper's: 1 if any rollout of the "
        "group is correct) or 'rollout' (only correct rollouts)",
    )
    efficiency_weight: float = _field(
        1.0, "r = correct + efficiency_weight * C * (1 - tau); 1 is the paper's reward"
    )
    soft_tau_weight: float = _field(
        0.0,
        "beyond the paper: + soft_tau_weight * C * (smoothed tau over the grid) "
        "in the loss, the pathwise gradient of the efficiency reward that GRPO "
        "leaves out (sf_train/soft_token_ratio.py); 0 = off",
    )
    soft_tau_temperature: float = _field(0.01, "smoothing temperature of the soft token ratio")
    soft_tau_target: float = _field(
        0.0,
        "with soft_tau_weight: the pathwise term pushes only a prompt whose smoothed tau is above "
        "this (soft_tau_weight * C * max(0, tau - target)), so below it the other terms act "
        "alone; 0 = push always",
    )
    selection_gradient: bool = _field(
        False,
        "beyond the paper: the training forward's completion attention "
        "takes a straight-through keep mask, so the loss also reaches which "
        "prompt tokens the selection keeps (sf_train/replay.py)",
    )
    distill_weight: float = _field(
        0.0,
        "beyond the paper: + distill_weight * KL(dense reference || policy) over the whole "
        "vocabulary at every completion position of every rollout, the policy's forward "
        "replaying the rollout's pruning (sf_train/loss.py distillation_kl); 0 = off",
    )
    leak_weight: float = _field(
        0.0,
        "beyond the paper: + leak_weight * the dense attention mass the prompt's last position "
        "(it produces the first generated token) puts on the tokens each layer dropped, mean over "
        "layers and rollouts (sf_train/replay.py leaked_answer_mass); 0 = off",
    )
    distill_dense: bool = _field(
        False,
        "with distill_weight: also + distill_weight * the same KL for the dense policy "
        "(every token kept) on the completions of the grid's top p",
    )
    selection_gradient_temperature: float = _field(
        1.0, "temperature of the straight-through keep mask's gradient"
    )
    advantage_eps: float = _field(
        1e-4, "advantage = (r - mean) / (std + advantage_eps) within a group"
    )
    beta: float = _field(0.04, "weight of the KL term to the dense reference model")
    clip_eps: float = _field(
        0.2, "PPO clip range of the ratio (lower side, and upper unless clip_eps_high)"
    )
    clip_eps_high: float | None = _field(
        None, "upper clip range (DAPO's clip-higher); None: clip_eps"
    )
    normalization: str = _field(
        "grpo",
        "loss normalisation: 'grpo' (per sequence, then over sequences), "
        "'dr_grpo' (sum / (N * max_new_tokens)) or 'dapo' (per token over the batch)",
    )
    inner_epochs: int = _field(1, "policy updates per batch of rollouts")
    lr: float = _field(1e-5, "AdamW learning rate (peak, after warm-up)")
    lr_schedule: str = _field(
        "constant",
        "the learning rate over the run: 'constant' (after warm-up), or "
        "'cosine' / 'linear' decay from lr to lr * min_lr_ratio at the last step "
        "(TRL's lr_scheduler_type)",
    )
    warmup_steps: int = _field(0, "linear warm-up steps, from lr / warmup_steps to lr")
    stable_steps: int = _field(
        0,
        "with a decaying lr_schedule: steps after the warm-up at the peak lr before the decay "
        "starts (warmup-stable-decay); the decay then spans the remaining steps",
    )
    stable_ratio: float = _field(
        0.0,
        "stable_steps as a fraction of steps (floor of stable_ratio * steps), so that a shorter "
        "or longer run keeps the schedule's shape; set one of stable_steps and stable_ratio",
    )
    min_lr_ratio: float = _field(0.0, "the decay's final learning rate, as a fraction of lr")
    weight_decay: float = _field(0.0, "AdamW weight decay")
    max_grad_norm: float = _field(1.0, "gradient norm clip")
    # bookkeeping
    save_every: int = _field(
        10, "write out_dir/checkpoint.pt every this many steps (and at the end)"
    )
    eval_samples: int = _field(128, "held-out samples of each evaluation")
    baseline_samples: int = _field(
        128, "held-out samples per point of main's selection-rule comparison"
    )
    eval_p: tuple[float, ...] = _field(
        (0.975, 1.0),
        "thresholds p of the evaluation (main adds deploy_p, the grid's lower end and 1.0)",
    )
    # scale (docs/scale.md): sharding, adapters, memory, your own data
    distributed: str = _field(
        "ddp",
        "under torchrun: 'ddp' (replicas) or 'fsdp' (FSDP2 fully_shard per decoder "
        "layer; also on one process, for dtype='bfloat16' full fine-tuning)",
    )
    lora_rank: int = _field(
        0,
        "0 = full fine-tuning; > 0 = peft LoRA adapters of this rank, the reference "
        "being the policy with its adapters disabled",
    )
    lora_alpha: float = _field(16.0, "LoRA scaling numerator (scale = lora_alpha / lora_rank)")
    lora_target_modules: tuple[str, ...] = _field(
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        "module names (peft target_modules) that get adapters",
    )
    lora_merge: bool = _field(
        True,
        "the final save merges the adapters into the weights (false: saves the "
        "adapter alone, peft's format)",
    )
    gradient_checkpointing: bool = _field(
        False, "recompute each decoder layer's activations in backward"
    )
    dtype: str = _field(
        "float32",
        "'bfloat16': frozen weights and compute in bf16, trained weights, "
        "optimizer and loss fp32 (docs/scale.md#dtype)",
    )
    data: str = _field(
        "",
        'task=jsonl: the JSONL file of {"images": [...] | "video": ..., "question", '
        '"answer"} records (paths relative to the file)',
    )
    correctness: str = _field(
        "exact",
        "task=jsonl: how an answer is judged: 'exact', 'numeric' or "
        "'choice' (multiple-choice letter)",
    )

    def __post_init__(self):
        check_types(self)
        for name in ("p_grid", "eval_p"):
            bad = [p for p in getattr(self, name) if not 0.0 < p <= 1.0]
            if bad or not getattr(self, name):
                raise ValueError(
                    f"SFConfig.{name} must be a non-empty list of p in (0, 1], got {getattr(self, name)}"
                )
        if len(self.p_grid) < 2:
            raise ValueError(
                "SFConfig.p_grid needs at least 2 thresholds: GRPO compares rollouts within a group"
            )
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"SFConfig.normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"SFConfig.lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        if not 0.0 <= self.stable_ratio < 1.0 or (self.stable_ratio and self.stable_steps):
            raise ValueError(
                "SFConfig.stable_ratio must be in [0, 1) and is set instead of stable_steps, got "
                f"stable_ratio {self.stable_ratio} with stable_steps {self.stable_steps}"
            )
        stable = self.peak_steps
        if stable < 0 or (stable and self.warmup_steps + stable >= self.steps):
            raise ValueError(
                "SFConfig.stable_steps (or stable_ratio * steps) must be >= 0 and warmup_steps + "
                f"stable steps < steps, got {stable} (stable_steps {self.stable_steps}, "
                f"stable_ratio {self.stable_ratio}, warmup_steps {self.warmup_steps}, "
                f"steps {self.steps})"
            )
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(
                "SFConfig.warmup_steps must be >= 0 and min_lr_ratio in [0, 1], got "
                f"{self.warmup_steps} and {self.min_lr_ratio}"
            )
        if self.efficiency_gate not in EFFICIENCY_GATES:
            raise ValueError(
                f"SFConfig.efficiency_gate must be one of {EFFICIENCY_GATES}, got {self.efficiency_gate!r}"
            )
        for name in (
            "steps",
            "prompts_per_step",
            "max_new_tokens",
            "inner_epochs",
            "save_every",
            "eval_samples",
            "baseline_samples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"SFConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.efficiency_weight >= 0:
            raise ValueError(
                f"SFConfig.efficiency_weight must be >= 0, got {self.efficiency_weight}"
            )
        if not self.soft_tau_weight >= 0:
            raise ValueError(f"SFConfig.soft_tau_weight must be >= 0, got {self.soft_tau_weight}")
        if not self.leak_weight >= 0:
            raise ValueError(f"SFConfig.leak_weight must be >= 0, got {self.leak_weight}")
        if not self.distill_weight >= 0:
            raise ValueError(f"SFConfig.distill_weight must be >= 0, got {self.distill_weight}")
        if self.distill_dense and not self.distill_weight > 0:
            raise ValueError("SFConfig.distill_dense needs distill_weight > 0")
        if not 0.0 <= self.soft_tau_target < 1.0:
            raise ValueError(
                f"SFConfig.soft_tau_target must be in [0, 1), got {self.soft_tau_target}"
            )
        if not self.soft_tau_temperature > 0:
            raise ValueError(
                f"SFConfig.soft_tau_temperature must be > 0, got {self.soft_tau_temperature}"
            )
        for name in ("soft_tau_weight", "selection_gradient"):
            if getattr(self, name) and self.granularity != "layer":
                raise ValueError(
                    f"SFConfig.{name} needs granularity='layer', got {self.granularity!r}"
                )
        if self.leak_weight and self.granularity != "layer":
            raise ValueError(
                f"SFConfig.leak_weight needs granularity='layer', got {self.granularity!r}"
            )
        if not self.selection_gradient_temperature > 0:
            raise ValueError(
                f"SFConfig.selection_gradient_temperature must be > 0, got {self.selection_gradient_temperature}"
            )
        for name in ("beta", "weight_decay", "lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SFConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("clip_eps", "clip_eps_high", "max_grad_norm", "advantage_eps"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"SFConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(
                f"SFConfig.distributed must be one of {DISTRIBUTED}, got {self.distributed!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"SFConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.lora_rank < 0 or not self.lora_alpha > 0 or not self.lora_target_modules:
            raise ValueError(
                "SFConfig.lora_rank must be >= 0, lora_alpha > 0 and lora_target_modules non-empty, got "
                f"{self.lora_rank}, {self.lora_alpha}, {self.lora_target_modules}"
            )
        if self.dtype == "bfloat16" and not self.lora_rank and self.distributed != "fsdp":
            # bf16 weights updated by AdamW in place would lose every update below bf16's resolution
            raise ValueError(
                "SFConfig.dtype='bfloat16' with full fine-tuning needs distributed='fsdp' (also on one "
                "process: fp32 master weights, bf16 compute) or lora_rank > 0 (bf16 base, fp32 adapters)"
            )
        if self.lora_rank and self.distributed == "fsdp":
            # LoRA's frozen base is 2 bytes a parameter in bf16: it fits one device (docs/scale.md#fsdp)
            raise ValueError(
                "SFConfig.lora_rank > 0 runs with distributed='ddp' (the frozen base is replicated), "
                "got distributed='fsdp'"
            )
        if self.gradient_checkpointing and self.soft_tau_weight:
            # the soft term's forward runs the eager attention, which a recompute in backward would not
            raise ValueError("SFConfig.gradient_checkpointing does not support soft_tau_weight > 0")
        if self.temperature <= 0:
            raise ValueError(
                f"SFConfig.temperature must be > 0 (rollouts sample), got {self.temperature}"
            )
        self.policy(self.deploy_p)  # TopPPolicy validates the cache fields

    @property
    def peak_steps(self) -> int:
        """The warmup-stable-decay schedule's steps at the peak lr after the warm-up:
        stable_steps, or floor(stable_ratio * steps)."""
        return self.stable_steps or math.floor(self.stable_ratio * self.steps)

    def lr_at(self, step: int) -> float:
        """The learning rate of the update that ends step ``step + 1`` (step counts from 0); the
        decay reaches lr * min_lr_ratio at the last step."""
        return self.lr * lr_factor(
            step,
            warmup_steps=self.warmup_steps,
            decay_steps=self.steps - 1 - self.warmup_steps - self.peak_steps,
            min_lr_ratio=self.min_lr_ratio,
            schedule=self.lr_schedule,
            stable_steps=self.peak_steps,
        )

    def replay_gradient(self) -> SelectionGradient | None:
        """What the training forward's replay needs for selection_gradient (None when off)."""
        if not self.selection_gradient:
            return None
        return SelectionGradient(
            self.n_probe, self.keep_first, self.keep_last, self.selection_gradient_temperature
        )

    def policy(self, p: float) -> TopPPolicy:
        return TopPPolicy(
            p=p,
            n_probe=self.n_probe,
            keep_first=self.keep_first,
            keep_last=self.keep_last,
            granularity=self.granularity,
            reselect_every=0,
            prune=self.prune,
            prefill=self.prefill,
        )

    @classmethod
    def help_text(cls) -> str:
        """Every field with its default and help text, one paragraph each (for ``--help``)."""
        import textwrap

        lines = ["config fields (--set KEY=VALUE, or in the --config file):"]
        for f in fields(cls):
            default = f.default_factory() if f.default is MISSING else f.default
            lines.append(f"  {f.name} = {json.dumps(default)}")
            lines += textwrap.wrap(
                f.metadata["help"], width=96, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
        return "\n".join(lines)

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
    def from_file(cls, path: str | Path, **overrides) -> SFConfig:
        """A config from YAML (.yaml / .yml) or JSON, then keyword overrides."""
        return cls(**{**cls.file_values(path), **overrides})

    def to_dict(self) -> dict:
        return asdict(self)
