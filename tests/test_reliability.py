"""Nothing silently wrong: non-finite attention, sliding-window models, models the attention
function cannot serve, misused arguments, a cache moved between models, empty rows, and a clean
install (docs/limits.md). Tiny random-init models, CPU, no downloads."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from test_cache import TEXT, generate, make_inputs, make_model
from torch import nn

import sparse_attn
import sparse_attn.reference as ref
from sparse_attn.attention import cache_argument, enable
from sparse_attn.cache import TopPCache
from sparse_attn.policy import TopPPolicy

ROOT = Path(__file__).resolve().parents[1]

# --- non-finite logits: cumulative_scores poisons the row as the reference softmax does ----------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
B, HQ, HKV, LQ, LK, D = 2, 4, 2, 5, 70, 16  # LK > 64: rows end inside the second key tile


def _set_nonfinite(case: str, q: torch.Tensor, k: torch.Tensor) -> None:
    nan, inf = float("nan"), float("inf")
    if case == "nan_q":  # one probe's logits all NaN (was: zero mass on CPU)
        q[0, 1, 2, 3] = nan
    elif case == "nan_k":  # one key NaN for every probe of a group
        k[1, 0, 7, 5] = nan
    elif case == "nan_k_alone_in_tile":  # key 64 is the only key of its tile probe 0 sees
        k[0, 1, 64, 0] = nan
    elif case == "inf_q":  # +-inf logits, +inf max
        q[0, 3, 4, 0] = inf
    elif case == "inf_k":
        k[1, 1, 30, 2] = inf
    elif case == "neg_inf_row":  # every logit of one probe is -inf (softmax: NaN)
        k[1, 1, :, 0] = k[1, 1, :, 0].abs() + 0.1
        q[1, 2, 1, 0] = -inf
    elif case == "neg_inf_key":  # one key at -inf among finite ones: zero mass there, no NaN
        q[0, 0:2, :, 0] = q[0, 0:2, :, 0].abs() + 0.1
        k[0, 0, 10, 0] = -inf
    else:
        raise AssertionError(case)


def _expected_nan(q, k, causal, key_mask):
    """bool [B, Hkv, Lk]: keys seen by a probe whose softmax row is NaN (plain torch)."""
    g = q.shape[1] // k.shape[1]
    logits = D**-0.5 * torch.einsum("bhid,bhjd->bhij", q.float(), k.float().repeat_interleave(g, 1))
    visible = ref.probe_visibility(LQ, LK, causal)[None, None] & key_mask[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    poisoned = probs.isnan().any(-1, keepdim=True) & visible.any(-1, keepdim=True)
    return (poisoned & visible).view(B, HKV, g, LQ, LK).any(dim=(2, 3))


@pytest.mark.parametrize(
    "case",
    ["nan_q", "nan_k", "nan_k_alone_in_tile", "inf_q", "inf_k", "neg_inf_row", "neg_inf_key"],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [True, False])
def test_nonfinite_logits_poison_rows_like_the_reference(device, gen, case, dtype, causal):
    q = torch.randn(B, HQ, LQ, D, generator=gen).to(dtype)
    k = torch.randn(B, HKV, LK, D, generator=gen).to(dtype)
    _set_nonfinite(case, q, k)
    key_mask = torch.ones(B, LK, dtype=torch.bool)
    key_mask[1, :3] = False  # left padding in row 1
    out = sparse_attn.cumulative_scores(
        q.to(device), k.to(device), causal=causal, key_mask=key_mask.to(device)
    ).cpu()
    expect = ref.cumulative_scores(q, k, causal=causal, key_mask=key_mask)
    nan_at = _expected_nan(q, k, causal, key_mask)
    # The reference makes a poisoned group's whole row NaN; the op, the keys the poisoned probes
    # see (padding may differ: it is never read). Both agree on which rows are poisoned.
    assert torch.equal(expect.isnan().any(-1), nan_at.any(-1))
    valid = key_mask[:, None, :].expand_as(out)
    assert torch.equal(out.isnan() & valid, nan_at & valid), case
    if case == "neg_inf_key":
        assert not nan_at.any() and out[0, 0, 10] == 0
    assert torch.isfinite(out[valid & ~nan_at]).all()
    clean = valid & ~nan_at.any(-1, keepdim=True)  # rows no poisoned probe touches
    torch.testing.assert_close(out[clean], expect[clean], rtol=1e-4, atol=1e-5 * (HQ // HKV) * LQ)


def _poison_layer(model, layer: int, how: str):
    attn = model.model.layers[layer].self_attn
    with torch.no_grad():
        if how == "nan_key":
            attn.k_proj.weight[0, 0] = float("nan")
        elif how == "fp32_overflow_query":
            attn.q_proj.weight[0].fill_(1e38)
        elif how == "bf16_overflow_key":
            model.to(torch.bfloat16)
            attn.k_proj.weight[0].fill_(3e38)
        else:
            raise AssertionError(how)
    return model


@pytest.mark.parametrize("how", ["nan_key", "fp32_overflow_query", "bf16_overflow_key"])
@pytest.mark.parametrize(
    "policy",
    [
        TopPPolicy(p=0.9, n_probe=8),
        TopPPolicy(p=1.0),
        TopPPolicy(p=0.9, granularity="kv_head"),
        TopPPolicy(rule="top_k", keep_ratio=0.5),
    ],
    ids=["top_p", "p1", "kv_head", "top_k"],
)
def test_nonfinite_layer_is_an_error_naming_the_layer(how, policy):
    # Before: NaN keys became zero mass and the layer silently kept only keep_first + keep_last.
    model = enable(_poison_layer(make_model("llama"), 1, how), policy)
    with pytest.raises(RuntimeError, match="TopPCache layer 1: .*NaN or inf"):
        generate(model, make_inputs("llama", 2), TopPCache(policy))


def test_nonfinite_scores_on_reselection_name_the_layer():
    policy = TopPPolicy(p=0.9, n_probe=4, reselect_every=2)
    model = enable(make_model("llama"), policy)
    cache = TopPCache(policy)
    attn = model.model.layers[0].self_attn
    calls = []

    def poison_decode_queries(module, args, kwargs):  # the decoded tokens' keys become NaN
        calls.append(1)
        if len(calls) > 1:  # after the prefill
            kwargs["hidden_states"] = torch.full_like(kwargs["hidden_states"], float("nan"))
        return args, kwargs

    handle = attn.register_forward_pre_hook(poison_decode_queries, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="TopPCache layer 0: .*NaN or inf"):
            generate(model, make_inputs("llama", 1), cache)
    finally:
        handle.remove()


# --- sliding windows: refused at enable() unless the window can never apply ---------------------

SMALL = {k: v for k, v in TEXT.items() if k != "max_position_embeddings"}  # the family's default
MOE = {"num_experts": 2, "num_experts_per_tok": 2, "moe_intermediate_size": 32}


def _tiny(config_class, model_class, **overrides):
    torch.manual_seed(0)
    return model_class(config_class(**{**TEXT, **overrides})).eval()


WINDOWED = {
    # families that window every layer whenever config.sliding_window is set
    "mistral_default": lambda: _tiny(
        transformers.MistralConfig, transformers.MistralForCausalLM, max_position_embeddings=32768
    ),
    "mistral": lambda: _tiny(
        transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=8
    ),
    "mixtral": lambda: _tiny(
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        sliding_window=8,
        num_local_experts=2,
    ),
    "qwen3_moe": lambda: _tiny(
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        use_sliding_window=True,
        sliding_window=8,
        **MOE,
    ),
    "phi3": lambda: _tiny(transformers.Phi3Config, transformers.Phi3ForCausalLM, sliding_window=8),
    "starcoder2": lambda: _tiny(
        transformers.Starcoder2Config, transformers.Starcoder2ForCausalLM, sliding_window=8
    ),
    # families that window the layers typed "sliding_attention"
    "qwen2": lambda: _tiny(
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    ),
    "qwen3": lambda: _tiny(
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=0,
    ),
    "gemma2": lambda: _tiny(
        transformers.Gemma2Config, transformers.Gemma2ForCausalLM, sliding_window=8, head_dim=16
    ),
}

FULL = {
    "mistral_no_window": lambda: _tiny(
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        sliding_window=None,
        max_position_embeddings=32768,
    ),
    "mixtral_default": lambda: _tiny(
        transformers.MixtralConfig, transformers.MixtralForCausalLM, num_local_experts=2
    ),
    "qwen3_moe_default": lambda: _tiny(
        transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, **MOE
    ),
    "qwen2_moe_default": lambda: _tiny(  # sliding_window=0 there when unused
        transformers.Qwen2MoeConfig,
        transformers.Qwen2MoeForCausalLM,
        shared_expert_intermediate_size=32,
        **MOE,
    ),
    "phi3_default": lambda: _tiny(transformers.Phi3Config, transformers.Phi3ForCausalLM),
    # use_sliding_window, but max_window_layers >= the layers: every layer is full attention
    "qwen2_window_above_every_layer": lambda: _tiny(
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=2,
    ),
    # a window of at least max_position_embeddings (as Phi-3-mini-128k's) never applies
    "phi3_window_beyond_positions": lambda: _tiny(
        transformers.Phi3Config, transformers.Phi3ForCausalLM, sliding_window=512
    ),
    "gpt_neox": lambda: _tiny(transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
}


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_sliding_window_models_are_refused(family):
    with pytest.raises(ValueError, match="full-attention layers only.*sliding"):
        enable(WINDOWED[family]())


@pytest.mark.parametrize("family", sorted(FULL))
def test_full_attention_configs_are_served_like_dense(family):
    model = FULL[family]()
    inputs = make_inputs("llama", 2)
    run = lambda cache: model.generate(
        **inputs, **{cache_argument(model): cache}, max_new_tokens=3, pad_token_id=0
    )
    dense = run(None)
    cache = TopPCache(TopPPolicy(p=1.0))
    assert torch.equal(run(cache) if enable(model) is model else None, dense)
    assert len(cache.selections) == model.config.num_hidden_layers  # every layer selected


def test_a_window_is_checked_against_the_sequence_at_run_time():
    # Accepted (the window covers max_position_embeddings) but then fed a longer sequence.
    model = enable(
        _tiny(
            transformers.Phi3Config,
            transformers.Phi3ForCausalLM,
            sliding_window=32,
            max_position_embeddings=32,
        )
    )
    short = make_inputs("llama", 1)
    short = {k: v[:, -20:] for k, v in short.items()}
    generate(model, short, TopPCache())  # 20 + 8 tokens: inside the window
    with pytest.raises(RuntimeError, match="layer 0 has a sliding window of 32 tokens"):
        generate(model, make_inputs("llama", 1), TopPCache())  # 40 tokens


# --- models the attention function does not serve, and misused arguments -----------------------


class _BypassConfig(transformers.PretrainedConfig):
    model_type = "bypass_test"


class _BypassAttention(nn.Module):
    """Attention that calls SDPA itself, as some transformers architectures still do: the
    sparse_topp function would never run. Built here rather than taken from transformers, so the
    test does not depend on which of its models have moved to the AttentionInterface. It is a
    module-level ``*Attention(nn.Module)`` class because that is what transformers' own check
    (PreTrainedModel._can_set_attn_implementation) looks for in the model's module source."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return nn.functional.scaled_dot_product_attention(q, k, v)


