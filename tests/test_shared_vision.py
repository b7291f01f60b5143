"""sf_train/shared_vision.py: the vision tower once per distinct image, with the outputs, the
gradients and the weights unchanged."""

import pytest
import torch

from sf_train.batch import repeat_inputs
from sf_train.shared_vision import distinct_images, share_image_features, vision_tower


def tiny_vlm_and_inputs(prompts=3, times=4, seed=0):
    from sf_train.worlds.vqa import model as tiny_vlm
    from sf_train.worlds.vqa.world import embedded_vqa

    torch.manual_seed(seed)
    config = tiny_vlm.TinyVLMConfig()
    processor = tiny_vlm.build_processor(config)
    vqa = embedded_vqa(processor)
    inputs = dict(vqa.encode(vqa.samples("train", 0, prompts)))
    build = lambda: tiny_vlm.build_model(config, processor.tokenizer)  # noqa: E731
    torch.manual_seed(seed)
    a = build()
    torch.manual_seed(seed)
    b = build()
    return a, b, repeat_inputs(inputs, times)


def count_images(model) -> list[int]:
    """Wraps the tower's original forward (call before share_image_features): the list grows by
    the number of images of each call that reaches it."""
    visual = vision_tower(model)
    calls, original = [], visual.forward

    def counted(hidden_states, grid_thw=None, **kwargs):
        calls.append(int(grid_thw.shape[0]))
        return original(hidden_states, grid_thw=grid_thw, **kwargs)

    visual.forward = counted
    return calls


def test_distinct_images_groups_exact_copies_only():
    torch.manual_seed(0)
    grid = torch.tensor([[1, 2, 2]] * 5 + [[1, 2, 4]])
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    same_sum = a.flip(0)  # the same fingerprint sum, other pixels
    c = torch.randn(8, 6)
    pixels = torch.cat([a, b, a, same_sum, b, c])
    first, copy_of = distinct_images(pixels, grid)
    assert first == [0, 1, 3, 5]
    assert copy_of == [0, 1, 0, 2, 1, 3]
    # Same pixels in an image of another grid are another image.
    first, copy_of = distinct_images(torch.cat([a, a]), torch.tensor([[1, 2, 2], [1, 1, 4]]))
    assert first == [0, 1] and copy_of == [0, 1]


def test_shared_tower_gives_the_same_logits_and_gradients():
    a, b, inputs = tiny_vlm_and_inputs(prompts=3, times=4)
    calls = count_images(b)
    assert share_image_features(b) and share_image_features(b)  # idempotent
    a.train(), b.train()
    logits_a, logits_b = a(**inputs).logits, b(**inputs).logits
    assert calls == [3], "12 images, 3 distinct: one tower call over the 3"
    torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(logits_a)
    (logits_a * weights).sum().backward()
    (logits_b * weights).sum().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:  # the copies' gradients summed in another order
            scale = pa.grad.abs().max().item()
            assert (pb.grad - pa.grad).abs().max().item() <= 1e-5 * scale + 1e-12, name
    assert any("visual" in n and p.grad is not None for n, p in b.named_parameters())
    assert a.state_dict().keys() == b.state_dict().keys()


def test_the_reuse_without_gradient_ends_with_any_weight_change():
    a, b, inputs = tiny_vlm_and_inputs(prompts=2, times=2)
    calls = count_images(b)
    share_image_features(b)
    b.eval()
    with torch.no_grad():
        first = b(**inputs).logits
        again = b(**inputs).logits
        assert calls == [2], "the same pixel tensor, the same weights: reused"
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        b(**{**inputs, "pixel_values": inputs["pixel_values"].clone()})
        assert calls == [2, 2], "another tensor: encoded again"
        vision_tower(b).blocks[0].mlp.down_proj.weight.mul_(1.5)
        changed = b(**inputs).logits
        assert calls == [2, 2, 2], "a weight changed in place: encoded again"
        assert not torch.allclose(changed, first)
    opt = torch.optim.AdamW(b.parameters(), lr=1e-2)
    b(**inputs).logits.sum().backward()  # with gradient: never reused
    assert calls == [2, 2, 2, 2]
    opt.step()
    with torch.no_grad():
        stepped = b(**inputs).logits
        reused = b(**inputs).logits
        assert calls == [2, 2, 2, 2, 2], "after an optimizer step: encoded once again, then reused"
        fresh = b(**{**inputs, "pixel_values": inputs["pixel_values"].clone()}).logits
    assert not torch.allclose(stepped, changed)
    torch.testing.assert_close(reused, fresh, rtol=0, atol=0)


def test_no_reuse_when_asked():
    _, b, inputs = tiny_vlm_and_inputs(prompts=2, times=1)
    calls = count_images(b)
    share_image_features(b, reuse=False)
    with torch.no_grad():
        b(**inputs)
        b(**inputs)
    assert calls == [2, 2]


def test_a_text_model_has_no_tower():
    from test_replay import tiny_qwen2

    assert not share_image_features(tiny_qwen2())


@pytest.mark.parametrize("regroup_fails", [False, True])
def test_an_output_it_cannot_regroup_runs_the_full_call(regroup_fails):
    import sf_train.shared_vision as sv

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = torch.nn.Linear(3, 3)
            self.images_seen = []

        def forward(self, x, grid_thw=None):
            return self.visual(x, grid_thw=grid_thw)

    model = Tower()
    seen = model.images_seen

    def tower(x, grid_thw=None):
        seen.append(int(grid_thw.shape[0]))
        y = x @ model.visual.weight.T
        return {"rows": y, "odd": torch.zeros(7)} if regroup_fails else {"rows": y}

    model.visual.forward = tower
    sv.share_image_features(model)
    x = torch.randn(2, 3)
    out = model(torch.cat([x, x]), grid_thw=torch.tensor([[1, 1, 2], [1, 1, 2]]))
    assert seen == ([1, 2] if regroup_fails else [1])
    torch.testing.assert_close(out["rows"], torch.cat([x, x]) @ model.visual.weight.T)
