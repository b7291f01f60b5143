"""sparse-attn eval on the shipped tiny checkpoints at small lengths (docs/eval.md)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sparse_attn import progress as progress_lib
from sparse_attn.eval import EvalConfig, EvalError, cli, run, runner
from sparse_attn.eval import tasks as task_lib
from sparse_attn.eval.model import load_model
from sparse_attn.eval.rules import parse_rules, supported_prefills

# The shipped tiny checkpoints: "base" a tiny Qwen2.5-VL, "kv_base" a tiny Qwen2 (both with
# word-level tokenizers built by our code). The one place that says where they live.
WORLDS = Path(__file__).resolve().parents[1] / "sf_train" / "worlds"
TEXT_MODEL = WORLDS / "kv" / "checkpoint"
VLM_MODEL = WORLDS / "vqa" / "checkpoint"


def config(model=TEXT_MODEL, **overrides) -> EvalConfig:
    fields = dict(
        model=str(model),
        tasks=["niah_single"],
        lengths=[160],
        rules=["dense", "top_p:1"],
        prefills=["dense"],
        samples=2,
        batch_size=2,
        device="cpu",
        out=None,
    )
    return EvalConfig(**{**fields, **overrides})


def by_rule(rows):
    return {(r["task"], r["rule"], r["prefill"]): r for r in rows}


@pytest.fixture(scope="module")
def text_model():
    return load_model(TEXT_MODEL)


@pytest.fixture(scope="module")
def vlm():
    return load_model(VLM_MODEL)


def lexicon(loaded):
    return task_lib.Lexicon(loaded.tokenizer, reserved=task_lib.TEMPLATE_WORDS)


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory):
    """A random tiny Qwen2 with a byte-level BPE tokenizer and a chat template, as real
    checkpoints have: every word and number encodes, so the tasks use their full templates."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator([" ".join(task_lib.ENGLISH)] * 2 + ["0123456789 VAR = . : ?"], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
    )
    directory = tmp_path_factory.mktemp("bpe_model")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_full_templates_numbers_and_chat_template_on_a_bpe_tokenizer(bpe_model_dir):
    loaded = load_model(bpe_model_dir)
    assert loaded.chat
    lex = lexicon(loaded)
    assert lex.numbers  # RULER's seven-digit values
    sample = task_lib.make_sample("niah_multikey", lex, 0, 0)
    fitted = loaded.fit(sample, 1500)
    assert 1500 - 40 <= fitted["tokens"] <= 1500
    text = fitted["text"]
    assert (
        text.startswith("<|im_start|>user\n")
        and text.count("One of the special magic numbers for") == 4
    )
    assert text.endswith("<|im_start|>assistant\n" + sample.answer_prefix)
    assert sample.answers[0].isdigit() and sample.answers[0] in text
    vt = task_lib.make_sample("variable_tracking", lex, 0, 0)
    assert all(f"VAR {name} = " in loaded.fit(vt, 1000)["text"] for name in vt.answers)


def test_p1_equals_dense_on_a_bpe_model_with_padding(bpe_model_dir):
    rows = by_rule(
        run(
            config(
                bpe_model_dir,
                tasks=["niah_multivalue", "common_words"],
                lengths=[500],
                samples=3,
                batch_size=3,
                max_new_tokens=6,
            )
        )
    )
    for task in ("niah_multivalue", "common_words"):
        assert (
            rows[(task, "top_p:1", "dense")]["completions"]
            == rows[(task, "dense", "dense")]["completions"]
        )
    with pytest.raises(EvalError, match="max_position_embeddings = 2048"):
        run(config(bpe_model_dir, lengths=["2k"]))


def test_score_is_word_containment():
    assert task_lib.score("The number is 1234567.", ("1234567",)) == 1.0
    assert task_lib.score("12345678", ("1234567",)) == 0.0  # a longer number is not the answer
    assert task_lib.score("alpha, Beta", ("beta", "gamma")) == 0.5
    assert task_lib.score("", ("x",)) == 0.0


