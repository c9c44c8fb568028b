"""Offline tokenizers: a deterministic byte-level tokenizer for the tiny random presets and the tests.

No tokenizer can be downloaded on the development machines, so the synthetic world and the tests use a
byte-level BPE with no merges: every UTF-8 byte is one token, which makes tokenisation predictable by hand
(" yes" is exactly four ids) while keeping the ByteLevel conventions (space shown as "Ġ") of GPT-2/OPT.
Special tokens follow OPT: BOS = EOS = ``</s>``, pad = ``<pad>``, and ``add_special_tokens=True``
prepends BOS.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
# Special tokens take the first ids so that byte b always has id NUM_SPECIAL + b.
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
NUM_SPECIAL = len(SPECIAL_TOKENS)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, the alphabet the ByteLevel pre-tokenizer emits."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    shift = 0
    for b in range(256):
        if b not in printable:
            # Unprintable bytes (controls, space) are moved above 255 so every byte maps to a visible char.
            printable.append(b)
            chars.append(256 + shift)
            shift += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build the deterministic byte-level tokenizer (vocab 259: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, bytes).

    Survives ``save_pretrained`` / ``AutoTokenizer.from_pretrained``; "\\n" is a single token (id 13).
    """
    byte_map = _bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[byte_map[b]] = NUM_SPECIAL + b

    return _opt_conventions(Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK_TOKEN)))


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `texts` with the same conventions as `byte_tokenizer` (deterministic).

    Used for the synthetic world's tiny LM: a real learned vocabulary, built offline in a second.
    """
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _opt_conventions(tok)


def train_wordpiece_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A lower-cased WordPiece tokenizer with bert-base-uncased's conventions, trained on `texts` offline.

    [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4; `add_special_tokens=True` gives [CLS] text [SEP]. A
    stand-in for BERT's tokenizer (the Q-Former's text path) where none can be downloaded.
    """
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def _opt_conventions(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """ByteLevel pre-tokenizer and decoder, BOS = EOS = ``</s>`` prepended, ``<pad>``: OPT's conventions."""
    # add_prefix_space=False: like OPT, a text's first word carries no leading space token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # normalized=False keeps the special strings matched verbatim rather than after byte mapping.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    eos_id = tok.token_to_id(EOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS_TOKEN} $A",
        pair=f"{EOS_TOKEN} $A {EOS_TOKEN} $B",
        special_tokens=[(EOS_TOKEN, eos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
    )
