"""Data: the ShapesWorld generator (shapesworld), WebDataset shards (shards), box-aware transforms (transforms),
tokenizers (tokenizer), MLM masking (masking) and per-source loaders (pipeline)."""
