import pytest

import sparse_attn
from sparse_attn import _build_info, _extension, demo


def test_refuses_a_build_for_another_torch(monkeypatch):
    monkeypatch.setattr(_build_info, "TORCH_VERSION", "0.0.0-other")
    with pytest.raises(
        ImportError,
        match=r"(?s)built against torch 0\.0\.0-other but torch .* is installed.*"
        r"pip install --no-build-isolation",
    ):
        _extension.load()


def test_demo_compaction_is_exact():
    rows = demo.main(["--tokens", "200", "--p", "0.8", "1.0", "--n-probe", "16"])
    assert {r["p"] for r in rows} == {0.8, 1.0}
    assert all(r["max_error"] < 1e-5 for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["p"] == 1.0)
    assert all(r["ratio"] < 1.0 for r in rows if r["p"] == 0.8)


def test_public_api():
    for name in sparse_attn.__all__:
        assert hasattr(sparse_attn, name)
