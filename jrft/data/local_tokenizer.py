"""Small tokenizers built locally from strings, for tests, the demo and tiny experiments (no hub access).

Two kinds, both returned as a transformers ``PreTrainedTokenizerFast`` so that ``save_pretrained`` /
``AutoTokenizer.from_pretrained`` round-trip:

* ``"char"`` — one token per character (a ``WordLevel`` vocabulary over an explicit alphabet or the characters
  found in ``texts``), unknown characters map to ``<unk>``. Decoding concatenates (no spaces added).
* ``"bpe"`` — byte-level BPE (GPT-2 style, Sennrich et al. 2016) trained on ``texts`` up to ``vocab_size``.

Special tokens come first in the vocabulary (``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3 by
default), then the chat role markers used by ``DEFAULT_CHAT_TEMPLATE``, then ``added_tokens`` (multi-character
strings kept as one token but *not* special, e.g. ``"<think>"``, so ``skip_special_tokens`` keeps them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)
CHAT_ROLE_TOKENS: tuple[str, ...] = ("<|system|>", "<|user|>", "<|assistant|>")

# One turn = role marker + content + eos; the generation prompt is the assistant marker. The role markers are
# single special tokens, so the template works for the char kind whatever the alphabet.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _char_tokenizer(chars: Sequence[str], specials: Sequence[str]) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (newlines included) is its own pre-token.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok


def _bpe_tokenizer(texts: Iterable[str], vocab_size: int, specials: Sequence[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return tok


def train_tokenizer(
    texts: Iterable[str] | None = None,
    *,
    kind: str = "char",
    vocab_size: int = 512,
    alphabet: str | Sequence[str] | None = None,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    added_tokens: Sequence[str] = (),
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    add_bos_token: bool = False,
    model_max_length: int = 4096,
) -> PreTrainedTokenizerFast:
    """Builds a small tokenizer from strings.

    Args:
      texts: training strings (``"bpe"``), or the alphabet source (``"char"`` when ``alphabet`` is None).
      kind: ``"char"`` or ``"bpe"``.
      vocab_size: target size for ``"bpe"`` (ignored by ``"char"``, whose size is specials + alphabet).
      alphabet: explicit characters for ``"char"``, in id order (after the special tokens).
      special_tokens: must contain ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; they take the first ids.
      added_tokens: multi-character strings kept whole but not special (e.g. ``"<think>"``).
      chat_template: Jinja chat template (``None`` for none). The default's role markers are added as
        special tokens.
      add_bos_token: prepend ``<bos>`` when encoding plain text (chat templates add it themselves).
      model_max_length: stored in tokenizer_config.json.

    Returns:
      A ``PreTrainedTokenizerFast`` with bos/eos/pad/unk set.

    Example:
      >>> tok = train_tokenizer(alphabet="0123456789+=", added_tokens=["<think>"])
      >>> tok("12+3=")["input_ids"]  # ids 0-6 are specials and chat role markers
      [8, 9, 17, 10, 18]
      >>> tok.decode(tok("12+3=<think>")["input_ids"])
      '12+3=<think>'
    """
    specials = list(dict.fromkeys(special_tokens))
    missing = [t for t in DEFAULT_SPECIAL_TOKENS if t not in specials]
    if missing:
        raise ValueError(f"train_tokenizer: special_tokens must include {missing}")
    if chat_template == DEFAULT_CHAT_TEMPLATE:
        specials += [t for t in CHAT_ROLE_TOKENS if t not in specials]
    texts = list(texts) if texts is not None else []
    if kind == "char":
        if alphabet is None:
            if not texts:
                raise ValueError("train_tokenizer(kind='char'): give texts or an alphabet")
            alphabet = sorted({ch for text in texts for ch in text})
        tok = _char_tokenizer(list(alphabet), specials)
    elif kind == "bpe":
        if not texts:
            raise ValueError("train_tokenizer(kind='bpe'): texts are required to train BPE merges")
        tok = _bpe_tokenizer(texts, vocab_size, specials)
    else:
        raise ValueError(f"train_tokenizer: unknown kind {kind!r}; expected 'char' or 'bpe'")
    tok.add_special_tokens(specials)
    if added_tokens:
        tok.add_tokens(list(added_tokens))
    if add_bos_token:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
        )
    kwargs = {"chat_template": chat_template} if chat_template is not None else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=model_max_length,
        **kwargs,
    )
