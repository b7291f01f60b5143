"""sparse-attn eval: accuracy against token ratio of any checkpoint, on long-context tasks
(needle in a haystack, variable tracking, common words, a visual needle) generated from a seed
with the model's own tokenizer, for a list of KV selection rules (docs/eval.md).

    from sparse_attn.eval import EvalConfig, run
    rows = run(EvalConfig(model="path/to/model", lengths=["1k", "4k"], rules=["dense", "top_p:0.975"]))
"""

from .model import EvalError
from .runner import EvalConfig, run

__all__ = ["EvalConfig", "EvalError", "run"]