@pytest.mark.parametrize("name", task_lib.TEXT_TASKS)
def test_prompts_fit_and_encode_on_a_tiny_tokenizer(text_model, name):
    """Every word of a generated prompt is in the tiny word-level vocabulary (no unknown token),
    the prompt fills the requested length to within one haystack sentence, and the batched
    inputs hold exactly the counted tokens."""
    lex = lexicon(text_model)
    samples = [task_lib.make_sample(name, lex, 0, i) for i in range(3)]
    fitted = [text_model.fit(s, 200) for s in samples]
    inputs = text_model.batch(fitted)
    unk = text_model.tokenizer.unk_token_id
    assert unk not in inputs["input_ids"][inputs["attention_mask"].bool()].tolist()
    assert inputs["attention_mask"].sum(1).tolist() == [f["tokens"] for f in fitted]
    for f, s in zip(fitted, samples):
        assert 200 - 24 <= f["tokens"] <= 200
        body = f["text"].split()
        for answer in s.answers:  # every answer is present in the prompt
            assert answer in body


def test_visual_needle_prompt_counts_image_tokens(vlm):
    sample = task_lib.make_sample("visual_needle", lexicon(vlm), 0, 0, image_size=224, grid=7)
    fitted = vlm.fit(sample, 300)
    inputs = vlm.batch([fitted])
    assert fitted["image_tokens"] == 196  # 224 px, 8-px patches, 2x2 merge
    assert inputs["attention_mask"].sum().item() == fitted["tokens"] <= 300
    assert inputs["mm_token_type_ids"].sum().item() == 196
    assert sample.answers[0] in task_lib.COLOUR_RGB


def test_generation_is_deterministic_per_seed(text_model):
    lex = lexicon(text_model)
    for name in task_lib.TEXT_TASKS:
        a, b = (text_model.fit(task_lib.make_sample(name, lex, 7, 3), 150) for _ in range(2))
        other = text_model.fit(task_lib.make_sample(name, lex, 8, 3), 150)
        assert a["text"] == b["text"]
        assert other["text"] != a["text"]


def test_p1_equals_dense_text_and_results_are_deterministic():
    """top_p:1 keeps every token and decodes exactly what the dense model decodes (batch of 2,
    left padding); a second run with the same seed gives the same rows."""
    cfg = config(
        tasks=["niah_single", "variable_tracking"],
        rules=["dense", "top_p:1", "top_p:0.8"],
        max_new_tokens=8,
    )
    rows = by_rule(run(cfg))
    for task in cfg.tasks:
        dense, p1 = rows[(task, "dense", "dense")], rows[(task, "top_p:1", "dense")]
        assert p1["completions"] == dense["completions"]
        assert p1["scores"] == dense["scores"]
        assert p1["token_ratio"] == 1.0
        assert rows[(task, "top_p:0.8", "dense")]["token_ratio"] < 1.0
    again = by_rule(run(cfg))
    for key, row in rows.items():
        for field in ("completions", "scores", "accuracy", "token_ratio", "tokens", "kv_bytes"):
            assert again[key][field] == row[field], (key, field)


def test_p1_equals_dense_vlm():
    cfg = config(
        VLM_MODEL,
        tasks=["visual_needle"],
        lengths=[240],
        image_size=224,
        grid=7,
        rules=["dense", "top_p:1", "fastv:0.5"],
    )
    rows = by_rule(run(cfg))
    dense, p1 = (
        rows[("visual_needle", "dense", "dense")],
        rows[("visual_needle", "top_p:1", "dense")],
    )
    assert p1["completions"] == dense["completions"]
    assert p1["token_ratio"] == 1.0 and p1["visual_token_ratio"] == 1.0
    fastv = rows[("visual_needle", "fastv:0.5", "dense")]
    assert fastv["visual_token_ratio"] < 1.0
    assert fastv["kv_bytes"] < dense["kv_bytes"]


