"""Tokenizers: train, save, load. Only the `tokenizers` library; no torch.

Two families, chosen by architecture:

- ``arch="encoder"``: WordPiece (BERT style). NFKC + BERT normalisation (accents kept;
  full-width and compatibility forms folded, so ``ＧＯＯＤ`` reads as ``GOOD``), lowercasing
  when the tokenizer is uncased, BERT pre-tokenizer (split on whitespace and punctuation, CJK
  characters one by one), ``##`` continuation prefix. ``lowercase=None`` (the default)
  decides from the data: uncased when no training text changes under lowercasing (a model
  trained on lowercase text then reads ``THE FOOD`` as ``the food`` instead of ``[UNK] [UNK]``),
  cased otherwise; pass ``lowercase=True`` or ``False`` to choose. The learned alphabet is
  every character of the training texts, most frequent first, up to half the vocabulary
  budget. WordPiece has no byte fallback in ``tokenizers``; instead the pre-tokenizer makes
  each run of characters without a token (never seen in training, such as an emoji or another
  script, or too rare for the budget) a word of its own, so ``good😀`` is ``good [UNK]``
  rather than one ``[UNK]`` for the whole word, and training counts such words the same way.
  The runtime reports the share of ``[UNK]`` tokens with every result (``unknown_fraction``). The vocabulary is learned here rather than by
  ``tokenizers``' WordPiece trainer, whose ties break in hash order and so differ from
  process to process. Tokenizers trained before NFKC, lowercasing and the unknown-run split
  came in (NFC, cased, whole words ``[UNK]``) keep their ``tokenizer.json`` exactly: a loaded
  tokenizer is never changed.
- ``arch in ("decoder", "prefix-lm", "encoder-decoder")``: byte-level BPE (GPT-2 style).
  No normaliser and all 256 byte symbols in the vocabulary, so every string is encodable
  and ``decode(encode(text).ids)`` returns ``text`` exactly (``<unk>`` exists but is
  never produced). A normaliser would break that round trip: generated text must come back
  as written, so case and width are the model's to learn.

The contract with the runtime is ``tokenizer.encode(text)`` (``add_special_tokens=True``)
to build model inputs and ``tokenizer.decode(ids, skip_special_tokens=True)`` for output.
The post-processor therefore fixes where special tokens go:

============================  ==================================  ==============================
family / arch                 single ``encode(a)``                pair ``encode(a, b)``
============================  ==================================  ==============================
WordPiece / encoder           ``[CLS] a [SEP]``                   ``[CLS] a [SEP] b [SEP]``
BPE / decoder, prefix-lm      ``<s> a``                           ``<s> a b``
BPE / encoder-decoder         ``a </s>``                          ``a </s> b </s>``
============================  ==================================  ==============================

In pairs the second segment, and the special token that closes it, has token type id 1;
everything else has type id 0 (BERT segment ids; for a prefix-LM, type 0 is the prefix).
A decoder prompt starts with ``<s>`` and carries no ``</s>``: generation continues it and
stops at ``</s>``. An encoder-decoder source ends with ``</s>``; encoding a target the same
way gives the decoder labels, ending with ``</s>``.

Special token ids (``special_token_ids``): the first special token listed has id 0 and is
padding. WordPiece: ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``, no bos/eos (-1): ``[SEP]``
closes a segment but is not an end-of-generation marker. BPE: ``<pad>=0 <s>=1 </s>=2
<unk>=3 <mask>=4``, no cls/sep (-1).

Special tokens written literally in input text (``"the film was [MASK]"``) are recognised
as those tokens; that is how fill-mask prompts are written. Training never pads or truncates
here: callers pad (with the ``pad`` id) and truncate themselves.
"""

from __future__ import annotations

import heapq
import logging
import os
from pathlib import Path
from collections import Counter
from typing import Iterable, Iterator

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from onnxformer.runtime import atomic
from onnxformer.runtime.errors import CheckpointError, ConfigError, DataError
from onnxformer.runtime.manifest import TOKENIZER_FILE  # checkpoints and packages name it alike

logger = logging.getLogger(__name__)

WORDPIECE_PREFIX = "##"

