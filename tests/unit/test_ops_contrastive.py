"""Tiled contrastive loss: chunked and Triton implementations against the reference itc_loss (values and
gradients wrt both feature sets and the temperature, multi-positive ids, 16-bit inputs), the in-pass Gumbel-max
hard negatives (distribution and exclusions). Two ranks: tests/system/test_itc_distributed.py.

Triton kernels run on CPU only under TRITON_INTERPRET=1, set before triton is imported: the `test_triton_*`
cases run in a child pytest started by `test_interpreted_kernels` and are skipped in a process without it."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import x2vlm  # noqa: F401
from x2vlm.ops import contrastive_loss, itc_loss

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRETED),
                                       reason="needs TRITON_INTERPRET=1 (see test_interpreted_kernels)")


def features(n: int, dim: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1).to(dtype)
    txt = F.normalize(torch.randn(n, dim, generator=g), dim=-1).to(dtype)
    return img, txt


def loss_and_grads(impl, img, txt, temp0, ids=None, **kw):
    """(loss, d image, d text, d temp, output) for one call; temp0 a tensor (learnable) or a float."""
    i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
    temp = temp0.clone().requires_grad_() if torch.is_tensor(temp0) else temp0
    if impl == "itc":
        out = None
        loss = itc_loss(i, t, temp, ids)[0]
    else:
        out = contrastive_loss(i, t, temp, ids, impl=impl, **kw)
        loss = out.loss
    loss.backward()
    return loss.detach(), i.grad, t.grad, temp.grad if torch.is_tensor(temp) else None, out


def check_matches_reference(impl, n=13, dim=24, ids=None, dtype=torch.float32, **kw):
    img, txt = features(n, dim, seed=n, dtype=dtype)
    temp0 = torch.tensor([0.07])
    loss, gi, gt, gtemp, out = loss_and_grads(impl, img, txt, temp0, ids, **kw)
    # The reference in float32 on the same (rounded) inputs.
    ref, ref_gi, ref_gt, ref_gtemp, _ = loss_and_grads("itc", img.float(), txt.float(), temp0, ids)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    assert loss.dtype == torch.float32 and gi.dtype == dtype and gtemp.shape == temp0.shape
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(gi.float(), ref_gi, **tol)
    torch.testing.assert_close(gt.float(), ref_gt, **tol)
    torch.testing.assert_close(gtemp, ref_gtemp, rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-4)
    assert out.neg_image.shape == out.neg_text.shape == (n,) and out.neg_image.dtype == torch.int64


MULTI_IDS = torch.tensor([0, 1, 2, 2, 3, 3, 3, 4, 0, 5, 6, 7, 5])  # repeats, some far apart


@pytest.mark.parametrize("ids", [None, MULTI_IDS], ids=["own-pair", "multi-positive"])
@pytest.mark.parametrize("tile", [4, 4096])
def test_chunked_matches_reference(ids, tile):
    check_matches_reference("chunked", ids=ids, tile=tile)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_16bit_inputs(dtype):
    check_matches_reference("chunked", ids=MULTI_IDS, dtype=dtype, tile=5)


def test_float_temperature_and_reference_impl():
    img, txt = features(9, 8, seed=2)
    ref = itc_loss(img, txt, 0.1)[0]
    for impl in ("chunked", "reference", "auto"):
        loss, gi, gt, _, out = loss_and_grads(impl, img, txt, 0.1, tile=4)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        assert gi.shape == img.shape and out.neg_text_valid.all()


def check_sampler_distribution(impl, calls=3, **kw):
    """All texts equal; images take 4 distinct values (group j % 4), so the t2i row logits only depend on the
    column's group, and an image row sees uniform logits over texts. exclude_ids = j % 6. The group counts of
    the draws are compared with the sum over rows of each row's exact group probabilities (Pearson chi-square,
    3 degrees of freedom; 16.3 is its 0.999 quantile); excluded columns must never come out."""
    n, temp = 240, 0.25
    g = torch.Generator().manual_seed(5)
    protos = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    img = protos[torch.arange(n) % 4]
    txt = F.normalize(protos[0] + 0.5 * protos[1], dim=0).expand(n, 8).contiguous()
    exclude = torch.arange(n) % 6
    group = torch.arange(n) % 4
    admissible = (exclude[:, None] != exclude[None, :]).float()  # [row, column]
    draws = torch.Generator().manual_seed(11)
    for direction, row_logits in (("neg_image", txt @ img.T / temp), ("neg_text", img @ txt.T / temp)):
        weights = row_logits.softmax(1) * admissible
        probs = weights / weights.sum(1, keepdim=True)
        expected = torch.zeros(4).index_add_(0, group, probs.sum(0)) * calls
        counts = torch.zeros(4)
        for _ in range(calls):
            out = contrastive_loss(img, txt, temp, exclude_ids=exclude, impl=impl, generator=draws, **kw)
            neg, valid = getattr(out, direction), getattr(out, direction + "_valid")
            assert valid.all() and neg.min() >= 0 and neg.max() < n
            assert not (exclude[neg] == exclude).any()  # an excluded column never comes out
            counts += torch.bincount(group[neg], minlength=4)
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 16.3, (direction, counts.tolist(), expected.tolist())


@pytest.mark.parametrize("impl,tile", [("reference", 4096), ("chunked", 64), ("chunked", 4096)])
def test_sampler_draws_from_softmax_over_admissible_columns(impl, tile):
    check_sampler_distribution(impl, tile=tile)


def test_sampler_detects_a_wrong_distribution():
    """The check above has power: uniform draws over admissible columns (ignoring the logits) fail it."""
    n, temp = 240, 0.25
    g = torch.Generator().manual_seed(5)
    protos = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    img, txt = protos[torch.arange(n) % 4], F.normalize(protos[0] + 0.5 * protos[1], dim=0).expand(n, 8)
    exclude, group = torch.arange(n) % 6, torch.arange(n) % 4
    admissible = (exclude[:, None] != exclude[None, :]).float()
    probs = (txt @ img.T / temp).softmax(1) * admissible
    expected = torch.zeros(4).index_add_(0, group, (probs / probs.sum(1, keepdim=True)).sum(0)) * 3
    uniform = torch.multinomial(admissible, 3, replacement=True, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(group[uniform.flatten()], minlength=4).float()
    assert float(((counts - expected) ** 2 / expected).sum()) > 16.3


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_rows_without_admissible_negative(impl):
    img, txt = features(5, 8, seed=3)
    out = contrastive_loss(img, txt, 0.07, exclude_ids=torch.zeros(5, dtype=torch.long), impl=impl, tile=2)
    assert not out.neg_image_valid.any() and not out.neg_text_valid.any()
    assert (out.neg_image == 0).all() and (out.neg_text == 0).all()
    # Default exclusion follows the instance ids: a row's own id group is never drawn.
    ids = torch.tensor([0, 0, 1, 1, 1])
    out = contrastive_loss(img, txt, 0.07, instance_ids=ids, impl=impl, tile=2)
    assert out.neg_image_valid.all() and (ids[out.neg_image] != ids).all() and (ids[out.neg_text] != ids).all()
    one = contrastive_loss(img[:1], txt[:1], 0.07, impl=impl)  # a single pair has no negative
    assert not one.neg_image_valid.item() and one.neg_image.item() == 0


def check_two_keys(impl, **kw):
    """exclude_ids [B, 2]: a column is never drawn for a row when either key agrees (the same image, or the same
    text); rows whose every column shares a key have no negative."""
    n = 12
    img, txt = features(n, 8, seed=4)
    image_key = torch.arange(n) // 3  # 4 images of 3 texts
    text_key = torch.tensor([0, 1, 2, 0, 3, 4, 5, 6, 7, 8, 9, 1])  # texts 0 and 3, 1 and 11 are the same words
    img[3] = txt[0]  # text 0's most similar image is image 3, of another image group but the same words
    keys = torch.stack([image_key, text_key], 1)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        out = contrastive_loss(img, txt, 0.07, exclude_ids=keys, impl=impl, generator=gen, **kw)
        for neg, valid in ((out.neg_image, out.neg_image_valid), (out.neg_text, out.neg_text_valid)):
            assert valid.all()
            assert not ((image_key[neg] == image_key) | (text_key[neg] == text_key)).any()
    # With one key alone (the image), texts 0 and 3 could draw each other: the second key is what forbids it.
    reachable = set()
    for seed in range(10):
        out = contrastive_loss(img, txt, 0.07, exclude_ids=image_key, impl=impl,
                               generator=torch.Generator().manual_seed(seed), **kw)
        reachable |= {int(out.neg_image[0])}
    assert 3 in reachable
    whole = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], 1)  # every row shares key 0
    out = contrastive_loss(img, txt, 0.07, exclude_ids=whole, impl=impl, **kw)
    assert not out.neg_image_valid.any() and not out.neg_text_valid.any()


@pytest.mark.parametrize("impl,tile", [("reference", 4096), ("chunked", 4), ("chunked", 4096)])
def test_two_exclusion_keys(impl, tile):
    check_two_keys(impl, tile=tile) if impl != "reference" else check_two_keys(impl)


# --- Triton (interpreter) ---------------------------------------------------------------------------------
@needs_interpreter
@pytest.mark.parametrize("ids", [None, MULTI_IDS], ids=["own-pair", "multi-positive"])
def test_triton_matches_reference(ids):
    check_matches_reference("triton", n=13, dim=20, ids=ids)


@needs_interpreter
def test_triton_bf16_more_rows_than_a_block():
    check_matches_reference("triton", n=70, dim=16, dtype=torch.bfloat16, ids=torch.arange(70) // 3)


@needs_interpreter
def test_triton_sampler_distribution_and_exclusions():
    check_sampler_distribution("triton", calls=2)
    img, txt = features(5, 8, seed=3)
    out = contrastive_loss(img, txt, 0.07, exclude_ids=torch.zeros(5, dtype=torch.long), impl="triton")
    assert not out.neg_image_valid.any() and (out.neg_text == 0).all()


@needs_interpreter
def test_triton_two_exclusion_keys():
    check_two_keys("triton")


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="triton missing, or already interpreted here")
def test_interpreted_kernels(run_triton_interpreted):
    run_triton_interpreted(__file__)
