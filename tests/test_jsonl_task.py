"""task=jsonl end to end: the VQA world's samples written as PNG + JSONL, read back with the
packaged tiny Qwen2.5-VL checkpoint (saved with save_pretrained) through the CLI."""

import json

import pytest
from PIL import Image

from sf_train.cli import main
from sf_train.worlds.jsonl import CORRECTNESS, read_records
from sf_train.worlds.vqa.scene import make_samples
from sf_train.worlds.vqa.world import BASE_CHECKPOINT


def write_vqa_jsonl(directory, count=8):
    (directory / "images").mkdir(parents=True)
    lines = []
    for s in make_samples("heldout", 0, count):
        name = f"images/{s.index}.png"
        Image.fromarray(s.image).save(directory / name)
        lines.append(
            json.dumps({"images": [name], "question": s.question.text, "answer": s.answer})
        )
    (directory / "data.jsonl").write_text("\n".join(lines) + "\n")
    return directory / "data.jsonl"


def test_correctness_by_name():
    exact, numeric, choice = CORRECTNESS["exact"], CORRECTNESS["numeric"], CORRECTNESS["choice"]
    assert (
        exact("", " Red. ", "red")
        and not exact("", "red blue", "red")
        and not exact("", "reddish", "red")
    )
    assert (
        numeric("", "it is 3.0 apples", "3")
        and numeric("", "1,250", "1250")
        and not numeric("", "four", "4")
    )
    assert not numeric("", "3.1", "3") and numeric("", "-2e3", "-2000")
    assert (
        choice("", "(B) because", "B")
        and choice("", "b.", "B")
        and choice("", "Answer: C", "c") == 1
    )
    assert choice("", "C) blue", "C") and not choice("", "", "A") and not choice("", "a cat", "A")


def test_bad_records_are_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    for line, message in [
        ('{"question": "q"}', 'line 1: "answer"'),
        ('{"question": "q", "answer": "a", "x": 1}', "unknown fields"),
        ('{"question": "q", "answer": "a", "images": ["nope.png"]}', "no such file"),
        ("[1]", "JSON object"),
        ('{"question": "q", "answer": "a", "split": "dev"}', "split"),
    ]:
        path.write_text(line + "\n")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            read_records(path)
    with pytest.raises(ValueError, match="SFConfig.data"):
        read_records("")


def test_jsonl_train_and_eval_through_the_cli(tmp_path, capsys):
    data = write_vqa_jsonl(tmp_path)
    common = [
        "task=jsonl",
        f"data={data}",
        f"model={BASE_CHECKPOINT}",
        "max_new_tokens=2",
        "n_probe=8",
    ]
    out_dir = tmp_path / "run"
    main(
        [
            "train",
            "--set",
            *common,
            f"out_dir={out_dir}",
            "steps=1",
            "prompts_per_step=2",
            "p_grid=[0.9, 1.0]",
            "lora_rank=4",
        ]
    )
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1] and 0.0 <= metrics[0]["accuracy"] <= 1.0
    assert (out_dir / "final" / "model.safetensors").exists(), "LoRA merged into a plain checkpoint"
    with pytest.raises(SystemExit, match="already holds a run.*--resume.*--overwrite"):
        main(["train", "--set", *common, f"out_dir={out_dir}", "steps=2"])  # before any model loads
    capsys.readouterr()
    main(
        [
            "eval",
            "--set",
            *common,
            "--model",
            str(out_dir / "final"),
            "--p",
            "1.0",
            "--samples",
            "8",
        ]
    )
    report = json.loads(capsys.readouterr().out)
    # The tiny model answers its own world's questions (about 0.9 on held-out samples): the file,
    # the images and the prompts were read as the model expects them.
    assert report["1.0"]["accuracy"] >= 0.5
    assert report["1.0"]["token_ratio"] == pytest.approx(1.0)
