"""Benchmark: activation memory of one training step with and without activation checkpointing, in the same run.

    python scripts/bench_memory.py                       # base preset, micro-batch 4 (per source), on the CPU
    python scripts/bench_memory.py --config tiny --micro-batch 16

One forward and backward of the configuration's last stage (one batch of every source, as a training step holds
them; synthetic content, texts of full length) in a fresh process per setting. On the CPU the activation memory
is the peak resident memory during the step above the memory before it (fp32; gradients exist before the
step); on a GPU it is the peak allocated memory above the memory before it (bf16). The last line printed is one
JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from x2vlm.config import load_config, update  # noqa: E402
from x2vlm.train.plan import BERT_VOCAB, measure_activation, synthetic_batch  # noqa: E402

TOWERS = ["vision", "text", "fusion"]


def gpu_activation(cfg, micro_batch: int) -> int:
    """Peak allocated bytes of one bf16 step on the GPU above the allocation before it."""
    from x2vlm.model import X2VLM
    from x2vlm.objectives import for_source
    from x2vlm.train.stages import plan_stages

    torch.manual_seed(0)
    model = X2VLM(cfg.model, vocab_size=BERT_VOCAB, pad_id=0).cuda().to(torch.bfloat16).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    stage = plan_stages(cfg)[-1]
    gen = torch.Generator().manual_seed(0)
    batches = []
    for s in (s for s in cfg.data.sources if s.name in stage.sources):
        b = synthetic_batch(cfg, s.kind, micro_batch, s.max_texts, s.max_frames, BERT_VOCAB, gen)
        b = {k: (v.cuda().to(torch.bfloat16) if k in ("images", "videos") else v.cuda()) if torch.is_tensor(v) else v
             for k, v in b.items()}
        batches.append((for_source(s.kind, cfg.loss), b))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sum(model(b, o)["loss"] for o, b in batches).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="base")
    ap.add_argument("--micro-batch", type=int, default=4, help="images (or clips) of every source")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    base = load_config(args.config, args.overrides)
    on_gpu = torch.cuda.is_available()
    result = {"config": args.config, "micro_batch": args.micro_batch, "device": "cuda" if on_gpu else "cpu",
              "measure": "max allocated (bf16)" if on_gpu else "peak RSS (fp32)", "settings": {}}
    for name, towers in (("plain", []), ("checkpointed", TOWERS)):
        cfg = update(base, {"model.activation_checkpointing": towers})
        act = gpu_activation(cfg, args.micro_batch) if on_gpu else \
            measure_activation(cfg, args.micro_batch)["activation"]
        result["settings"][name] = {"towers": towers, "activation_gb": round(act / 2**30, 3)}
        print(f"{name:>13}: {act / 2**30:.3f} GB of activations", flush=True)
    plain, ckpt = (result["settings"][k]["activation_gb"] for k in ("plain", "checkpointed"))
    result["ratio_plain_over_checkpointed"] = round(plain / max(ckpt, 1e-9), 2)
    print(f"activation checkpointing of {', '.join(TOWERS)}: {result['ratio_plain_over_checkpointed']}x less "
          f"activation memory")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
