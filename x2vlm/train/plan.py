"""Memory plan of a run: what one GPU holds, per ZeRO stage, and the largest micro-batch that fits.

    x2vlm plan --config base --gpus 8 --gpu-memory 80

- Model states (weights, gradients, optimiser) per GPU: DeepSpeed's own estimators for ZeRO-2 and ZeRO-3 (with
  and without optimiser offload to the CPU), and for ZeRO-1 the same accounting with the 16-bit gradients whole on
  every GPU: 2 bytes of 16-bit weights + 2 of 16-bit gradients + (4 of fp32 gradients + 4 of fp32 weights + 8 of
  Adam's moments) / GPUs per parameter.
- Activations: measured, not modelled. One forward and backward of the configuration's last stage (one batch of
  every source, as a training step holds them) runs on this machine's CPU in a fresh process at two small
  micro-batches (2 and 4: at 1 the allocator's reuse of small blocks hides part of the growth); the growth of
  the process's peak resident memory between them is the memory per micro-batch unit, and the plan scales it
  linearly. A micro-batch of N means N images (or clips) from every source of the
  stage. The measurement is in fp32; bf16 and fp16 hold about half of it (the plan says which it used).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time

import torch

from x2vlm.config import RunConfig

GiB = 1 << 30
BERT_VOCAB = 30522  # the vocabulary assumed when the configuration names no tokenizer


def parameter_counts(cfg: RunConfig, vocab_size: int = BERT_VOCAB) -> dict:
    """{"total", "trainable", "largest_layer"}: parameters of the model a configuration builds (on the meta
    device: nothing is allocated)."""
    from x2vlm.model import X2VLM

    with torch.device("meta"):
        model = X2VLM(dataclasses.replace(cfg.model, vision=dataclasses.replace(cfg.model.vision, init_checkpoint=""),
                                          text=dataclasses.replace(cfg.model.text, init_checkpoint="")),
                      vocab_size=vocab_size, pad_id=0)
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return {"total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad), "largest_layer": largest}


def model_state_bytes(params: int, largest_layer: int, gpus: int, nodes: int = 1) -> dict:
    """Bytes of model states on one GPU: {"zero1" | "zero2" | "zero3": {"gpu", "gpu_offload"}} (offload: the
    optimiser states, and for ZeRO-3 the parameters too, on the CPU)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total = gpus * nodes
    z2 = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=False)[1]
    z2_off = estimate_zero2_model_states_mem_needs(params, gpus, nodes, cpu_offload=True)[1]
    z3 = estimate_zero3_model_states_mem_needs(params, largest_layer, gpus, nodes, cpu_offload=False)[1]
    z3_off = estimate_zero3_model_states_mem_needs(params, largest_layer, gpus, nodes, cpu_offload=True,
                                                   cpu_offload_params=True)[1]
    return {"zero1": {"gpu": 4 * params + 16 * params // total, "gpu_offload": 4 * params},
            "zero2": {"gpu": z2, "gpu_offload": z2_off}, "zero3": {"gpu": z3, "gpu_offload": z3_off}}


# --- measuring activations -------------------------------------------------------------------------------------

def synthetic_batch(cfg: RunConfig, kind: str, n: int, max_texts: int, frames: int, vocab: int,
                    gen: torch.Generator) -> dict:
    """A batch of `n` images (or clips) in the loaders' format with random content and texts of full length."""
    size, length = cfg.model.vision.image_size, cfg.model.text.max_len
    per = max_texts if kind == "region" else 1
    m = n * per
    ids = torch.randint(5, vocab, (m, length), generator=gen)
    ids[:, 0] = 2
    mlm_ids, labels = ids.clone(), torch.full((m, length), -100)
    masks = max(1, min(cfg.loss.max_masks, round(length * cfg.loss.mlm_prob)))
    labels[:, 1:1 + masks], mlm_ids[:, 1:1 + masks] = ids[:, 1:1 + masks], 4
    xy = torch.rand(m, 2, generator=gen) * size / 2
    boxes = torch.cat([xy, xy.new_full((m, 2), size / 2)], 1)
    is_region = torch.zeros(m, dtype=torch.bool)
    if kind == "region":
        is_region.view(n, per)[:, 1:] = True
    batch = {"text_ids": ids, "text_atts": torch.ones_like(ids), "mlm_ids": mlm_ids, "mlm_labels": labels,
             "image_idx": torch.arange(n).repeat_interleave(per), "boxes": boxes, "is_region": is_region,
             "keys": [str(i) for i in range(n)], "skipped": {}}
    if kind in ("video", "video_qa"):
        batch["videos"] = torch.randn(n, frames, 3, size, size, generator=gen)
        batch["frame_mask"] = torch.ones(n, frames, dtype=torch.bool)
    else:
        batch["images"] = torch.randn(n, 3, size, size, generator=gen)
    if kind == "video_qa":
        batch["answer_labels"] = torch.randint(0, max(1, cfg.model.qa_answers), (n,), generator=gen)
    return batch


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(cfg: RunConfig, micro_batch: int, vocab: int, out) -> None:
    """In a fresh process: the peak resident memory of one training step above the memory before it."""
    from x2vlm.model import X2VLM
    from x2vlm.objectives import for_source
    from x2vlm.train.stages import plan_stages

    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    stage = plan_stages(cfg)[-1]
    sources = [s for s in cfg.data.sources if s.name in stage.sources]
    torch.manual_seed(0)
    model = X2VLM(cfg.model, vocab_size=vocab, pad_id=0).train()
    for p in model.parameters():  # gradients exist before the step, as in training after the first step
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    gen = torch.Generator().manual_seed(0)
    batches = [(for_source(s.kind, cfg.loss), synthetic_batch(cfg, s.kind, micro_batch, s.max_texts,
                                                              s.max_frames, vocab, gen)) for s in sources]
    peak, done = [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    before = _rss()
    watcher = threading.Thread(target=watch)
    watcher.start()
    total = sum(model(batch, objective)["loss"] for objective, batch in batches)
    total.backward()
    done.set()
    watcher.join()
    out.put({"before": before, "peak": max(peak[0], _rss()), "activation": max(peak[0], _rss()) - before})


def measure_activation(cfg: RunConfig, micro_batch: int, vocab: int = BERT_VOCAB) -> dict:
    """{"before", "peak", "activation"} bytes of one forward/backward of the last stage at `micro_batch`, run in
    a fresh process (large buffers are mapped and unmapped one by one, so the resident size follows what is
    alive)."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 10))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(cfg, micro_batch, vocab, out))
    proc.start()
    try:
        result = out.get(timeout=3600)
    finally:
        proc.join()
    return result


def activation_model(cfg: RunConfig, sizes=(2, 4), vocab: int = BERT_VOCAB) -> dict:
    """Activation bytes = intercept + per_unit * micro-batch, from measurements at two micro-batches."""
    a, b = (measure_activation(cfg, n, vocab)["activation"] for n in sizes)
    per_unit = max(0.0, (b - a) / (sizes[1] - sizes[0]))
    return {"per_unit": per_unit, "intercept": max(0.0, a - per_unit * sizes[0]), "sizes": list(sizes)}


def plan(cfg: RunConfig, gpus: int, gpu_memory_gb: float, nodes: int = 1, micro_batch: int | None = None,
         precision: str = "bf16", reserve: float = 0.1, vocab: int = BERT_VOCAB,
         activations: dict | None = None) -> dict:
    """The plan (see the module docstring); `reserve`: the share of GPU memory kept free (allocator, buffers)."""
    counts = parameter_counts(cfg, vocab)
    states = model_state_bytes(counts["total"], counts["largest_layer"], gpus, nodes)
    act = activations or activation_model(cfg, vocab=vocab)
    scale = 1.0 if precision == "fp32" else 0.5
    usable = gpu_memory_gb * GiB * (1 - reserve)
    out = {"parameters": counts, "gpus": gpus, "nodes": nodes, "gpu_memory_gb": gpu_memory_gb, "precision": precision,
           "activation_gb_per_micro_batch_unit": round(act["per_unit"] * scale / GiB, 4),
           "activation_gb_fixed": round(act["intercept"] * scale / GiB, 4),
           "activation_checkpointing": list(cfg.model.activation_checkpointing), "stages": {}}
    for stage, mem in states.items():
        for where, state in (("", mem["gpu"]), ("_offload", mem["gpu_offload"])):
            free = usable - state - act["intercept"] * scale
            fits = int(free // (act["per_unit"] * scale)) if act["per_unit"] > 0 and free > 0 else 0
            entry = {"model_states_gb": round(state / GiB, 3), "largest_micro_batch": fits}
            if micro_batch:
                need = state + (act["intercept"] + act["per_unit"] * micro_batch) * scale
                entry.update(micro_batch=micro_batch, total_gb=round(need / GiB, 3), fits=need <= usable)
            out["stages"][stage + where] = entry
    return out