class _Bypass(transformers.PreTrainedModel):
    config_class = _BypassConfig
    _supports_attention_backend = False
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.attn = _BypassAttention()
        self.post_init()

    def forward(self, x):
        return self.attn(x)


def test_model_whose_attention_bypasses_the_interface_is_refused():
    model = _Bypass(_BypassConfig())
    with pytest.raises(ValueError, match="cannot serve _Bypass: its attention does not go through"):
        enable(model)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: TopPCache(0.9), r"TopPCache\(policy\): policy must be a sparse_attn.TopPPolicy"),
        (lambda: TopPCache(policy={"p": 0.9}), r"TopPCache\(policy\): .* got dict"),
        (lambda: enable(torch.nn.Linear(2, 2)), r"enable\(model\): model must be .* got Linear"),
        (lambda: enable(make_model("llama"), policy="0.9"), r"enable\(model, policy\): policy"),
        (lambda: enable(make_model("llama"), 0.9), r"enable\(model, policy\): .* got float"),
    ],
)
def test_wrong_argument_types_are_type_errors_naming_the_argument(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_numpy_scalars_count_as_python_numbers():
    policy = TopPPolicy(
        p=np.float32(0.9),
        n_probe=np.int64(8),
        keep_first=np.int32(2),
        keep_last=np.uint8(4),
        reselect_every=np.int64(0),
    )
    assert policy == TopPPolicy(p=float(np.float32(0.9)), n_probe=8, keep_first=2, keep_last=4)
    assert type(policy.p) is float and type(policy.n_probe) is int
    assert TopPPolicy(rule="top_k", keep_ratio=np.float64(0.5)).keep_ratio == 0.5
    assert TopPPolicy(rule="threshold", threshold=np.float16(2)).threshold == 2.0
    assert TopPPolicy(shared_from_layer=np.int16(1)).shared_from_layer == 1
    for field, value in [
        ("p", np.float32("nan")),
        ("p", np.bool_(True)),
        ("n_probe", np.float32(8)),
        ("keep_last", np.int64(-1)),
    ]:
        with pytest.raises(ValueError, match=f"TopPPolicy.{field}"):
            TopPPolicy(**{field: value})
    # and the policy drives a real selection
    model = enable(make_model("llama"), policy)
    cache = TopPCache(policy)
    generate(model, make_inputs("llama", 1), cache)
    assert 0 < cache.token_ratio < 1


# --- one cache, one model -----------------------------------------------------------------------


def test_cache_refuses_a_second_model_of_the_same_shapes():
    first = enable(make_model("llama"))
    torch.manual_seed(1)
    second = enable(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TEXT)).eval())
    inputs = make_inputs("llama", 1)
    cache = TopPCache(TopPPolicy(p=0.9, n_probe=8))
    out = generate(first, inputs, cache)  # one model, many forward calls: fine
    step = {
        "input_ids": out[:, -1:],
        "attention_mask": torch.ones(1, out.shape[1], dtype=torch.long),
    }
    with (
        torch.no_grad(),
        pytest.raises(
            RuntimeError, match="TopPCache layer 0 holds the keys and values of another model"
        ),
    ):
        second(**step, **{cache_argument(second): cache})
    cache.reset()  # a reset cache takes any model
    assert torch.equal(
        generate(second, inputs, cache), generate(second, inputs, TopPCache(cache.policy))
    )


