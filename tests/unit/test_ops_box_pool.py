"""Box pooling: the summed-area-table and Triton implementations against the gather + masked-mean reference,
forward and gradients, on random and edge-case boxes.

Triton kernels run on CPU only under TRITON_INTERPRET=1, which must be set before triton is imported; the
`test_triton_*` cases therefore run in a child pytest started by `test_interpreted_kernels` with that variable
set, and are skipped in a process without it."""
import importlib
import importlib.util
import math
import os

import pytest
import torch


import x2vlm  # noqa: F401
from x2vlm.ops import box_mask, box_pool, box_pool_reference, grid_boxes

box_pool_module = importlib.import_module("x2vlm.ops.box_pool")

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def make_case(n_img: int, grid: int, dim: int, seed: int, dtype=torch.float32):
    """Random features and boxes plus the edge cases: border boxes, 1-patch boxes, whole-image boxes, several
    boxes on one image, and one image (the last) with no box."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_img, grid * grid, dim, generator=g).to(dtype)
    c0 = torch.randint(0, grid, (12,), generator=g)
    r0 = torch.randint(0, grid, (12,), generator=g)
    c1 = torch.minimum(c0 + 1 + torch.randint(0, grid, (12,), generator=g), torch.tensor(grid))
    r1 = torch.minimum(r0 + 1 + torch.randint(0, grid, (12,), generator=g), torch.tensor(grid))
    edge = torch.tensor([[0, 0, grid, grid],  # whole image
                         [grid - 1, grid - 1, grid, grid],  # 1 patch in the bottom-right corner
                         [0, 0, 1, 1],  # 1 patch in the top-left corner
                         [grid - 2, 0, grid, grid],  # right border strip
                         [0, grid - 1, grid, grid],  # bottom row
                         [1, 1, 2, grid]])  # a column
    boxes = torch.cat([torch.stack([c0, r0, c1, r1], 1), edge])
    image_idx = torch.randint(0, n_img - 1, (boxes.shape[0],), generator=g)  # the last image has no box
    image_idx[:3] = 0  # several boxes on one image
    return feats, boxes, image_idx


def pool_and_grads(impl: str, feats, boxes, image_idx, grid, weight):
    x = feats.clone().requires_grad_()
    out = (box_pool_reference(x, boxes, image_idx, grid) if impl == "reference"
           else box_pool(x, boxes, image_idx, grid, impl=impl))
    (out.float() * weight).sum().backward()
    return out.detach(), x.grad


def check_against_reference(impl, dtype, n_img=4, grid=5, dim=70, seed=0):
    feats, boxes, image_idx = make_case(n_img, grid, dim, seed, dtype)
    weight = torch.randn(boxes.shape[0], dim, generator=torch.Generator().manual_seed(seed + 1))
    out, grad = pool_and_grads(impl, feats, boxes, image_idx, grid, weight)
    # The reference runs in float64 on the same (rounded) inputs; the result is compared in the input dtype.
    # Differences of prefix sums cost some absolute precision (about eps * |prefix sum|), hence atol.
    ref, ref_grad = pool_and_grads("reference", feats.double(), boxes, image_idx, grid, weight.double())
    assert out.dtype == grad.dtype == dtype and out.shape == (boxes.shape[0], dim)
    torch.testing.assert_close(out, ref.to(dtype), **TOL[dtype])
    torch.testing.assert_close(grad, ref_grad.to(dtype), **TOL[dtype])
    assert torch.all(grad[-1] == 0)  # the image without a box gets no gradient


def test_grid_boxes_match_the_region_mask_definition():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 260 - 20  # some start outside the image
    wh = torch.rand(200, 2, generator=g) * 150
    boxes = torch.cat([xy, wh], 1)
    boxes[:4] = torch.tensor([[0.0, 0, 224, 224], [223.5, 223.5, 0.2, 0.2], [16, 32, 16, 16], [15.9, 0, 0, 0]])
    gb = grid_boxes(boxes, 224, 16)
    assert gb.dtype == torch.int64
    for (x, y, w, h), (c0, r0, c1, r1) in zip(boxes.tolist(), gb.tolist()):  # the rule, in plain Python
        col0, row0 = min(max(math.floor(x / 16), 0), 13), min(max(math.floor(y / 16), 0), 13)
        assert [c0, r0] == [col0, row0]
        assert c1 == max(min(math.ceil((x + w) / 16), 14), col0 + 1)
        assert r1 == max(min(math.ceil((y + h) / 16), 14), row0 + 1)
    mask = box_mask(gb, 14).view(-1, 14, 14)
    for m, (c0, r0, c1, r1) in zip(mask, gb.tolist()):
        assert int(m.sum()) == (c1 - c0) * (r1 - r0) and m[r0:r1, c0:c1].all()
    assert gb[0].tolist() == [0, 0, 14, 14] and gb[1].tolist() == [13, 13, 14, 14]
    assert gb[2].tolist() == [1, 2, 2, 3] and gb[3].tolist() == [0, 0, 1, 1]


def test_whole_image_box_is_the_mean_patch():
    feats = torch.randn(2, 9, 5)
    out = box_pool(feats, torch.tensor([[0, 0, 3, 3], [1, 1, 2, 2]]), torch.tensor([1, 0]), 3, impl="cpu")
    torch.testing.assert_close(out[0], feats[1].mean(0))
    torch.testing.assert_close(out[1], feats[0, 4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_matches_reference(dtype):
    check_against_reference("cpu", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_in_chunks_of_images_on_a_large_grid(monkeypatch, dtype):
    """Two images per chunk: chunks [0, 2), [2, 4) and [4, 5), the last one without boxes (skipped)."""
    monkeypatch.setattr(box_pool_module, "SAT_BYTES", 2 * 4 * 15 * 15 * 30)
    check_against_reference("cpu", dtype, n_img=5, grid=14, dim=30, seed=3)


def test_no_boxes_and_auto_on_cpu():
    feats = torch.randn(2, 4, 3, requires_grad=True)
    out = box_pool(feats, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long), 2)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))
    assert box_pool_module.resolve_impl("auto", feats, ("cpu", "triton"), "cpu") == "cpu"
    with pytest.raises(ValueError):
        box_pool(feats, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long), 2, impl="gpu")


@pytest.mark.skipif(not (HAS_TRITON and INTERPRETED), reason="needs TRITON_INTERPRET=1 (see test_interpreted_kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_matches_reference(dtype):
    check_against_reference("triton", dtype, n_img=3, grid=4, dim=70)


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="triton missing, or already interpreted here")
def test_interpreted_kernels(run_triton_interpreted):
    run_triton_interpreted(__file__)
