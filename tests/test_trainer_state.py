"""Run state: typed config fields, out_dir ownership, resume errors, safe and durable
checkpoints."""

import argparse
import json
import os

import pytest
import torch
from test_trainer import make_config
from toy_task import toy_model, toy_task

from sf_train import trainer as trainer_module
from sf_train.cli import main
from sf_train.config import SFConfig
from sf_train.experiments import load_config
from sf_train.trainer import CHECKPOINT_FILE, METRICS_FILE, SparsityForcingTrainer


def run(config, resume=False, **kw):
    torch.manual_seed(0)
    t = SparsityForcingTrainer(config, toy_model(), toy_model(), toy_task())
    if resume:
        t.resume()
    return t, t.train(progress=False, **kw)


# --- typed config ---------------------------------------------------------------------------


def test_config_values_are_typed_and_errors_name_the_field(tmp_path):
    args = argparse.Namespace(
        config=None, set=["selection_gradient=False", "soft_tau_weight=0", "lr=1e-5"]
    )
    config = load_config(args)
    assert config.selection_gradient is False and config.lr == 1e-5
    assert SFConfig(selection_gradient="true").selection_gradient is True
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text(
        "lr: 1e-5\nsteps: 3\np_grid: [0.5, 0.9]\n"
    )  # YAML 1.1 reads 1e-5 as a string
    from_yaml = SFConfig.from_file(yaml_file)
    assert (
        from_yaml.lr == 1e-5 and isinstance(from_yaml.lr, float) and from_yaml.p_grid == (0.5, 0.9)
    )
    for bad, field in [
        ({"steps": 2.5}, "steps"),
        ({"lr": "fast"}, "lr"),
        ({"selection_gradient": "maybe"}, "selection_gradient"),
        ({"selection_gradient": 1}, "selection_gradient"),
        ({"p_grid": ["a", 0.9]}, "p_grid"),
        ({"task": 3}, "task"),
        ({"clip_eps_high": "x"}, "clip_eps_high"),
    ]:
        with pytest.raises(TypeError, match=f"SFConfig.{field} must be"):
            SFConfig(**bad)
    for name in ("beta", "clip_eps", "max_grad_norm", "lr", "weight_decay"):
        with pytest.raises(ValueError, match=f"SFConfig.{name} must be"):
            SFConfig(**{name: -0.1})
    assert SFConfig(clip_eps_high=None).clip_eps_high is None
    with pytest.raises(SystemExit, match="SFConfig.steps must be an integer"):
        main(["train", "--set", "steps=2.5"])


# --- out_dir ownership, resume ----------------------------------------------------------------


def test_fresh_run_refuses_an_old_out_dir_unless_overwrite(tmp_path):
    run(make_config(tmp_path, steps=1))
    metrics = (tmp_path / "run" / METRICS_FILE).read_text()
    checkpoint = (tmp_path / "run" / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):
        run(make_config(tmp_path, steps=2))
    assert (tmp_path / "run" / METRICS_FILE).read_text() == metrics, "nothing appended"
    assert (tmp_path / "run" / CHECKPOINT_FILE).read_bytes() == checkpoint, "nothing overwritten"
    _, history = run(make_config(tmp_path, steps=2), overwrite=True)
    lines = (tmp_path / "run" / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2] == [m["step"] for m in history]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    t = SparsityForcingTrainer(make_config(tmp_path), toy_model(), toy_model(), toy_task())
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume at .*without --resume"):
        t.resume()
    with pytest.raises(SystemExit, match="no checkpoint to resume"):
        main(["train", "--resume", "--set", f"out_dir={tmp_path / 'nothing'}"])


def test_torn_metrics_tail_is_dropped_with_a_warning(tmp_path):
    run(make_config(tmp_path, steps=1))
    path = tmp_path / "run" / METRICS_FILE
    path.write_text(path.read_text() + '{"step": 2, "loss": 0.1')  # a crash mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        _, history = run(make_config(tmp_path, steps=2), resume=True)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    path.write_text("not json\n" + path.read_text())
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        run(make_config(tmp_path, steps=3), resume=True)


def test_resume_takes_the_checkpoint_config_and_refuses_changes(tmp_path):
    run(make_config(tmp_path, steps=1, lr=1e-3, p_grid=(0.5, 0.9)))
    with pytest.raises(ValueError, match=r"lr=0.5 \(checkpoint: 0.001\).*p_grid"):
        run(make_config(tmp_path, steps=2, lr=0.5, p_grid=(0.6, 0.8)), resume=True)
    # the CLI's --resume reads the stored config; the command line adds only what it sets
    out_dir = str(tmp_path / "run")
    config = load_config(
        argparse.Namespace(config=None, set=[f"out_dir={out_dir}", "steps=5"], resume=True)
    )
    assert (
        config.lr == 1e-3
        and config.p_grid == (0.5, 0.9)
        and config.steps == 5
        and config.n_probe == 4
    )
    _, history = run(make_config(tmp_path, steps=2, lr=1e-3, p_grid=(0.5, 0.9)), resume=True)
    assert [m["step"] for m in history] == [2]


# --- checkpoint safety and durability ---------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_runs_code_is_refused(tmp_path):
    run(make_config(tmp_path, steps=1))
    path = tmp_path / "run" / CHECKPOINT_FILE
    state = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    state["rng"] = _Payload(str(marker))
    torch.save(state, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        run(make_config(tmp_path, steps=2), resume=True)
    assert not marker.exists(), "the checkpoint's pickle ran code"
    # and the same file does run code when loaded the unsafe way: the test's payload is real
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_checkpoint_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, type(tmp_path).replace
    monkeypatch.setattr(
        trainer_module.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))
    )
    monkeypatch.setattr(
        type(tmp_path),
        "replace",
        lambda self, target: (events.append("rename"), real_replace(self, target))[1],
    )
    trainer_module.write_durably({"x": torch.ones(2)}, tmp_path / CHECKPOINT_FILE)
    assert events[:2] == ["fsync", "rename"]
    assert torch.equal(
        torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["x"], torch.ones(2)
    )
    assert not (tmp_path / (CHECKPOINT_FILE + ".tmp")).exists()


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    import random

    import numpy as np

    random.random(), np.random.random(), torch.rand(1)
    state = trainer_module.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.random()), float(torch.rand(1)))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    trainer_module.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.random()), float(torch.rand(1))) == expected
