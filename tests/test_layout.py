"""sf_train's layout (docs/design.md#the-layout): the import rule between face, library and
worlds, the config's help texts, and the one learning-rate schedule."""

import ast
import math
from dataclasses import fields
from pathlib import Path

import pytest

from sf_train.config import SFConfig, lr_factor

ROOT = Path(__file__).resolve().parents[1] / "sf_train"
FACE = {"cli.py", "experiments.py", "__main__.py"}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.add(module)
            names |= {f"{module}.{alias.name}" for alias in node.names}
    return names


def sf_train_imports(path: Path) -> set[str]:
    return {m for m in imported_modules(path) if m == "sf_train" or m.startswith("sf_train.")}


LIBRARY = sorted(p for p in ROOT.glob("*.py") if p.name not in FACE)
WORLDS = sorted((ROOT / "worlds").rglob("*.py"))


def test_the_layout_is_as_documented():
    assert {p.name for p in LIBRARY} >= {"config.py", "tasks.py", "trainer.py", "batch.py"}
    assert {p.relative_to(ROOT).as_posix() for p in WORLDS} >= {
        "worlds/registry.py",
        "worlds/common.py",
        "worlds/sft_loop.py",
        "worlds/vqa/world.py",
        "worlds/kv/world.py",
    }


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_the_library_imports_neither_a_world_nor_the_face(path):
    face = {f"sf_train.{name[:-3]}" for name in FACE}
    bad = {m for m in sf_train_imports(path) if m.startswith("sf_train.worlds") or m in face}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", WORLDS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_a_world_imports_only_the_task_protocol_config_and_worlds(path):
    allowed = ("sf_train.tasks", "sf_train.config", "sf_train.worlds")
    bad = {m for m in sf_train_imports(path) if not m.startswith(allowed)}
    assert not bad, f"{path} imports {sorted(bad)}"
    if path.name != "registry.py":  # only the registry knows the worlds by name
        world = path.relative_to(ROOT / "worlds").parts[0]
        others = {"vqa", "kv"} - {world}
        crossing = {
            m for m in sf_train_imports(path) if m.split(".")[2:3] and m.split(".")[2] in others
        }
        assert not crossing, f"{path} imports another world: {sorted(crossing)}"


def test_every_config_field_has_help_and_train_help_prints_it(capsys):
    from sf_train import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    for f in fields(SFConfig):
        help_text = f.metadata.get("help", "")
        assert len(help_text) > 10, f"SFConfig.{f.name} has no help text"
        assert f"{f.name} = " in printed and " ".join(help_text.split()) in printed, f.name


def test_lr_factor_warm_up_then_decay():
    kw = dict(warmup_steps=2, decay_steps=4, min_lr_ratio=0.1)
    assert [lr_factor(s, **kw, schedule="constant") for s in range(8)] == [0.5, 1.0] + [1.0] * 6
    linear = [lr_factor(s, **kw, schedule="linear") for s in range(8)]
    assert linear == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1])
    cosine = [lr_factor(s, **kw, schedule="cosine") for s in range(2, 8)]
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, i / 4))) for i in range(6)]
    assert cosine == pytest.approx(expected)


def test_sf_and_sft_share_the_schedule():
    """SFConfig.lr_at reaches lr * min_lr_ratio at the last step; the worlds' supervised loop
    decays over steps - warmup_steps (one past its last update)."""
    from sf_train.worlds import sft_loop

    assert sft_loop.lr_factor is lr_factor
    config = SFConfig(lr=2.0, steps=6, warmup_steps=1, lr_schedule="cosine", min_lr_ratio=0.25)
    for step in range(6):
        factor = lr_factor(
            step, warmup_steps=1, decay_steps=4, min_lr_ratio=0.25, schedule="cosine"
        )
        assert config.lr_at(step) == 2.0 * factor
    assert config.lr_at(5) == pytest.approx(0.5)


def test_stable_steps_hold_the_peak_before_the_decay():
    """Warmup-stable-decay: after the warm-up the peak holds for stable_steps, then the decay
    spans the remaining steps and still reaches lr * min_lr_ratio at the last one."""
    config = SFConfig(
        lr=1.0, steps=10, warmup_steps=2, stable_steps=3, lr_schedule="linear", min_lr_ratio=0.2
    )
    rates = [config.lr_at(s) for s in range(10)]
    assert rates == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2])
    plain = SFConfig(lr=1.0, steps=10, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.2)
    assert [plain.lr_at(s) for s in range(10)] != rates  # stable_steps changes the schedule
    for bad in (dict(stable_steps=-1), dict(stable_steps=8, warmup_steps=2, steps=10)):
        with pytest.raises(ValueError, match="stable_steps"):
            SFConfig(**bad)


def test_stable_ratio_scales_the_stable_phase_with_the_run():
    """stable_ratio is stable_steps as a fraction of steps (floored): the same schedule as the
    equivalent stable_steps, and a shorter run keeps its shape instead of failing validation."""
    kw = dict(lr=1.0, warmup_steps=2, lr_schedule="linear", min_lr_ratio=0.2)
    by_ratio = SFConfig(steps=10, stable_ratio=0.35, **kw)
    by_steps = SFConfig(steps=10, stable_steps=3, **kw)
    assert by_ratio.peak_steps == 3
    assert [by_ratio.lr_at(s) for s in range(10)] == [by_steps.lr_at(s) for s in range(10)]
    assert SFConfig(steps=7, stable_ratio=0.5).peak_steps == 3
    assert SFConfig(steps=300, stable_ratio=0.5).peak_steps == 150
    for bad in (
        dict(stable_ratio=1.0),
        dict(stable_ratio=-0.1),
        dict(stable_ratio=0.5, stable_steps=3, steps=10),
        dict(stable_ratio=0.9, warmup_steps=2, steps=10),
    ):
        with pytest.raises(ValueError, match="stable_ratio"):
            SFConfig(**bad)
