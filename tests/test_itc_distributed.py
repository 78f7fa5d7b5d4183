"""ITC across two gloo ranks with unequal shares equals the single-process loss on the whole batch, in value and
in gradients averaged over ranks (as DeepSpeed averages them)."""
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import x2vlm  # noqa: F401
from x2vlm.losses import itc_loss

SIZES = [5, 3]  # rows per rank: unequal on purpose


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_and_grads(img, txt, temp0, ids):
    """Loss and gradients wrt image features, text features and the temperature; also the returned logits."""
    i, t, temp = img.clone().requires_grad_(), txt.clone().requires_grad_(), temp0.clone().requires_grad_()
    loss, i2t, t2i = itc_loss(i, t, temp, ids)
    loss.backward()
    return float(loss.detach()), i.grad, t.grad, temp.grad, i2t, t2i


def rank_main(rank, port, img, txt, temp0, ids, results):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    lo = sum(SIZES[:rank])
    mine = slice(lo, lo + SIZES[rank])
    results[rank] = {"ids": loss_and_grads(img[mine], txt[mine], temp0, ids[mine]),
                     "plain": loss_and_grads(img[mine], txt[mine], temp0, None)}
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(1)
    n = sum(SIZES)
    img = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, 16, generator=g), dim=-1)
    ids = torch.tensor([0, 1, 2, 2, 3, 3, 4, 0])  # duplicates within a rank and across the boundary
    temp0 = torch.tensor([0.07])
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(free_port(), img, txt, temp0, ids, results), nprocs=2, join=True)
        results = dict(results)
    return img, txt, temp0, ids, results


@pytest.mark.parametrize("kind", ["ids", "plain"])
def test_two_ranks_equal_the_global_loss_and_gradients(two_ranks, kind):
    img, txt, temp0, ids, results = two_ranks
    ref_loss, ref_gi, ref_gt, ref_gtemp, ref_i2t, ref_t2i = loss_and_grads(img, txt, temp0,
                                                                           ids if kind == "ids" else None)
    r0, r1 = results[0][kind], results[1][kind]
    assert (r0[0] + r1[0]) / 2 == pytest.approx(ref_loss, abs=1e-5)
    # Each rank owns its rows; the gather's backward has summed every rank's contribution into them.
    assert torch.allclose(torch.cat([r0[1], r1[1]]) / 2, ref_gi, atol=1e-5)
    assert torch.allclose(torch.cat([r0[2], r1[2]]) / 2, ref_gt, atol=1e-5)
    assert torch.allclose((r0[3] + r1[3]) / 2, ref_gtemp, atol=1e-5)
    # The returned logits are each rank's own block of the global matrix (for ITM sampling).
    assert torch.allclose(r0[4], ref_i2t[:5, :5], atol=1e-5) and torch.allclose(r1[5], ref_t2i[5:, 5:], atol=1e-5)
