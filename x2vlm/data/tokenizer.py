"""Tokenizers: train a small BERT-style WordPiece tokenizer on a corpus, or load one from a folder / hub id."""
from __future__ import annotations

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts, out_dir: str, vocab_size: int = 1000):
    """A lower-casing WordPiece tokenizer trained on `texts`, saved with save_pretrained to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                             sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(name_or_dir: str):
    """A fast tokenizer from a local folder, or a hub id where a hub is reachable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_dir)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"model.text.tokenizer: cannot load {name_or_dir!r} (a local tokenizer folder "
                                f"or a reachable hub id is expected): {e}") from None