WORDPIECE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BPE_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<mask>")
WORDPIECE_ARCHS = ("encoder",)
BPE_ARCHS = ("decoder", "prefix-lm", "encoder-decoder")

# Role -> token strings that fill it, in lookup order. A role no token fills is -1.
SPECIAL_TOKEN_ROLES: dict[str, tuple[str, ...]] = {
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
    "bos": ("<s>",),
    "eos": ("</s>",),
    "mask": ("[MASK]", "<mask>"),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
}


def train_tokenizer(
    texts: Iterable[str], *, arch: str, vocab_size: int, min_frequency: int = 1,
    lowercase: bool | None = None, extra_special_tokens: tuple[str, ...] = (),
) -> Tokenizer:
    """Train the tokenizer family that ``arch`` uses on ``texts``.

    The vocabulary holds at most ``vocab_size`` tokens, fewer when the texts run out of
    pairs to merge; size the model with ``tokenizer.get_vocab_size()``. Training is
    deterministic: the same texts give the same ``tokenizer.json``, in any process.
    ``lowercase`` (WordPiece only): True uncased, False cased, None decided from the texts
    (uncased when none has an upper-case letter); byte-level BPE never normalises.
    ``extra_special_tokens`` (byte-level BPE only): more special tokens, after the family's own
    (ids 5, 6, ...), each kept whole in any text; chat fine-tuning adds its turn markers
    (modeling/chat_sft.py).
    """
    if arch not in WORDPIECE_ARCHS + BPE_ARCHS:
        raise ConfigError(
            f"arch must be one of {', '.join(map(repr, WORDPIECE_ARCHS + BPE_ARCHS))}; got {arch!r}"
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ConfigError(f"min_frequency must be an integer >= 1; got {min_frequency!r}")
    if lowercase not in (None, True, False):
        raise ConfigError(f"lowercase must be True, False or None (decide from the texts); got {lowercase!r}")
    if lowercase is not None and arch in BPE_ARCHS:
        raise ConfigError(
            f"lowercase applies to WordPiece (arch 'encoder'); byte-level BPE for arch {arch!r} never "
            "normalises (decode must give back the text as written): leave lowercase unset"
        )
    extra = tuple(extra_special_tokens)
    if extra and arch in WORDPIECE_ARCHS:
        raise ConfigError(f"extra_special_tokens apply to byte-level BPE (a decoder's tokenizer); arch {arch!r} "
                          f"trains WordPiece: drop {list(extra)}")
    taken = [t for t in extra if not isinstance(t, str) or not t or t in BPE_SPECIAL_TOKENS or extra.count(t) > 1]
    if taken:
        raise ConfigError(f"extra_special_tokens must be distinct non-empty strings other than {BPE_SPECIAL_TOKENS}; "
                          f"got {taken!r}")
    texts = _CountedTexts(texts)
    if arch in WORDPIECE_ARCHS:
        tokenizer = _train_wordpiece(texts, vocab_size, min_frequency, lowercase)
    else:
        tokenizer = _train_byte_level_bpe(texts, vocab_size, min_frequency, extra)
    _add_post_processor(tokenizer, arch)
    logger.info(
        "trained %s tokenizer on %d texts: %d tokens", arch, texts.count, tokenizer.get_vocab_size()
    )
    return tokenizer


class _CountedTexts:
    """Iterate ``texts`` once, checking item types and counting them."""

    def __init__(self, texts: Iterable[str]) -> None:
        self.texts, self.count = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must yield str; item {self.count} is {type(text).__name__}")
            self.count += 1
            yield text
        if self.count == 0:
            raise DataError("cannot train a tokenizer on no texts; texts was empty: pass at least one text")


def _train_byte_level_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int,
                          extra: tuple[str, ...] = ()) -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = BPE_SPECIAL_TOKENS + extra
    minimum = len(alphabet) + len(specials)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ConfigError(
            f"vocab_size must be an integer >= {minimum} for byte-level BPE ({len(alphabet)} "
            f"byte symbols + {len(specials)} special tokens); got {vocab_size!r}"
        )
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(specials),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    # Deterministic: the alphabet is sorted and merge ties break on symbol ids.
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _wordpiece_normalizer(lowercase: bool) -> normalizers.Normalizer:
    return normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.BertNormalizer(
                clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=lowercase
            ),
        ]
    )


