"""Optimiser groups, schedule, DeepSpeed config agreement, ranking metrics."""
import pytest
import torch

from x2vlm.config import ConfigError, load_config
from x2vlm.eval.ranking import gt_ranks, place_first, recall, top_pairs
from x2vlm.train.engine import build_ds_config
from x2vlm.train.optim import build_optimizer, lr_factor


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(3, 3)
        self.norm = torch.nn.LayerNorm(3)
        self.head = torch.nn.Linear(3, 2)
        self.temp = torch.nn.Parameter(torch.tensor(0.07))

    def is_new_param(self, name):
        return not name.startswith("backbone")


def test_param_groups_and_schedule():
    cfg = load_config("tiny", ["train.lr=0.01", "train.warmup_steps=10", "train.steps=110", "train.stages=[]",
                              "train.new_param_lr_scale=2.0"])
    opt, sched = build_optimizer(Toy(), cfg.train)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == {"loaded", "loaded_nodecay", "new", "new_nodecay"}
    assert by_name["loaded"]["weight_decay"] == pytest.approx(0.01) and by_name["new_nodecay"]["weight_decay"] == 0
    assert len(by_name["loaded"]["params"]) == 1  # backbone.weight only
    assert len(by_name["new_nodecay"]["params"]) == 4  # norm weight+bias, head bias, temp
    # fresh parameters learn twice as fast; warm-up then linear decay to zero
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["new"] == pytest.approx(2 * lrs["loaded"])
    assert lrs["loaded"] == pytest.approx(0.01 * 1 / 10)
    assert [lr_factor(s, 10, 110) for s in (0, 9, 10, 60, 110)] == pytest.approx([0.1, 1.0, 1.0, 0.5, 0.0])


