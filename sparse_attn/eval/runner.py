"""The evaluation grid: task x length x rule x prefill cells, each one row of results."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..attention import cache_argument, enable
from ..cache import TopPCache
from ..policy import TopPPolicy
from ..progress import progress
from . import tasks as task_lib
from .model import EvalError, LoadedModel, load_model, max_positions, read_config
from .rules import DEFAULT_RULES, Rule, parse_rules, supported_prefills

ROWS_FILE = "results.jsonl"


def parse_length(text: str | int) -> int:
    """ "4k" -> 4096, "1500" -> 1500."""
    raw = str(text).strip().lower()
    try:
        value = int(float(raw[:-1]) * 1024) if raw.endswith("k") else int(raw)
    except ValueError:
        raise EvalError(
            f"--lengths {text!r}: expected a token count such as 512, 4k or 32k"
        ) from None
    if value <= 0:
        raise EvalError(f"--lengths {text!r}: must be > 0")
    return value


@dataclass
class EvalConfig:
    """Everything one sparse-attn eval run needs (the CLI's options; docs/eval.md)."""

    model: str
    tasks: list[str] | None = None  # None: every text task (+ visual_needle on a VLM)
    lengths: list[int | str] = field(default_factory=lambda: [1024, 4096])
    rules: list[str] | None = None  # None: DEFAULT_RULES (FastV only on a VLM)
    prefills: list[str] | None = None  # None: every mode this sparse_attn supports
    samples: int = 20
    seed: int = 0
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    max_new_tokens: int | None = None  # None: the task's own (tasks.MAX_NEW_TOKENS)
    out: str | None = "sparse_attn_eval"
    resume: bool = False
    n_probe: int = TopPPolicy.n_probe
    keep_first: int = TopPPolicy.keep_first
    keep_last: int = TopPPolicy.keep_last
    granularity: str = TopPPolicy.granularity
    chat_template: str = "auto"
    image_size: int = 448
    grid: int = 8

    def policy_fields(self) -> dict:
        return dict(
            n_probe=self.n_probe,
            keep_first=self.keep_first,
            keep_last=self.keep_last,
            granularity=self.granularity,
        )


@dataclass
class Plan:
    tasks: list[str]
    lengths: list[int]
    rules: list[Rule]
    prefills: list[str]
    is_vlm: bool

    def cells(self):
        """(rule, prefill) pairs of one task and length; the dense rule has no selection, so it
        runs once, with the dense prefill."""
        for rule in self.rules:
            for prefill in ["dense"] if rule.family == "dense" else self.prefills:
                yield rule, prefill

    @property
    def size(self) -> int:
        return len(self.tasks) * len(self.lengths) * sum(1 for _ in self.cells())


def max_new_tokens(config: EvalConfig, task: str) -> int:
    return config.max_new_tokens or task_lib.MAX_NEW_TOKENS[task]


def plan(config: EvalConfig) -> Plan:
    """Validate the run before any model weight is loaded; EvalError names the bad option."""
    model_config = read_config(config.model)
    is_vlm = model_config.model_type in ("qwen2_vl", "qwen2_5_vl")
    names = config.tasks or [*task_lib.TEXT_TASKS, *(["visual_needle"] if is_vlm else [])]
    for name in names:
        if name not in task_lib.TASKS:
            raise EvalError(f"--tasks: unknown task {name!r}; known: {', '.join(task_lib.TASKS)}")
        if name == "visual_needle" and not is_vlm:
            raise EvalError(
                f"--tasks visual_needle needs a Qwen2-VL / Qwen2.5-VL model; "
                f"{config.model!r} is a {model_config.model_type!r} model"
            )
    if config.max_new_tokens is not None and config.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {config.max_new_tokens}")
    specs = config.rules or [r for r in DEFAULT_RULES if is_vlm or not r.startswith("fastv")]
    rules = parse_rules(specs)
    if not is_vlm and any(r.visual_only for r in rules):
        raise EvalError(
            "--rules fastv prunes visual tokens only: it needs a Qwen2-VL / Qwen2.5-VL model"
        )
    prefills = config.prefills or list(supported_prefills())
    for prefill in prefills:
        if prefill not in ("dense", "sparse"):
            raise EvalError(f"--prefill {prefill!r}: expected dense or sparse")
    for rule in rules:
        for prefill in prefills:
            rule.policy(prefill, config.policy_fields())  # raises EvalError on a bad value
    lengths = [parse_length(x) for x in config.lengths]
    limit = max_positions(model_config)
    if limit is not None:
        for length in lengths:
            for name in names:
                needed = length + max_new_tokens(config, name)
                if needed > limit:
                    raise EvalError(
                        f"--lengths {length}: {length} prompt tokens + {max_new_tokens(config, name)} "
                        f"generated for {name} exceed the model's max_position_embeddings = {limit}"
                    )
    for name, value in (("--samples", config.samples), ("--batch-size", config.batch_size)):
        if value < 1:
            raise EvalError(f"{name} must be >= 1, got {value}")
    return Plan(list(names), lengths, rules, list(prefills), is_vlm)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dense_kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def evaluate_cell(
    loaded: LoadedModel,
    fitted: list[dict],
    samples: list,
    rule: Rule,
    prefill: str,
    config: EvalConfig,
    max_new: int,
    bar=None,
) -> dict:
    """Accuracy, token ratio, KV bytes and speed of one rule on prepared prompts."""
    from transformers import GenerationConfig

    model = loaded.model
    policy = rule.policy(prefill, config.policy_fields())
    if policy is not None:
        enable(model, policy)
    pad = loaded.tokenizer.pad_token_id
    generation = GenerationConfig(
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=loaded.eos_token_id,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
        return_dict_in_generate=True,
    )
    eos = generation.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    scores, ratios, visual, kv, completions = [], [], [], [], []
    generated, seconds = 0, 0.0
    for start in range(0, len(fitted), config.batch_size):
        chunk = fitted[start : start + config.batch_size]
        inputs = loaded.batch(chunk)
        kwargs = (
            {cache_argument(model): TopPCache(policy, reserve=max_new)}
            if policy is not None
            else {}
        )
        _sync(loaded.device)
        began = time.perf_counter()
        out = model.generate(**inputs, generation_config=generation, **kwargs)
        _sync(loaded.device)
        seconds += time.perf_counter() - began
        new = out.sequences[:, inputs["input_ids"].shape[1] :]
        for row in new.tolist():
            ends = [i for i, t in enumerate(row) if t in eos_ids]
            generated += ends[0] + 1 if ends else len(row)
        texts = loaded.tokenizer.batch_decode(new, skip_special_tokens=True)
        completions += texts
        scores += [
            task_lib.score(t, s.answers) for t, s in zip(texts, samples[start : start + len(chunk)])
        ]
        cache = out.past_key_values
        if policy is not None:
            ratios += cache.row_token_ratios.tolist()
            if cache.visual_token_ratio is not None:
                visual += [cache.visual_token_ratio] * len(chunk)
            kv += [cache.kv_bytes() / len(chunk)] * len(chunk)
        else:
            ratios += [1.0] * len(chunk)
            if any(f["image_tokens"] for f in chunk):
                visual += [1.0] * len(chunk)
            kv += [_dense_kv_bytes(cache) / len(chunk)] * len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else None  # noqa: E731
    return {
        "rule": rule.name,
        "family": rule.family,
        "knob": rule.value,
        "prefill": prefill,
        "accuracy": mean(scores),
        "token_ratio": mean(ratios),
        "visual_token_ratio": mean(visual),
        "kv_bytes": mean(kv),
        "tokens_per_s": generated / seconds if seconds else None,
        "policy": dataclasses.asdict(policy) if policy is not None else None,
        "scores": scores,
        "completions": completions,
    }


def cell_key(row: dict) -> tuple:
    return (
        row["model"],
        row["task"],
        row["length"],
        row["rule"],
        row["prefill"],
        row["samples"],
        row["seed"],
        row["batch_size"],
        json.dumps(row.get("settings"), sort_keys=True),
    )


def _settings(config: EvalConfig, task: str) -> dict:
    """Everything besides the cell's coordinates that changes its result (for --resume)."""
    return {
        **config.policy_fields(),
        "max_new_tokens": max_new_tokens(config, task),
        "dtype": config.dtype,
        "chat_template": config.chat_template,
        **(
            {"image_size": config.image_size, "grid": config.grid}
            if task == "visual_needle"
            else {}
        ),
    }


def run(config: EvalConfig) -> list[dict]:
    """Run every cell of the grid (skipping those already in out/results.jsonl with --resume);
    returns every row, written to ``config.out`` as they finish (docs/eval.md#output)."""
    grid = plan(config)
    out = Path(config.out) if config.out else None
    done: dict[tuple, dict] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        rows_path = out / ROWS_FILE
        if config.resume and rows_path.exists():
            for line in rows_path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    done[cell_key(row)] = row
        elif rows_path.exists():
            rows_path.unlink()
    device = (
        config.device
        if config.device != "auto"
        else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    loaded = None
    rows = []
    total = grid.size * config.samples
    with progress(total=total, desc="sparse-attn eval", unit="sample") as bar:
        for task in grid.tasks:
            for length in grid.lengths:
                fitted = samples = None
                for rule, prefill in grid.cells():
                    row = {
                        "model": str(config.model),
                        "task": task,
                        "length": length,
                        "rule": rule.name,
                        "prefill": prefill,
                        "samples": config.samples,
                        "seed": config.seed,
                        "batch_size": config.batch_size,
                        "settings": _settings(config, task),
                    }
                    if cell_key(row) in done:
                        rows.append(done[cell_key(row)])
                        bar.update(config.samples)
                        continue
                    if loaded is None:
                        loaded = load_model(
                            config.model,
                            device=device,
                            dtype=config.dtype,
                            chat_template=config.chat_template,
                        )
                        try:
                            enable(loaded.model)
                        except ValueError as error:  # e.g. sliding-window layers
                            raise EvalError(f"--model {config.model!r}: {error}") from error
                        lexicon = task_lib.Lexicon(
                            loaded.tokenizer, reserved=task_lib.TEMPLATE_WORDS
                        )
                    if fitted is None:
                        bar.set_postfix_str(f"{task} @ {length}: building prompts")
                        options = (
                            {"image_size": config.image_size, "grid": config.grid}
                            if task == "visual_needle"
                            else {}
                        )
                        try:
                            samples = [
                                task_lib.make_sample(task, lexicon, config.seed, i, **options)
                                for i in range(config.samples)
                            ]
                        except ValueError as error:
                            raise EvalError(f"--tasks {task}: {error}") from error
                        fitted = [loaded.fit(s, length) for s in samples]
                    bar.set_postfix_str(f"{task} @ {length}: {rule.name} ({prefill} prefill)")
                    result = evaluate_cell(
                        loaded,
                        fitted,
                        samples,
                        rule,
                        prefill,
                        config,
                        max_new_tokens(config, task),
                        bar,
                    )
                    row.update(
                        model_name=loaded.name,
                        tokens=sum(f["tokens"] for f in fitted) / len(fitted),
                        visual_tokens=sum(f["image_tokens"] for f in fitted) / len(fitted),
                        device=str(loaded.device),
                        **result,
                    )
                    rows.append(row)
                    if out is not None:
                        with rows_path.open("a") as f:
                            f.write(json.dumps(row) + "\n")
    if out is not None:
        from .report import write_reports

        write_reports(rows, out)
    return rows
