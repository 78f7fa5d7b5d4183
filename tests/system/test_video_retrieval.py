"""Video retrieval: fine-tuning a pre-trained export with `x2vlm finetune --task video_retrieval` (one process) on
clips in the MSRVTT format brings each caption's clip up the ranking of the held-in pool."""
from x2vlm.config import SourceConfig
from x2vlm.eval.run import evaluate_checkpoint


def test_finetune_video_retrieval_improves_ranks(video_finetuning):
    v = video_finetuning
    v.config("ft_retrieval", SourceConfig(name="msrvtt", kind="video", shards=v.retrieval, batch_size=8, max_frames=4),
             **{"train.steps": 60, "train.save_every": 60})
    v.finetune("video_retrieval", "ft_retrieval")
    before, after = (evaluate_checkpoint(str(v.root / name), video_shards=v.retrieval, max_frames=4,
                                         probe_direction=False)["video_retrieval"] for name in ("pre", "ft_retrieval"))
    assert after["pool_size"] == before["pool_size"] == len(v.clips)
    # mean rank of the true clip among 16 (about 8.5 by chance) falls clearly, both ways
    assert after["t2v_mean_rank"] < 0.6 * before["t2v_mean_rank"], (before, after)
    assert after["v2t_mean_rank"] < 0.6 * before["v2t_mean_rank"], (before, after)
