"""One byte-level BPE tokenizer per seed family: trained once, shared by every seed."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from atlas.errors import AtlasError

END_OF_TEXT = "<|endoftext|>"
BYTE_ALPHABET_SIZE = 256


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path | None
) -> PreTrainedTokenizerFast:
    """Train a GPT-2 style byte-level BPE on `texts` and save it with save_pretrained (unless out_dir is None).

    <|endoftext|> (id 0) is the bos, eos and pad token. The result depends only on the texts and
    their order: the `tokenizers` trainer counts pairs exactly and breaks ties deterministically.
    """
    minimum = BYTE_ALPHABET_SIZE + 1
    if vocab_size < minimum:
        raise AtlasError(
            f"vocab_size {vocab_size} is too small for byte-level BPE; use at least {minimum}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        # every byte is a token, so no text is ever unknown
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        model_max_length=1_000_000_000,  # rows are packed by us; silence length warnings
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
