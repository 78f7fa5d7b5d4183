"""Each loss against a brute-force or hand-computed reference (single process; ITC across ranks is in
test_itc_distributed.py)."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

import x2vlm  # noqa: F401
from x2vlm.boxes import cxcywh_to_xyxy, giou
from x2vlm.losses import box_losses, itm_labels, itm_loss, mlm_loss
from x2vlm.ops import itc_loss


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread, immune to the slowdown of parallel regions when other processes share the
    cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def brute_itc(img, txt, temp, ids):
    """Symmetric InfoNCE written out element by element: for each row, minus the mean log-probability of its
    positives, averaged over rows and both directions."""
    n = img.shape[0]
    total = 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(n):
            logits = [float(a[i] @ b[j]) / temp for j in range(n)]
            lse = math.log(sum(math.exp(v) for v in logits))
            pos = [j for j in range(n) if ids[j] == ids[i]]
            total += -sum(logits[j] - lse for j in pos) / len(pos)
    return total / (2 * n)


def test_itc_matches_brute_force_with_and_without_instance_ids():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    loss, i2t, t2i = itc_loss(img, txt, torch.tensor([0.1]), ids)
    assert float(loss) == pytest.approx(brute_itc(img, txt, 0.1, ids.tolist()), rel=1e-5)
    plain, _, _ = itc_loss(img, txt, 0.1)
    assert float(plain) == pytest.approx(brute_itc(img, txt, 0.1, list(range(6))), rel=1e-5)
    assert i2t.shape == t2i.shape == (6, 6) and not i2t.requires_grad
    assert torch.allclose(i2t, img @ txt.T / 0.1) and torch.allclose(t2i, txt @ img.T / 0.1)


def test_itc_in_bf16_inputs_is_computed_in_fp32():
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    loss, i2t, _ = itc_loss(img.bfloat16(), txt.bfloat16(), torch.tensor([0.07]).bfloat16())
    assert loss.dtype == torch.float32 and i2t.dtype == torch.float32


def test_itm_labels_and_loss_ignore_rows_without_a_negative():
    valid = torch.tensor([True, True, False])  # row 2 had no admissible negative image
    labels = itm_labels(valid, torch.tensor([True, False, True]))
    assert labels.tolist() == [1, 1, 1, 0, 0, -100, 0, -100, 0]
    logits = torch.randn(9, 2)
    keep = labels != -100
    assert float(itm_loss(logits, labels)) == pytest.approx(float(F.cross_entropy(logits[keep], labels[keep])))


def python_giou(a, b):
    """GIoU of two (x0, y0, x1, y1) boxes with plain Python numbers."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def test_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    # overlapping: intersection 1, union 4 + 4 - 1 = 7, enclosing 3 x 3 = 9
    assert float(giou(a, torch.tensor([[1.0, 1.0, 3.0, 3.0]]))) == pytest.approx(1 / 7 - 2 / 9)
    assert float(giou(a, a)) == pytest.approx(1.0)
    # disjoint: IoU 0, union 4 + 1 = 5, enclosing 11 x 11 = 121
    assert float(giou(a, torch.tensor([[10.0, 10.0, 11.0, 11.0]]))) == pytest.approx(-(121 - 5) / 121)
    # nested: IoU 1/4, the enclosing box is the outer one, so no penalty
    assert float(giou(a, torch.tensor([[0.5, 0.5, 1.5, 1.5]]))) == pytest.approx(0.25)


def test_giou_matches_brute_force_on_random_boxes():
    rng = random.Random(0)
    rows_a, rows_b = [], []
    for _ in range(50):
        for rows in (rows_a, rows_b):
            x0, y0 = rng.uniform(0, 1), rng.uniform(0, 1)
            rows.append([x0, y0, x0 + rng.uniform(0.01, 1), y0 + rng.uniform(0.01, 1)])
    got = giou(torch.tensor(rows_a, dtype=torch.float64), torch.tensor(rows_b, dtype=torch.float64))
    assert torch.allclose(got, torch.tensor([python_giou(a, b) for a, b in zip(rows_a, rows_b)],
                                            dtype=torch.float64))


def test_box_losses_by_hand():
    pred = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])
    target = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.35, 0.3, 0.1, 0.1]])
    l1, giou_loss = box_losses(pred, target)
    assert float(l1) == pytest.approx((0.0 + 0.05 + 0.1) / 2)  # summed over coordinates, averaged over boxes
    # second pair in xyxy: [0.25, 0.2, 0.35, 0.4] vs [0.3, 0.25, 0.4, 0.35]
    second = python_giou([0.25, 0.2, 0.35, 0.4], [0.3, 0.25, 0.4, 0.35])
    assert float(giou_loss) == pytest.approx(((1 - 1.0) + (1 - second)) / 2, rel=1e-5)
    assert torch.allclose(cxcywh_to_xyxy(pred[1:]), torch.tensor([[0.25, 0.2, 0.35, 0.4]]))
    pred.requires_grad_()
    sum(box_losses(pred, target)).backward()
    assert torch.isfinite(pred.grad).all()


def test_box_losses_on_no_boxes_are_zero():
    l1, giou_loss = box_losses(torch.zeros(0, 4), torch.zeros(0, 4))
    assert float(l1) == 0.0 and float(giou_loss) == 0.0


def test_mlm_loss_only_at_masked_positions():
    logits = torch.randn(2, 4, 10)
    labels = torch.full((2, 4), -100)
    labels[0, 1], labels[1, 3] = 7, 2
    expect = (F.cross_entropy(logits[0, 1][None], torch.tensor([7])) +
              F.cross_entropy(logits[1, 3][None], torch.tensor([2]))) / 2
    assert float(mlm_loss(logits, labels)) == pytest.approx(float(expect), rel=1e-6)
    assert float(mlm_loss(logits.bfloat16(), labels)) == pytest.approx(float(expect), rel=2e-2)
    nothing = mlm_loss(logits.requires_grad_(), torch.full((2, 4), -100))
    assert float(nothing.detach()) == 0.0 and nothing.requires_grad
