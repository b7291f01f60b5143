"""One progress display for every evaluation in the project (sparse-attn eval, sf_train's
evaluations and baselines): a tqdm bar on stderr when stderr is a terminal, silent otherwise
(logs, CI, pipes), and silent on every process but rank 0 of a distributed run.

SPARSE_ATTN_PROGRESS=1 forces the bars on (e.g. to watch a job through a pipe), =0 forces them
off. tqdm is a dependency of transformers, so this adds none.
"""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm

ENV = "SPARSE_ATTN_PROGRESS"


def enabled() -> bool:
    """Whether bars are shown: the SPARSE_ATTN_PROGRESS override, else rank 0 on a terminal."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def progress(
    iterable=None,
    *,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    leave: bool = True,
    disable: bool = False,
    **kwargs,
) -> tqdm:
    """A tqdm bar (``iterable`` wrapped, or ``total`` steps to ``update``), disabled when not
    ``enabled()`` or when the caller says ``disable``; a disabled bar still iterates and accepts
    update / set_postfix."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=leave,
        disable=disable or not enabled(),
        dynamic_ncols=True,
        **kwargs,
    )
