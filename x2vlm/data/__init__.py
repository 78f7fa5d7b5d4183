"""Data: shard files (shards), what a sample is in them (samples), box-aware transforms (transforms), tokenizers
(tokenizer), MLM masking (masking), per-source loaders and batches (pipeline), and converters from published
annotation formats to shards (formats)."""