def test_ds_config_fills_auto_and_refuses_disagreement(tmp_path):
    cfg = load_config("tiny", ["train.grad_accum=2", "train.grad_clip=0.5", "train.precision=fp32"])
    ds = build_ds_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == sum(s.batch_size for s in cfg.data.sources)
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 2 and not ds["bf16"]["enabled"] and "data_types" not in ds
    bf16 = build_ds_config(load_config("tiny", ["train.precision=bf16"]), world_size=2)
    assert bf16["bf16"]["enabled"] and bf16["data_types"]["buffer_dtype"] == "bf16"  # buffers follow the weights
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4}')
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 4 .* train.grad_accum gives 2"):
        build_ds_config(load_config("tiny", [f"train.ds_config={bad}", "train.grad_accum=2"]), 1)
    with pytest.raises(ConfigError, match="train.ds_config: file not found"):
        build_ds_config(load_config("tiny", ["train.ds_config=nope.json"]), 1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a GPU"):
            build_ds_config(load_config("tiny", ["train.precision=fp16"]), 1)


def test_ranks_and_recall_by_hand():
    scores = torch.tensor([[0.9, 0.1, 0.5],    # true item 0 is first  -> rank 0
                           [0.8, 0.2, 0.3],    # true item 1 is last   -> rank 2
                           [0.1, 0.7, 0.6]])   # true item 2 is second -> rank 1
    ranks = gt_ranks(scores, torch.arange(3))
    assert ranks.tolist() == [0, 2, 1]
    r = recall(ranks, ks=(1, 2))
    assert r["r1"] == pytest.approx(1 / 3) and r["r2"] == pytest.approx(2 / 3)
    assert r["median_rank"] == 2 and r["mean_rank"] == pytest.approx(2.0)


def test_rerank_reorders_only_the_top_k():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    # the re-scorer prefers item 1 over item 0; item 3 would win but is outside the top 2
    table = torch.tensor([[0.2, 0.6, 0.0, 1.0]])
    rows, top = top_pairs(scores, 2)
    new = place_first(scores, rows, top, table[rows, top])
    order = new[0].argsort(descending=True).tolist()
    assert order == [1, 0, 2, 3]


def test_itm_rerank_adds_the_itm_log_odds_to_the_itc_logit():
    from x2vlm.eval.retrieval import itm_rerank

    class Temp(torch.nn.Module):
        def temperature(self):
            return torch.tensor(0.5)

    torch.manual_seed(0)
    sim = torch.rand(6, 5) * 2 - 1  # [texts, images]
    # an uninformative ITM head keeps ITC's order within the top k
    flat = lambda t, i: torch.full((len(t),), 3.0)  # noqa: E731
    t2i, i2t = itm_rerank(Temp(), sim, 3, flat)["itm_itc"]
    assert torch.equal(t2i.argsort(1, descending=True)[:, :3], sim.argsort(1, descending=True)[:, :3])
    assert torch.allclose(t2i.gather(1, sim.topk(3, 1).indices), 3.0 + sim.topk(3, 1).values / 0.5)
    assert torch.equal(i2t.argsort(1, descending=True)[:, :3], sim.T.argsort(1, descending=True)[:, :3])
    # a confident one decides; alone, it is X-VLM's order
    table = torch.randn(6, 5) * 100
    calls = []
    counted = lambda t, i: calls.append(len(t)) or table[t, i]  # noqa: E731
    both = itm_rerank(Temp(), sim, 3, counted)
    assert calls == [6 * 3, 5 * 3]  # each direction's top 3 scored once, for both orders
    for name in ("itm_itc", "itm"):
        t2i, _ = both[name]
        top = sim.topk(3, 1).indices
        assert torch.equal(t2i.argmax(1), top.gather(1, table.gather(1, top).argmax(1, keepdim=True))[:, 0])
    assert torch.equal(both["itm"][0].gather(1, top), table.gather(1, top))  # alone: the ITM score itself


def test_fp16_dynamic_loss_scaling_builds_scales_and_skips_overflows(monkeypatch):
    """DeepSpeed runs fp16 on GPUs only; its configuration path is checked here: the shipped fp16 file builds a
    dynamic loss scaler, a finite loss is scaled, an overflowing gradient lowers the scale (after the hysteresis),
    and the step guard counts such skipped steps as overflows, not as bad steps that stop the run."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.fp16 import loss_scaler
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler, has_inf_or_nan

    from x2vlm.train.state import NonFiniteLoss, StepGuard

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ds = build_ds_config(load_config("tiny", ["train.ds_config=zero2_fp16.json", "train.precision=fp16"]), 2)
    assert ds["fp16"]["enabled"] and not ds["bf16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # 0 = dynamic
    fp16 = DeepSpeedConfig(ds).float16_config
    scaler = CreateLossScaler(torch.float16, fp16.loss_scale, fp16.loss_scale == 0, fp16.dynamic_loss_scale_args())
    assert scaler.cur_scale == 2 ** 16
    w = torch.tensor(2.0, requires_grad=True)
    scaler.backward(w * 0.25)  # the loss is scaled before backward: d(scale * w / 4) / dw
    assert float(w.grad) == 2 ** 16 / 4
    grad = (torch.tensor([1.0, 3.0]) * scaler.loss_scale).half()  # 3 * 2^16 is past fp16's largest, 65504
    assert bool(has_inf_or_nan(grad))
    monkeypatch.setattr(loss_scaler.dist, "get_rank", lambda: 0)  # (it logs on rank 0; no process group here)
    scaler.update_scale(True)  # hysteresis 2: the first overflow only uses it up
    scaler.update_scale(True)
    assert scaler.cur_scale == 2 ** 15
    guard = StepGuard(limit=3)
    for step in range(10):  # ten overflows in a row: the scaler's business, the run goes on
        guard.record(False, step, overflow=True)
    assert guard.overflows == 10 and guard.skipped == 0
    guard.record(False, 10)
    guard.record(False, 11)
    with pytest.raises(NonFiniteLoss):
        guard.record(False, 12)


def test_memory_plan_counts_and_arithmetic():
    from x2vlm.model import X2VLM
    from x2vlm.train.plan import GiB, model_state_bytes, parameter_counts, plan

    cfg = load_config("tiny")
    counts = parameter_counts(cfg, vocab_size=100)  # built on the meta device
    real = X2VLM(cfg.model, vocab_size=100, pad_id=0)
    assert counts["total"] == sum(p.numel() for p in real.parameters())
    assert counts["largest_layer"] == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in real.modules())
    states = model_state_bytes(10**9, 10**7, gpus=8)
    assert states["zero1"]["gpu"] == 4 * 10**9 + 16 * 10**9 // 8  # 16-bit weights and gradients whole
    assert states["zero2"]["gpu"] == 2 * 10**9 + 18 * 10**9 // 8  # DeepSpeed's own estimate
    assert states["zero3"]["gpu"] < states["zero2"]["gpu"] < states["zero1"]["gpu"]
    assert states["zero3"]["gpu_offload"] < states["zero3"]["gpu"]
    acts = {"per_unit": 0.5 * GiB, "intercept": 1.0 * GiB}  # fp32 bytes, as measured on the CPU
    p = plan(cfg, gpus=8, gpu_memory_gb=40, micro_batch=16, precision="bf16", vocab=100, activations=acts)
    z2 = p["stages"]["zero2"]
    usable = 40 * 0.9 - z2["model_states_gb"] - 0.5  # 90% of the GPU; bf16 halves the measured activations
    assert z2["largest_micro_batch"] == int(usable // 0.25)
    assert z2["total_gb"] == pytest.approx(z2["model_states_gb"] + 0.5 + 16 * 0.25, abs=1e-3) and z2["fits"]
