"""Videos in the model: frames through the image encoder as one batch, a frame embedding, temporal aggregation;
mean pooling cannot tell a clip from the same clip played backwards, the attention aggregator can."""
import pytest
import torch

from x2vlm.config import load_config
from x2vlm.model import X2VLM
from x2vlm.objectives import Pretraining

SIZE = 32


def tiny_model(aggregator: str) -> X2VLM:
    cfg = load_config("tiny", [
        f"model.vision.image_size={SIZE}", "model.vision.width=64", "model.vision.depth=1", "model.vision.heads=2",
        "model.text.hidden_size=64", "model.text.layers=1", "model.text.heads=2", "model.text.intermediate_size=128",
        "model.fusion.layers=1", "model.fusion.heads=2", "model.fusion.intermediate_size=128", "model.embed_dim=32",
        f"model.video.aggregator={aggregator}", "model.video.max_frames=6", "model.video.heads=2"])
    torch.manual_seed(0)
    return X2VLM(cfg.model, vocab_size=50, pad_id=0)


def randomise_temporal(model: X2VLM) -> None:
    """The attention aggregator starts as plain mean pooling (zero output projections); give it random weights."""
    with torch.no_grad():
        for p in model.temporal.parameters():
            p.normal_(0, 0.3)


def clips(n=2, f=5):
    return torch.randn(n, f, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_video_is_shaped_like_an_image_and_frames_share_one_encoder_call():
    model = tiny_model("attention").eval()
    calls = []
    model.vision.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    with torch.no_grad():
        v = model.encode_video(clips())
        img = model.encode_image(clips()[:, 0])
    assert v.shape == img.shape == (2, 1 + (SIZE // 8) ** 2, 64)
    assert calls == [10, 2]  # 2 clips x 5 frames in one call


def test_mean_pooling_cannot_tell_the_order_of_frames():
    model = tiny_model("mean").eval()
    x = clips()
    with torch.no_grad():
        forward, backward = model.encode_video(x), model.encode_video(x.flip(1))
    assert torch.allclose(forward, backward, atol=1e-5)


def test_attention_aggregator_tells_the_order_of_frames():
    model = tiny_model("attention").eval()
    x = clips()
    with torch.no_grad():
        start = model.encode_video(x), model.encode_video(x.flip(1))
        assert torch.allclose(*start, atol=1e-5)  # at initialisation it is mean pooling
        randomise_temporal(model)
        forward, backward = model.encode_video(x), model.encode_video(x.flip(1))
    assert (forward - backward).abs().max() > 1e-2


@pytest.mark.parametrize("aggregator", ["mean", "attention"])
def test_padding_frames_change_nothing(aggregator):
    model = tiny_model(aggregator).eval()
    randomise_temporal(model)
    x = clips(n=1, f=3)
    padded = torch.cat([x, torch.randn(1, 2, 3, SIZE, SIZE)], 1)
    mask = torch.tensor([[True, True, True, False, False]])
    with torch.no_grad():
        assert torch.allclose(model.encode_video(x), model.encode_video(padded, mask), atol=1e-5)


def test_video_batch_trains_the_frame_embedding_and_image_batch_keeps_it_in_the_graph():
    model = tiny_model("attention")
    n = 3
    ids = torch.randint(5, 50, (n, 6))
    batch = {"videos": clips(n, 4), "frame_mask": torch.ones(n, 4, dtype=torch.bool), "text_ids": ids,
             "text_atts": torch.ones_like(ids), "mlm_ids": ids.clone(), "mlm_labels": torch.full_like(ids, -100),
             "image_idx": torch.arange(n), "boxes": torch.tensor([[0.0, 0, SIZE, SIZE]] * n),
             "is_region": torch.zeros(n, dtype=torch.bool)}
    batch["mlm_labels"][:, 2] = ids[:, 2]
    batch["mlm_ids"][:, 2] = 3
    objective = Pretraining(load_config("tiny").loss)
    out = model(batch, objective)
    assert {"itc", "itm", "mlm", "loss"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.temporal.frame_embed.grad.abs().sum() > 0
    image_batch = {**batch, "images": batch["videos"][:, 0]}
    del image_batch["videos"], image_batch["frame_mask"]
    model.zero_grad(set_to_none=True)
    model(image_batch, objective)["loss"].backward()
    assert model.temporal.frame_embed.grad is not None and model.temporal.frame_embed.grad.abs().sum() == 0


def test_direction_probe_mean_pooling_is_blind_to_direction():
    from x2vlm.eval.video import direction_probe, swap_direction

    assert swap_direction("a red circle moves to the left, next to a blue square") == \
        "a red circle moves to the right, next to a blue square"
    assert swap_direction("the square slides upwards") == "the square slides downwards"
    assert swap_direction("a green square turns blue") is None
    model = tiny_model("attention").eval()
    randomise_temporal(model)
    vocab = {}

    def tokenize(texts):
        ids = [[1] + [2 + vocab.setdefault(w, len(vocab) % 45) for w in t.split()] for t in texts]
        n = max(map(len, ids))
        return (torch.tensor([i + [0] * (n - len(i)) for i in ids]),
                torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids]))

    captions = ["a red circle moves to the left", "a blue square moves up", "a green cross turns red",
                "the yellow diamond slides downwards", "a white circle is moving right", "a red square moves down"]
    videos = torch.randn(6, 4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[1, 3:] = False
    out = direction_probe(model, videos, mask, captions, tokenize)
    assert out["mean"]["n"] == out["attention"]["n"] == 5
    assert out["mean"]["forward_acc"] + out["mean"]["reversed_acc"] == pytest.approx(1.0)  # blind by construction
    assert len(model.temporal.blocks) == 1 and model.temporal.motion is not None  # the probe put them back


def test_motion_summary_is_antisymmetric_in_time_and_absent_without_motion():
    from x2vlm.model.temporal import motion_moments

    x = torch.randn(2, 4, 1 + 16, 8, generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert torch.allclose(motion_moments(x.flip(1), mask), -motion_moments(x, mask), atol=1e-6)
    still = x[:, :1].expand(2, 4, 17, 8)
    assert motion_moments(still, mask).abs().max() < 1e-6
    one = torch.tensor([[True, False, False, False]] * 2)
    assert motion_moments(x, one).abs().max() == 0
    # a feature whose mass moves right along x: positive x moment, zero y moment
    frames = torch.zeros(1, 2, 1 + 4, 1)
    frames[0, 0, 1 + 0] = frames[0, 0, 1 + 2] = 1.0  # left column (patches 0, 2 of a 2x2 grid) at the start
    frames[0, 1, 1 + 1] = frames[0, 1, 1 + 3] = 1.0  # right column at the end
    mx, my = motion_moments(frames, torch.ones(1, 2, dtype=torch.bool))[0].tolist()  # one channel: (x, y)
    assert mx > 0 and my == 0


def test_mean_model_loads_an_attention_checkpoint():
    attention, mean = tiny_model("attention"), tiny_model("mean")
    randomise_temporal(attention)
    mean.load_state_dict(attention.state_dict())  # the temporal transformer and motion weights are left unused
    assert torch.equal(mean.temporal.frame_embed, attention.temporal.frame_embed)


def test_motion_summary_reaches_the_clip_token_only_and_whole_clip_texts_read_it():
    model = tiny_model("attention").eval()
    randomise_temporal(model)
    x = clips()
    with torch.no_grad():
        with_motion = model.encode_video(x)
        motion, model.temporal.motion = model.temporal.motion, None
        without = model.encode_video(x)
        model.temporal.motion = motion
        assert torch.equal(with_motion[:, 1:], without[:, 1:])  # the patch tokens keep what each place shows
        assert (with_motion[:, 0] - without[:, 0]).abs().max() > 1e-2
        # a text about the whole clip takes token 0 as its region token; a smaller box the mean of its patches
        whole, half = [0.0, 0.0, SIZE, SIZE], [0.0, 0.0, SIZE / 2, SIZE]
        cls, mask = model.regions(with_motion, torch.tensor([whole, half, whole]), torch.tensor([0, 0, 1]))
    assert torch.equal(cls[0], with_motion[0, 0]) and torch.equal(cls[2], with_motion[1, 0])
    grid = SIZE // 8
    left = with_motion[0, 1:].view(grid, grid, -1)[:, : grid // 2].reshape(-1, with_motion.shape[-1])
    assert torch.allclose(cls[1], left.mean(0), atol=1e-5)
    assert mask[0].all() and mask[1].sum() == 1 + grid * grid // 2


def test_a_whole_image_box_gives_the_same_region_token_as_before_for_images():
    model = tiny_model("attention").eval()
    with torch.no_grad():
        vis = model.encode_image(clips()[:, 0])
        cls, _ = model.regions(vis, torch.tensor([[0.0, 0.0, SIZE, SIZE]] * 2), torch.tensor([0, 1]))
    assert torch.allclose(cls, vis[:, 1:].mean(1), atol=1e-6)  # token 0 of an image is the mean of its patches
