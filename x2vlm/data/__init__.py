"""Data: the ShapesWorld generator, WebDataset shards, box-aware transforms, tokenizers, MLM masking, loaders."""