def _train_wordpiece(
    texts: Iterable[str], vocab_size: int, min_frequency: int, lowercase: bool | None
) -> Tokenizer:
    n_special = len(WORDPIECE_SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size <= n_special:
        raise ConfigError(
            f"vocab_size must be an integer > {n_special} (the special tokens) for WordPiece; "
            f"got {vocab_size!r}"
        )
    # One pass: words counted as normalised with the case kept (and lowercased when asked);
    # with lowercase=None the texts decide, and when none changes under lowercasing the cased
    # counts are already the uncased ones.
    normalizer, uncased = _wordpiece_normalizer(bool(lowercase)), _wordpiece_normalizer(True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    word_counts: Counter[str] = Counter()
    cased = False
    for text in texts:
        normalized = normalizer.normalize_str(text)
        cased = cased or (lowercase is None and uncased.normalize_str(text) != normalized)
        words = pre_tokenizer.pre_tokenize_str(normalized)
        word_counts.update(word for word, _ in words)
    if lowercase is None:
        lowercase = not cased
        normalizer = _wordpiece_normalizer(lowercase)
        logger.info("WordPiece tokenizer is %s (decided from the texts)", "uncased" if lowercase else "cased")
    vocab = list(WORDPIECE_SPECIAL_TOKENS) + _learn_wordpiece_vocab(
        word_counts, vocab_size - n_special, min_frequency
    )
    tokenizer = Tokenizer(
        models.WordPiece(
            {token: i for i, token in enumerate(vocab)},
            unk_token="[UNK]",
            continuing_subword_prefix=WORDPIECE_PREFIX,
        )
    )
    tokenizer.normalizer = normalizer
    isolate = _isolate_unknown(vocab[n_special:])
    tokenizer.pre_tokenizer = pre_tokenizer if isolate is None else pre_tokenizers.Sequence([pre_tokenizer, isolate])
    tokenizer.decoder = decoders.WordPiece(prefix=WORDPIECE_PREFIX)
    tokenizer.add_special_tokens(list(WORDPIECE_SPECIAL_TOKENS))
    return tokenizer


def _runs(word: str, alphabet: set[str]) -> Iterator[str]:
    """The maximal runs of `word` made of characters in `alphabet`."""
    start = None
    for i, char in enumerate(word):
        if char in alphabet and start is None:
            start = i
        elif char not in alphabet and start is not None:
            yield word[start:i]
            start = None
    if start is not None:
        yield word[start:]


def _isolate_unknown(vocab: list[str]) -> pre_tokenizers.PreTokenizer | None:
    """A pre-tokenizer that makes each run of characters the vocabulary has no token for a
    word of its own: ``good😀`` is ``good [UNK]``, not one ``[UNK]`` for the whole word
    (WordPiece has no byte fallback). None when the vocabulary has no character tokens."""
    chars = sorted({t for t in vocab if len(t) == 1} | {
        t[len(WORDPIECE_PREFIX):] for t in vocab if t.startswith(WORDPIECE_PREFIX) and len(t) == len(WORDPIECE_PREFIX) + 1
    })
    if not chars:
        return None
    members = "".join(c if c.isalnum() and c.isascii() else "\\" + c if c.isascii() else c for c in chars)
    return pre_tokenizers.Split(Regex(f"[^{members}]+"), behavior="isolated")


def _learn_wordpiece_vocab(word_counts: Counter[str], budget: int, min_frequency: int) -> list[str]:
    """BPE merges over words with a ``##`` continuation prefix, as ``tokenizers``' WordPiece
    trainer does, but with ties broken by symbol text instead of hash order, so the result
    is the same in every process. Returns at most ``budget`` tokens.

    Each kept character costs two tokens (``c`` and ``##c``), so the alphabet takes at most
    half the budget, most frequent characters first; words with a dropped character are left
    out (they encode as ``[UNK]``).
    """
    char_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for char in word:
            char_counts[char] += count
    by_frequency = sorted(char_counts, key=lambda c: (-char_counts[c], c))
    alphabet = set(by_frequency[: max(1, budget // 2)])

    # A word with a dropped character counts as its runs of kept characters: the encoder's
    # pre-tokenizer splits it the same way (`_isolate_unknown`), so only the dropped run is [UNK].
    pieces: Counter[str] = Counter()
    for word, count in word_counts.items():
        for piece in _runs(word, alphabet):
            pieces[piece] += count
    words: list[list[str]] = []
    counts: list[int] = []
    for word in sorted(pieces):
        words.append([word[0]] + [WORDPIECE_PREFIX + c for c in word[1:]])
        counts.append(pieces[word])
    vocab = sorted({symbol for symbols in words for symbol in symbols})
    known = set(vocab)

    # Pair statistics, updated incrementally; a heap of (-count, left, right) with stale
    # entries skipped on pop. Equal counts pop in text order: deterministic.
    pair_counts: Counter[tuple[str, str]] = Counter()
    pair_words: dict[tuple[str, str], set[int]] = {}
    for i, symbols in enumerate(words):
        for pair in zip(symbols, symbols[1:]):
            pair_counts[pair] += counts[i]
            pair_words.setdefault(pair, set()).add(i)
    heap = [(-count, left, right) for (left, right), count in pair_counts.items()]
    heapq.heapify(heap)

    while len(vocab) < budget and heap:
        neg_count, left, right = heapq.heappop(heap)
        if pair_counts.get((left, right), 0) != -neg_count:
            continue  # stale entry
        if -neg_count < min_frequency:
            break
        merged = left + right[len(WORDPIECE_PREFIX) :]
        if merged not in known:  # different pairs can spell the same token
            known.add(merged)
            vocab.append(merged)
        touched: set[tuple[str, str]] = set()
        for i in sorted(pair_words.pop((left, right), ())):
            symbols, count = words[i], counts[i]
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] -= count
                touched.add(pair)
            j, out = 0, []
            while j < len(symbols):
                if j + 1 < len(symbols) and symbols[j] == left and symbols[j + 1] == right:
                    out.append(merged)
                    j += 2
                else:
                    out.append(symbols[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] += count
                pair_words.setdefault(pair, set()).add(i)
                touched.add(pair)
        for pair in sorted(touched):
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], *pair))
            else:
                del pair_counts[pair]
    return vocab


def _add_post_processor(tokenizer: Tokenizer, arch: str) -> None:
    """Install the template from the module docstring; it is the runtime's contract."""
    if arch in WORDPIECE_ARCHS:
        single, pair, names = "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1", ("[CLS]", "[SEP]")
    elif arch == "encoder-decoder":
        single, pair, names = "$A </s>", "$A </s> $B:1 </s>:1", ("</s>",)
    else:  # decoder, prefix-lm
        single, pair, names = "<s> $A", "<s> $A $B:1", ("<s>",)
    special = [(name, _require_id(tokenizer, name)) for name in names]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=special
    )


def _require_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"tokenizer has no {token!r} token")
    return token_id


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of the roles pad, unk, bos, eos, mask, cls, sep; -1 for a role the tokenizer lacks."""
    ids: dict[str, int] = {}
    for role, candidates in SPECIAL_TOKEN_ROLES.items():
        ids[role] = -1
        for token in candidates:
            token_id = tokenizer.token_to_id(token)
            if token_id is not None:
                ids[role] = token_id
                break
    return ids


def _tokenizer_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> Path:
    """Write ``tokenizer.json`` atomically (temp file + rename); ``path`` is the file or its folder.

    Returns the path written. A reader never sees a half-written file.
    """
    path = _tokenizer_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.replace_text(path, tokenizer.to_str(pretty=True))  # the one atomic write (fsync, rename)
    logger.info("saved tokenizer to %s", path)
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a ``tokenizer.json`` (``path`` is the file or its folder)."""
    path = _tokenizer_path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no tokenizer file at {path}; train one with train_tokenizer() and save_tokenizer()",
            code="E_TOKENIZER",
        )
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}", code="E_TOKENIZER") from None
    try:
        return Tokenizer.from_str(text)
    except Exception as exc:  # tokenizers raises a bare Exception for parse errors
        raise CheckpointError(
            f"{path} is not a valid tokenizer.json ({exc}); re-create it with save_tokenizer()",
            code="E_TOKENIZER",
        ) from exc