def test_resume_skips_finished_cells_and_writes_reports(tmp_path, monkeypatch):
    cfg = config(out=str(tmp_path), samples=1, batch_size=1)
    first = run(cfg)
    for name in ("results.jsonl", "results.json", "results.md", "accuracy_vs_token_ratio.png"):
        assert (tmp_path / name).is_file(), name
    summary = json.loads((tmp_path / "results.json").read_text())
    assert {r["rule"] for r in summary["rows"]} == {"dense", "top_p:1"}
    assert "| niah_single | 160 | top_p:1 |" in (tmp_path / "results.md").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was evaluated again")

    monkeypatch.setattr(runner, "evaluate_cell", refuse)
    assert run(dataclasses.replace(cfg, resume=True)) == first
    # A new rule is a new cell: only it runs.
    monkeypatch.undo()
    rows = run(dataclasses.replace(cfg, resume=True, rules=["dense", "top_p:1", "top_k:0.5"]))
    assert [r["rule"] for r in rows] == ["dense", "top_p:1", "top_k:0.5"]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(model="/nonexistent/model"), "no such directory"),
        (dict(model=str(Path(__file__).parent)), "no config.json"),
        (dict(tasks=["niah_single", "haystack"]), "unknown task 'haystack'"),
        (dict(tasks=["visual_needle"]), "needs a Qwen2-VL"),
        (dict(rules=["dense", "top_q:0.9"]), "unknown rule 'top_q'"),
        (dict(rules=["top_p:1.5"]), "TopPPolicy.p must be"),
        (dict(rules=["top_p"]), "top_p needs values"),
        (dict(rules=["fastv:0.5"]), "needs a Qwen2-VL"),
        (dict(lengths=["2k"]), "max_position_embeddings = 1024"),
        (dict(lengths=[1020]), "exceed the model's max_position_embeddings"),
        (dict(lengths=["many"]), "--lengths 'many'"),
        (dict(prefills=["lazy"]), "--prefill 'lazy'"),
        (dict(samples=0), "--samples must be >= 1"),
        (dict(lengths=[3]), "too short for task 'niah_single'"),
    ],
)
def test_bad_arguments_give_clear_errors(overrides, message):
    with pytest.raises(EvalError, match=message.replace("(", r"\(").replace("[", r"\[")):
        run(config(**overrides))


def test_cli_reports_errors_and_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--model", str(TEXT_MODEL), "--rules", "nope"])
    assert exit_info.value.code == 2
    assert "unknown rule 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.eval_main(["--model", str(TEXT_MODEL), "--lengths", "4k"])
    assert "max_position_embeddings" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "eval",
                "--model",
                str(TEXT_MODEL),
                "--tasks",
                "common_words",
                "--lengths",
                "128",
                "--rules",
                "top_k:0.5",
                "--prefill",
                "dense",
                "--samples",
                "1",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "| common_words | 128 | top_k:0.5 | dense |" in capsys.readouterr().out


def test_rules_parse_and_prefill_feature_detection():
    rules = parse_rules(
        ["dense", "top_p:0.9,0.975", "top_k:0.25", "threshold:1", "fastv:0.5", "top_p:0.9"]
    )
    assert [r.name for r in rules] == [
        "dense",
        "top_p:0.9",
        "top_p:0.975",
        "top_k:0.25",
        "threshold:1",
        "fastv:0.5",
    ]
    fields = dict(n_probe=8, keep_first=1, keep_last=2, granularity="layer")
    assert rules[1].policy("dense", fields).p == 0.9
    assert rules[3].policy("dense", fields).keep_ratio == 0.25
    assert rules[0].policy("dense", fields) is None
    has_field = "prefill" in {f.name for f in dataclasses.fields(rules[1].policy("dense", fields))}
    assert supported_prefills() == (("dense", "sparse") if has_field else ("dense",))
    if not has_field:
        with pytest.raises(EvalError, match="no sparse prefill"):
            rules[1].policy("sparse", fields)
    else:
        assert rules[1].policy("sparse", fields).prefill == "sparse"


def test_progress_is_quiet_off_a_terminal(monkeypatch):
    monkeypatch.delenv(progress_lib.ENV, raising=False)
    bar = progress_lib.progress(range(3))  # pytest captures stderr: not a terminal
    assert bar.disable and list(bar) == [0, 1, 2]
    monkeypatch.setenv(progress_lib.ENV, "1")
    assert progress_lib.enabled()
    monkeypatch.setenv(progress_lib.ENV, "0")
    assert not progress_lib.enabled()


def test_sparse_prefill_rows_when_supported():
    if "sparse" not in supported_prefills():
        pytest.skip("this sparse_attn has no sparse prefill (TopPPolicy has no 'prefill' field)")
    rows = by_rule(
        run(
            config(
                rules=["dense", "top_p:1", "top_p:0.8"],
                prefills=["dense", "sparse"],
                max_new_tokens=8,
            )
        )
    )
    assert set(rows) == {
        ("niah_single", rule, prefill)
        for rule, prefill in [
            ("dense", "dense"),
            ("top_p:1", "dense"),
            ("top_p:1", "sparse"),
            ("top_p:0.8", "dense"),
            ("top_p:0.8", "sparse"),
        ]
    }
    dense = rows[("niah_single", "dense", "dense")]
    assert rows[("niah_single", "top_p:1", "sparse")]["completions"] == dense["completions"]
    assert rows[("niah_single", "top_p:0.8", "sparse")]["policy"]["prefill"] == "sparse"
    assert rows[("niah_single", "top_p:0.8", "sparse")]["token_ratio"] < 1.0
