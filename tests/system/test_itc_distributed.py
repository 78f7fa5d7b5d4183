"""The contrastive loss across two gloo ranks with unequal shares equals the single-process loss on the whole
batch, in value and in gradients averaged over ranks (as DeepSpeed averages them), for the plain definition and
the tiled implementation; the tiled one's hard negatives are local pairs of another instance."""
import os

import pytest
import torch
import torch.nn.functional as F

import x2vlm  # noqa: F401
from x2vlm.distributed import free_port
from x2vlm.ops import contrastive_loss, itc_loss

SIZES = [5, 3]  # rows per rank: unequal on purpose
IDS = torch.tensor([0, 1, 2, 2, 3, 3, 4, 0])  # duplicates within a rank and across the boundary


def loss_and_grads(impl, img, txt, temp0, ids):
    """(loss, d image, d text, d temp, (i2t, t2i) logits or the tiled loss's negatives) of one call."""
    i, t, temp = img.clone().requires_grad_(), txt.clone().requires_grad_(), temp0.clone().requires_grad_()
    if impl == "reference":
        loss, *extra = itc_loss(i, t, temp, ids)
    else:
        out = contrastive_loss(i, t, temp, ids, impl="chunked", tile=2)
        loss, extra = out.loss, [out.neg_image, out.neg_image_valid, out.neg_text, out.neg_text_valid]
    loss.backward()
    return float(loss.detach()), i.grad, t.grad, temp.grad, extra


def rank_main(rank, port, img, txt, temp0, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    lo = sum(SIZES[:rank])
    mine = slice(lo, lo + SIZES[rank])
    results[rank] = {(impl, kind): loss_and_grads(impl, img[mine], txt[mine], temp0, ids)
                     for impl in ("reference", "chunked")
                     for kind, ids in (("ids", IDS[mine]), ("plain", None))}
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    img = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    temp0 = torch.tensor([0.07])
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(free_port(), img, txt, temp0, results), nprocs=2, join=True)
        results = dict(results)
    return img, txt, temp0, results


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("kind", ["ids", "plain"])
def test_two_ranks_equal_the_global_loss_and_gradients(two_ranks, impl, kind):
    img, txt, temp0, results = two_ranks
    ids = IDS if kind == "ids" else None
    ref_loss, ref_gi, ref_gt, ref_gtemp, (ref_i2t, ref_t2i) = loss_and_grads("reference", img, txt, temp0, ids)
    r0, r1 = results[0][impl, kind], results[1][impl, kind]
    assert (r0[0] + r1[0]) / 2 == pytest.approx(ref_loss, abs=1e-5)
    # Each rank owns its rows; the gather's backward has summed every rank's contribution into them.
    torch.testing.assert_close(torch.cat([r0[1], r1[1]]) / 2, ref_gi, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r0[2], r1[2]]) / 2, ref_gt, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((r0[3] + r1[3]) / 2, ref_gtemp, rtol=1e-5, atol=1e-5)
    if impl == "reference":  # the returned logits are each rank's own block of the global matrix
        assert torch.allclose(r0[4][0], ref_i2t[:5, :5], atol=1e-5)
        assert torch.allclose(r1[4][1], ref_t2i[5:, 5:], atol=1e-5)
        return
    all_ids = IDS if kind == "ids" else torch.arange(sum(SIZES))
    for rank, r in ((0, r0), (1, r1)):  # negatives: local indices of pairs with another instance id
        lo = sum(SIZES[:rank])
        local_ids = all_ids[lo:lo + SIZES[rank]]
        neg_image, image_ok, neg_text, text_ok = r[4]
        for neg, valid in ((neg_image, image_ok), (neg_text, text_ok)):
            assert valid.all() and neg.min() >= 0 and neg.max() < SIZES[rank]
            assert (local_ids[neg] != local_ids).all()
