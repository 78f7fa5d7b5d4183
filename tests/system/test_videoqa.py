"""Video QA: fine-tuning a pre-trained export with `x2vlm finetune --task video_qa` (one process) on clips in the
MSRVTT-QA format raises the held-in accuracy over the starting model."""
import torch

from x2vlm.config import SourceConfig
from x2vlm.eval.run import clips, evaluate_checkpoint, make_tokenize
from x2vlm.eval.videoqa import evaluate_videoqa
from x2vlm.pretrained import build_model, load_weights


def test_finetune_video_qa_improves_accuracy(video_finetuning):
    v = video_finetuning
    cfg = v.config("ft_qa", SourceConfig(name="qa", kind="video_qa", shards=v.qa, batch_size=8, max_frames=4),
                   **{"model.qa_answers": v.answers, "train.steps": 60, "train.save_every": 60})
    v.finetune("video_qa", "ft_qa")
    after = evaluate_checkpoint(str(v.root / "ft_qa"), videoqa_shards=v.qa, max_frames=4)["video_qa"]
    assert after["n"] == sum(len(c["qa"]) for c in v.clips) and set(after["by_type"]) >= {"colour", "direction"}
    # before: the pre-trained weights with a fresh answer head, as the fine-tuning began
    torch.manual_seed(1)
    start = build_model(cfg, v.tokenizer)
    load_weights(start, v.root / "pre")
    before = evaluate_videoqa(start, clips(v.qa, max_frames=4, needs="qa"), make_tokenize(v.tokenizer, 40), 64)
    assert before["n"] == after["n"]
    assert after["acc"] > before["acc"] + 0.1 and after["acc"] > 2 / v.answers, (before, after)  # 2x uniform