# --- token ratio with an all-padding row ------------------------------------------------------------


def test_all_padding_row_is_left_out_of_the_token_ratio():
    model = enable(make_model("llama"))
    inputs = make_inputs("llama", 2)
    inputs["attention_mask"][1] = 0
    inputs["input_ids"][1] = 0
    cache = TopPCache(TopPPolicy(p=0.9, n_probe=8))
    generate(model, inputs, cache)
    alone = TopPCache(cache.policy)
    generate(model, {k: v[:1] for k, v in inputs.items()}, alone)
    assert math.isfinite(cache.token_ratio)
    assert cache.token_ratio == pytest.approx(alone.token_ratio)
    assert cache.layer_ratios == pytest.approx(alone.layer_ratios)
    rows = cache.row_token_ratios
    assert rows[0] == pytest.approx(alone.row_token_ratios[0]) and rows[1].isnan()


# --- a clean build says nothing alarming ----------------------------------------------------------


def test_package_build_ships_checkpoints_without_warnings(tmp_path):
    # setuptools' build_py with the project's pyproject.toml (no setup.py: no extension build)
    # on a copy of the packages: every file of every sf_train/**/checkpoint*/ folder is package
    # data, and setuptools prints no "Package would be ignored" screens for those folders.
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.pyc")
    for name in ("sparse_attn", "sf_train"):
        shutil.copytree(ROOT / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_bytes((ROOT / name).read_bytes())
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "build_py", "-d", str(out)],
        check=False,
        cwd=src,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    log = run.stdout + run.stderr
    for alarm in ("would be ignored", "Deprecat", "not recognized"):
        assert alarm.lower() not in log.lower(), log
    shipped = [
        p.relative_to(ROOT) for p in ROOT.glob("sf_train/**/checkpoint*/**/*") if p.is_file()
    ]
    assert shipped, "no checkpoint folder found under sf_train"
    for path in shipped:
        assert (out / path).is_file(), path
    assert (out / "sparse_attn" / "cache.py").is_file() and (out / "sf_train" / "cli.py").is_file()
