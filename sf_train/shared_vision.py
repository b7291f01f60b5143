"""The vision tower once per distinct image: a training step sees each prompt's image many times.

A step's batch holds every prompt once per threshold of the p grid (G copies, sf_train/batch.py
repeat_inputs), and the rollouts call ``generate`` once per threshold on the same inputs, so the
vision tower of a Qwen-VL model would encode each image 2G times a step with unchanged weights
or, in the training forward, G times with gradient. ``share_image_features(model)`` wraps the
model's vision tower (the module named ``visual``) so that it

- encodes each distinct image of a call once and hands every copy the same rows (autograd sums
  the copies' gradients into the one computation, as for any reused tensor), and
- without gradient, reuses its last result when called again on the very same pixel tensor with
  unchanged weights (the tensor's and every parameter's version counter; an optimizer step or
  any in-place change of either invalidates it).

The tower's images are independent (Qwen2-VL / Qwen2.5-VL attend within one image: cu_seqlens),
so each image's rows do not depend on what else is in the call; the rows are regrouped per image
in every output tensor whose first axis counts patches or merged tokens. An output it cannot
regroup, or extra tensor arguments it does not know, make it run the tower on the full call, as
before (docs/design.md#training-batch).
"""

from __future__ import annotations

import types
import weakref

import torch
from torch import Tensor

_MARK = "_sf_shared_image_features"


def vision_tower(model) -> torch.nn.Module | None:
    """The model's vision tower: its submodule named ``visual`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL),
    or None for a text model."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "visual":
            return module
    return None


def share_image_features(model, reuse: bool = True) -> bool:
    """Wrap the model's vision tower (see the module docstring); True if it has one. Idempotent;
    the weights, the state dict and the outputs are unchanged. reuse=False turns off the reuse
    across calls (needed where the tower's function can change without a weight changing: peft
    adapters switched off and on)."""
    visual = vision_tower(model)
    if visual is None:
        return False
    if getattr(visual, _MARK, False):
        return True
    original = visual.forward
    last: dict = {}

    def forward(self, hidden_states, grid_thw=None, **kwargs):
        if not isinstance(grid_thw, Tensor) or any(isinstance(v, Tensor) for v in kwargs.values()):
            return original(hidden_states, grid_thw=grid_thw, **kwargs)
        keep = reuse and not torch.is_grad_enabled()
        versions = keep and (
            hidden_states._version,
            self.training,
            tuple(p._version for p in self.parameters()),
        )
        if keep and last and last["pixels"]() is hidden_states and last["versions"] == versions:
            if torch.equal(last["grid"], grid_thw):
                return _fresh(last["out"])
        out = _encode_distinct(original, hidden_states, grid_thw, kwargs)
        last.clear()
        if keep:
            last.update(
                pixels=weakref.ref(hidden_states),
                versions=versions,
                grid=grid_thw.clone(),
                out=_fresh(out),  # callers may rebind fields of the object they get
            )
        return out

    visual.forward = types.MethodType(forward, visual)
    setattr(visual, _MARK, True)
    return True


def distinct_images(pixels: Tensor, grid_thw: Tensor) -> tuple[list[int], list[int]]:
    """(first, copy_of): the indices of each distinct image's first occurrence, and for every image
    the position in ``first`` of the image it equals (same grid, same pixels exactly)."""
    sizes = grid_thw.prod(-1).tolist()
    chunks = pixels.split(sizes)
    # Candidates by a cheap fingerprint, then an exact comparison with the one candidate.
    sums = torch.stack([c.sum(dtype=torch.float64) for c in chunks]).tolist()
    grids = [tuple(g) for g in grid_thw.tolist()]
    first: list[int] = []
    copy_of: list[int] = []
    seen: dict = {}
    for i, chunk in enumerate(chunks):
        key = (grids[i], sums[i])
        j = seen.get(key)
        if j is not None and torch.equal(chunks[first[j]], chunk):
            copy_of.append(j)
            continue
        if j is None:
            seen[key] = len(first)
        copy_of.append(len(first))
        first.append(i)
    return first, copy_of


def _fresh(value):
    """A new container holding the same tensors."""
    if hasattr(value, "keys"):
        return type(value)(**dict(value.items()))
    if type(value) in (list, tuple):
        return type(value)(value)
    return value


class _CannotRegroup(Exception):
    pass


def _encode_distinct(original, pixels: Tensor, grid_thw: Tensor, kwargs: dict):
    first, copy_of = distinct_images(pixels, grid_thw)
    if len(first) == len(copy_of):
        return original(pixels, grid_thw=grid_thw, **kwargs)
    sizes = grid_thw.prod(-1).tolist()
    chunks = pixels.split(sizes)
    out = original(torch.cat([chunks[i] for i in first]), grid_thw=grid_thw[first], **kwargs)
    try:
        return _regroup(out, [sizes[i] for i in first], copy_of)
    except _CannotRegroup:  # an output this wrapper cannot map back to images: do it in full
        return original(pixels, grid_thw=grid_thw, **kwargs)


def _regroup(value, patch_sizes: list[int], copy_of: list[int]):
    """``value`` (the tower's output for the distinct images) with every per-row tensor expanded to
    all images (rows per image: its patches, or its patches / the merge size)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        rows, total = (value.shape[0] if value.dim() else 0), sum(patch_sizes)
        if rows <= 0 or total % rows or any(s % (total // rows) for s in patch_sizes):
            raise _CannotRegroup
        pieces = value.split([s // (total // rows) for s in patch_sizes])
        return torch.cat([pieces[j] for j in copy_of])
    if hasattr(value, "keys"):  # a transformers ModelOutput, or a dict
        for key in list(value.keys()):
            value[key] = _regroup(value[key], patch_sizes, copy_of)
        return value
    if type(value) in (list, tuple):
        return type(value)(_regroup(v, patch_sizes, copy_of) for v in value)
    raise _CannotRegroup
