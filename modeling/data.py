"""Task data: built-in synthetic datasets and a task's splits from user files. Pure Python, no torch.

Every task is a frozen ``TaskData``: a kind, three splits of examples and, for
classification, the label names (the class id of a label is its index there).

=================  =================  =====================================================
kind               example            meaning
=================  =================  =====================================================
``text``           ``TextExample``    a document: one or more sentences (language modelling)
``classification`` ``LabeledExample`` a text and its label name
``seq2seq``        ``PairExample``    a source and its target
``chat``           ``ChatExample``    a conversation of ``Message(role, content)`` turns
=================  =================  =====================================================

The example types, the file formats, the field mapping and its detection live in the
torch-free ``onnxformer.runtime.datafiles`` (also read by ``onnxformer eval``); they are
importable from here as before.

A document is one string. Its sentences end with ``.``, ``!`` or ``?`` followed by
whitespace, or with a line break; ``TextExample.sentences`` splits it that way (next-sentence
prediction builds its pairs from these).

Seq2seq tasks also train decoder-only and prefix-LM models, as prompt -> continuation:
``format_prompt(source) + format_continuation(target)``, e.g.
``"three hundred forty two =" + " 3 4 2"``. The prompt ends with ``" ="`` and no trailing
space; the continuation starts with a space. Byte-level BPE starts a new pre-token at that
space, so the prompt's tokens are a prefix of the full sequence's tokens and generation
starts cleanly after the prompt. Training appends ``</s>`` to the continuation.

Built-in datasets (``load_builtin``, or ``builtin:NAME`` in ``load_task_data``) are generated
here from small grammars, seeded and identical in every process; nothing is downloaded:

- ``corpus`` (text): 4,000 short stories of 2-4 sentences (about 12,000 sentences) with
  consistent facts (what each animal eats, who holds the ball after it is given away,
  the sum after buying more), so causal-LM and MLM losses fall well below unigram entropy.
- ``sentiment`` (classification, ``negative``/``positive``): 6,000/500/500 unique
  sentences whose label needs context: ``not`` flips the polarity word it precedes,
  ``i did not think ...`` and ``i did not like ...`` flip, and with ``but``/``and`` the
  last clause decides (``but`` joins clauses of opposite polarity, so bag-of-words fails).
- ``numbers`` (seq2seq): English number words to digits, 0..9999, e.g. ``"two thousand
  forty"`` -> ``"2 0 4 0"``; 500 valid and 500 test numbers, disjoint from the training
  numbers, which repeat short numbers (0..99 eight times, 100..999 twice). Target digits are
  separated by spaces so that every tokenizer gives one token per digit; the answer is
  ``int(target.replace(" ", ""))``.
- ``chat`` (chat): 3,000/200/200 distinct conversations, an optional system message and one or
  two exchanges, each with one right reply: digit arithmetic (``what is 3 plus 4?`` -> ``7``),
  capitals from a fixed table of 15 (``capital of peru?`` -> ``lima``), echo a word (``say
  owl.`` -> ``owl``), reverse the order of 2-3 words (``reverse: red cup`` -> ``cup red``).

Files (``load_task_data``; the fixed-layout ``read_text_file``, ``read_jsonl``, ``read_tsv``):
CSV, TSV, JSONL, JSON arrays, Parquet and plain text, read by ``runtime.datafiles.read_examples``;
every problem raises ``DataError`` (``onnxformer.runtime.errors``, also importable from here)
naming ``path:line`` and the fix; bad arguments raise ``ConfigError``. Classification data that
looks wrong (labels like text, about one class per row) is logged as a warning with the fix.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

from onnxformer.runtime.datafiles import (  # the example types are re-exported from here
    EXAMPLE_CLASSES,
    KIND_ROLES,
    KINDS,
    ChatExample,
    DataFile,
    Example,
    FieldMap,
    LabeledExample,
    Message,
    PairExample,
    TextExample,
    data_error,
    read_examples,
)
from onnxformer.runtime.errors import ConfigError, DataError
from onnxformer.runtime.prompt_format import SEQ2SEQ_PROMPT_FORMAT

logger = logging.getLogger(__name__)

TASK_KINDS = KINDS  # text, classification, seq2seq, chat
_data_error = data_error

# kind -> (example class, its fields)
_KIND_FIELDS: dict[str, tuple[type, tuple[str, ...]]] = {
    kind: (EXAMPLE_CLASSES[kind], KIND_ROLES[kind]) for kind in KINDS
}


@dataclass(frozen=True)
class TaskData:
    """A task's splits. ``label_names[i]`` is class ``i`` (classification only)."""

    kind: str  # one of TASK_KINDS
    train: list  # or a StreamedSplit (stream_task_data): read from its file on each iteration
    valid: list
    test: list
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _KIND_FIELDS:
            raise ConfigError(
                f"kind must be one of {', '.join(map(repr, TASK_KINDS))}; got {self.kind!r}"
            )
        object.__setattr__(self, "label_names", tuple(self.label_names))
        cls = _KIND_FIELDS[self.kind][0]
        lists = [split for split in ("train", "valid", "test") if isinstance(getattr(self, split), list)]
        for split in lists:  # a StreamedSplit's reader checks its examples as it reads them
            for i, example in enumerate(getattr(self, split)):
                if not isinstance(example, cls):
                    raise DataError(
                        f"{split}[{i}] is a {type(example).__name__}; "
                        f"kind {self.kind!r} needs {cls.__name__}"
                    )
        if not self.train:
            raise DataError("train split is empty; a task needs training examples")
        if self.kind == "classification":
            if len(self.label_names) < 2:
                raise DataError(
                    f"classification needs at least 2 label names; got {self.label_names!r}"
                )
            if len(set(self.label_names)) != len(self.label_names):
                raise DataError(f"label_names has duplicates: {self.label_names!r}")
            known = set(self.label_names)
            for split in lists:
                for i, example in enumerate(getattr(self, split)):
                    if example.label not in known:
                        raise DataError(
                            f"{split}[{i}] has label {example.label!r}, "
                            f"not in label_names {self.label_names!r}"
                        )
        elif self.label_names:
            raise DataError(f"label_names apply to classification only; kind is {self.kind!r}")

    def label_id(self, label: str) -> int:
        return self.label_names.index(label)

    def texts(self, splits: Sequence[str] = ("train",)) -> Iterator[str]:
        """Every string in ``splits`` (source and target for seq2seq), e.g. to train a tokenizer."""
        for split in splits:
            for example in getattr(self, split):
                if isinstance(example, PairExample):
                    yield example.source
                    yield example.target
                elif isinstance(example, ChatExample):
                    yield from (message.content for message in example.messages)
                else:
                    yield example.text


# Prompt / continuation convention for seq2seq on decoder-only and prefix-LM models -------------
# One definition (runtime/prompt_format.py), which training writes into the checkpoint
# (ModelConfig.prompt_format), export into the package, and both runtimes apply to a user's
# prompt: what training scores is what generate("three hundred forty two") returns.
PROMPT_FORMAT = SEQ2SEQ_PROMPT_FORMAT
PROMPT_SUFFIX = PROMPT_FORMAT.format("")  # " ="


def format_prompt(source: str) -> str:
    """``"three hundred forty two"`` -> ``"three hundred forty two ="`` (no trailing space)."""
    return PROMPT_FORMAT.format(source)


def format_continuation(target: str) -> str:
    """``"3 4 2"`` -> ``" 3 4 2"``: the text a decoder generates after ``format_prompt``."""
    return " " + target.strip()


def parse_continuation(text: str) -> str:
    """Generated continuation text -> target (inverse of ``format_continuation``)."""
    return PROMPT_FORMAT.parse(text)


# Built-in: numbers ------------------------------------------------------------------------------
_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
NUMBERS_LIMIT = 10_000  # numbers 0 .. NUMBERS_LIMIT - 1


def number_to_words(n: int) -> str:
    """``342`` -> ``"three hundred forty two"`` (American style, no "and"), for 0 <= n < 10000."""
    if not 0 <= n < NUMBERS_LIMIT:
        raise ValueError(f"n must be in [0, {NUMBERS_LIMIT}); got {n}")
    if n == 0:
        return "zero"
    words = []
    thousands, rest = divmod(n, 1000)
    hundreds, rest = divmod(rest, 100)
    if thousands:
        words += [_ONES[thousands], "thousand"]
    if hundreds:
        words += [_ONES[hundreds], "hundred"]
    if rest >= 20:
        words.append(_TENS[rest // 10])
        if rest % 10:
            words.append(_ONES[rest % 10])
    elif rest:
        words.append(_ONES[rest])
    return " ".join(words)


def number_to_target(n: int) -> str:
    """``342`` -> ``"3 4 2"``: digits separated by single spaces."""
    return " ".join(str(n))


# Numbers by length: (low, high, held out per split, training repeats). Drawn uniformly, two
# digits would be 1% of the data and a model would never learn "seventeen"; short numbers are
# therefore repeated in training. Valid and test are disjoint from train by number.
_NUMBER_BANDS = ((0, 100, 5, 8), (100, 1000, 50, 2), (1000, NUMBERS_LIMIT, 445, 1))


def _numbers(seed: int) -> TaskData:
    rng = random.Random(seed)
    train, valid, test = [], [], []
    for low, high, held_out, repeats in _NUMBER_BANDS:
        band = list(range(low, high))
        rng.shuffle(band)
        valid += band[:held_out]
        test += band[held_out:2 * held_out]
        train += band[2 * held_out:] * repeats
    rng.shuffle(train)
    pair = lambda n: PairExample(number_to_words(n), number_to_target(n))  # noqa: E731
    return TaskData("seq2seq", train=[pair(n) for n in train], valid=[pair(n) for n in valid],
                    test=[pair(n) for n in test])


# Built-in: sentiment ----------------------------------------------------------------------------
POSITIVE_ADJECTIVES = (
    "good great excellent wonderful amazing fantastic superb lovely brilliant delightful "
    "pleasant charming enjoyable impressive fun"
).split()
NEGATIVE_ADJECTIVES = (
    "bad terrible awful boring dull poor horrible bland disappointing mediocre weak tedious "
    "annoying dreadful lousy"
).split()
_POSITIVE_VERBS = (("loved", "love"), ("liked", "like"), ("enjoyed", "enjoy"), ("adored", "adore"))
_NEGATIVE_VERBS = ("hated", "disliked", "loathed")
# Every polarity word of the sentiment grammar -> +1/-1; each sentence's clauses hold one each.
SENTIMENT_LEXICON: dict[str, int] = {
    **dict.fromkeys(POSITIVE_ADJECTIVES, 1),
    **dict.fromkeys(NEGATIVE_ADJECTIVES, -1),
    **dict.fromkeys([word for pair in _POSITIVE_VERBS for word in pair], 1),
    **dict.fromkeys(_NEGATIVE_VERBS, -1),
}
_TOPICS = (
    "food film movie service plot acting music hotel room staff book ending story show meal "
    "view game concert trip coffee pizza soundtrack script cast menu waiter album lecture party "
    "design"
).split()
_INTENSIFIERS = ("", "", "", "very ", "really ", "quite ", "truly ", "so ", "extremely ")
_OPENERS = ("",) * 6 + (
    "honestly ", "overall ", "to be fair ", "in my opinion ", "frankly ", "all in all ", "well ",
)  # fmt: skip
SENTIMENT_LABELS = ("negative", "positive")
SENTIMENT_SIZES = (6000, 500, 500)  # train, valid, test


def _clause(rng: random.Random, polarity: int, negated: bool) -> str:
    """A clause whose overall polarity is ``polarity`` (+1/-1), negated or not."""
    word_polarity = -polarity if negated else polarity
    word = rng.choice(POSITIVE_ADJECTIVES if word_polarity > 0 else NEGATIVE_ADJECTIVES)
    topic, very, be = rng.choice(_TOPICS), rng.choice(_INTENSIFIERS), rng.choice(("was", "is"))
    article = "an" if (very or word)[0] in "aeiou" else "a"
    if rng.random() < 0.8:
        return f"the {topic} {be}{' not' if negated else ''} {very}{word}"
    return f"it {be}{' not' if negated else ''} {article} {very}{word} {topic}"


def _sentiment_examples(rng: random.Random) -> list[tuple[str, int]]:
    """One draw of the sentiment grammar: a (text, polarity) list, twins where a form has one."""
    form = rng.random()
    polarity = rng.choice((-1, 1))
    opener = rng.choice(_OPENERS)
    if form < 0.3:  # twins: "the food was good" / "the food was not good"
        state = rng.getstate()
        plain = _clause(rng, polarity, negated=False)
        rng.setstate(state)  # same topic, word, intensifier: only "not" differs
        negated = _clause(rng, -polarity, negated=True)
        return [(opener + plain, polarity), (opener + negated, -polarity)]
    if form < 0.45:  # twins: "i thought X" / "i did not think X"
        clause = _clause(rng, polarity, negated=False)
        if " is " in clause:
            return [(f"i think {clause}", polarity), (f"i do not think {clause}", -polarity)]
        return [(f"i thought {clause}", polarity), (f"i did not think {clause}", -polarity)]
    if form < 0.6:  # verbs: "i loved the food" / "i did not love the food"; "i hated the food"
        topic = rng.choice(_TOPICS)
        if polarity > 0:
            past, base = rng.choice(_POSITIVE_VERBS)
            return [
                (f"{opener}i {rng.choice(('', 'really '))}{past} the {topic}", 1),
                (f"{opener}i did not {base} the {topic}", -1),
            ]
        verb = rng.choice(_NEGATIVE_VERBS)
        return [(f"{opener}i {rng.choice(('', 'really '))}{verb} the {topic}", -1)]
    if form < 0.85:  # "A but B": opposite polarities, B decides
        first = _clause(rng, -polarity, negated=rng.random() < 0.3)
        second = _clause(rng, polarity, negated=rng.random() < 0.3)
        return [(f"{opener}{first} but {second}", polarity)]
    # "A and B": same polarity
    first = _clause(rng, polarity, negated=rng.random() < 0.3)
    second = _clause(rng, polarity, negated=rng.random() < 0.3)
    return [(f"{opener}{first} and {second}", polarity)]


def _sentiment(seed: int) -> TaskData:
    rng = random.Random(seed)
    total = sum(SENTIMENT_SIZES)
    unique: dict[str, int] = {}  # insertion-ordered, so the result never depends on hashing
    while len(unique) < total:
        for text, polarity in _sentiment_examples(rng):
            unique.setdefault(text, polarity)
    items = list(unique.items())[:total]
    rng.shuffle(items)
    examples = [LabeledExample(text, SENTIMENT_LABELS[polarity > 0]) for text, polarity in items]
    n_train, n_valid, _ = SENTIMENT_SIZES
    return TaskData(
        "classification",
        train=examples[:n_train],
        valid=examples[n_train : n_train + n_valid],
        test=examples[n_train + n_valid :],
        label_names=SENTIMENT_LABELS,
    )


# Built-in: corpus -------------------------------------------------------------------------------
_PEOPLE = {  # name -> subject pronoun
    **dict.fromkeys("tom sam ben max leo jack paul omar ivan raj".split(), "he"),
    **dict.fromkeys("anna mia lily emma sara nina zoe lucy maya rosa".split(), "she"),
}
_NAMES = sorted(_PEOPLE)
_THINGS = {  # singular -> plural
    "apple": "apples", "ball": "balls", "book": "books", "cup": "cups", "hat": "hats",
    "kite": "kites", "pen": "pens", "box": "boxes", "key": "keys", "coin": "coins",
    "shoe": "shoes", "card": "cards", "bag": "bags", "toy": "toys", "egg": "eggs",
}  # fmt: skip
_THING_NAMES = sorted(_THINGS)
_ADJECTIVES = "red blue green yellow black white small big old new".split()
_ANIMALS = {  # animal -> (home, food, sound)
    "cat": ("house", "fish", "meow"), "dog": ("yard", "meat", "woof"),
    "cow": ("field", "grass", "moo"), "duck": ("pond", "bread", "quack"),
    "horse": ("stable", "hay", "neigh"), "sheep": ("meadow", "clover", "baa"),
    "pig": ("barn", "corn", "oink"), "frog": ("pond", "flies", "croak"),
    "owl": ("tree", "mice", "hoot"), "bee": ("hive", "nectar", "buzz"),
}  # fmt: skip
_ANIMAL_NAMES = sorted(_ANIMALS)
_PLACES = {  # place -> what people do there together
    "park": "play ball", "library": "read books", "beach": "swim in the sea",
    "market": "buy fruit", "kitchen": "cook soup", "school": "learn math",
    "garden": "plant flowers", "river": "catch fish", "forest": "look for birds",
    "cafe": "drink tea",
}  # fmt: skip
_PLACE_NAMES = sorted(_PLACES)
_WEATHER = {  # weather -> what to wear
    "sunny": "a hat", "rainy": "a raincoat", "cold": "a warm coat",
    "snowy": "a scarf and gloves", "windy": "a jacket", "hot": "a t-shirt",
}  # fmt: skip
_WEATHER_NAMES = sorted(_WEATHER)
_DAYS = "monday tuesday wednesday thursday friday saturday sunday".split()
CORPUS_DOCUMENTS = (3600, 200, 200)  # train, valid, test


def _count(n: int, thing: str) -> str:
    return f"{_ONES[n]} {thing if n == 1 else _THINGS[thing]}"


def _story(rng: random.Random) -> list[str]:
    """One short story (2-4 sentences) from one of six templates."""
    a, b = rng.sample(_NAMES, 2)
    pronoun = _PEOPLE[a]
    form = rng.randrange(6)
    if form == 0:  # a gift: the thing moves from a to b
        adj, thing = rng.choice(_ADJECTIVES), rng.choice(_THING_NAMES)
        story = [
            f"{a} has a {adj} {thing}.",
            f"{pronoun} gives the {thing} to {b}.",
            f"now {b} has the {adj} {thing}.",
        ]
        if rng.random() < 0.5:
            story.append(f"{b} says thank you to {a}.")
        return story
    if form == 1:  # counting: buy some more or lose some
        thing = rng.choice(_THING_NAMES)
        if rng.random() < 0.5:
            n = rng.randint(1, 9)
            m = rng.randint(1, 10 - n)
            change, after = f"{pronoun} buys {_ONES[m]} more.", n + m
        else:
            n = rng.randint(2, 10)
            m = rng.randint(1, n - 1)
            change, after = f"{pronoun} loses {_ONES[m]}.", n - m
        ending = f"now {pronoun} has {_count(after, thing)}."
        return [f"{a} has {_count(n, thing)}.", change, ending]
    if form == 2:  # facts about an animal, in any order
        animal = rng.choice(_ANIMAL_NAMES)
        home, food, sound = _ANIMALS[animal]
        facts = [
            f"the {animal} lives in the {home}.",
            f"the {animal} eats {food}.",
            f"the {animal} says {sound}.",
        ]
        rng.shuffle(facts)
        return [f"{a} sees a {rng.choice(_ADJECTIVES)} {animal}."] + facts[: rng.randint(1, 3)]
    if form == 3:  # a meeting: the place decides the activity
        place, day = rng.choice(_PLACE_NAMES), rng.choice(_DAYS)
        story = [
            f"on {day} {a} goes to the {place}.",
            f"{pronoun} meets {b} at the {place}.",
            f"they {_PLACES[place]} together.",
        ]
        if rng.random() < 0.5:
            story.append(f"then {a} goes home.")
        return story
    if form == 4:  # the weather decides the clothing
        weather, place = rng.choice(_WEATHER_NAMES), rng.choice(_PLACE_NAMES)
        story = [
            f"it is {weather} today.",
            f"{a} wears {_WEATHER[weather]}.",
            f"{pronoun} walks to the {place}.",
        ]
        return story[: rng.randint(2, 3)]
    # ages decide who is older
    x, y = rng.sample(range(2, 13), 2)
    older, younger = (a, b) if x > y else (b, a)
    story = [
        f"{a} is {_ONES[x]} years old.",
        f"{b} is {_ONES[y]} years old.",
        f"{older} is older than {younger}.",
    ]
    if rng.random() < 0.5:
        story.append(f"{younger} is younger than {older}.")
    return story


def _corpus(seed: int) -> TaskData:
    rng = random.Random(seed)
    total = sum(CORPUS_DOCUMENTS)
    unique: dict[str, None] = {}
    while len(unique) < total:
        unique.setdefault(" ".join(_story(rng)))
    documents = [TextExample(text) for text in unique]
    n_train, n_valid, _ = CORPUS_DOCUMENTS
    return TaskData(
        "text",
        train=documents[:n_train],
        valid=documents[n_train : n_train + n_valid],
        test=documents[n_train + n_valid :],
    )


# Built-in: chat --------------------------------------------------------------------------------
_CAPITALS = {
    "france": "paris", "germany": "berlin", "italy": "rome", "spain": "madrid", "japan": "tokyo",
    "egypt": "cairo", "kenya": "nairobi", "peru": "lima", "canada": "ottawa", "norway": "oslo",
    "greece": "athens", "china": "beijing", "russia": "moscow", "brazil": "brasilia", "chile": "santiago",
}  # fmt: skip
_CAPITAL_NAMES = sorted(_CAPITALS)
_CHAT_WORDS = sorted(set(_THING_NAMES) | set(_ANIMAL_NAMES) | set(_ADJECTIVES))
_CHAT_SYSTEMS = ("", "", "you are a helpful assistant.", "answer briefly.")
CHAT_SIZES = (3000, 200, 200)  # train, valid, test conversations


CHAT_INTENTS = ("arithmetic", "capital", "echo", "reverse")


def _chat_exchange(rng: random.Random, intent: int) -> tuple[str, str]:
    """One question and its one right answer, of intent CHAT_INTENTS[intent]."""
    if intent == 0:  # arithmetic on digits
        a, b = rng.randrange(10), rng.randrange(10)
        if rng.random() < 0.5:
            op, answer = "plus", a + b
        else:
            a, b = max(a, b), min(a, b)
            op, answer = "minus", a - b
        form = rng.choice(("what is {a} {op} {b}?", "compute {a} {op} {b}.", "{a} {op} {b} is?"))
        return form.format(a=a, op=op, b=b), str(answer)
    if intent == 1:  # capitals from a fixed table
        country = rng.choice(_CAPITAL_NAMES)
        form = rng.choice(("what is the capital of {c}?", "name the capital of {c}.", "capital of {c}?"))
        return form.format(c=country), _CAPITALS[country]
    if intent == 2:  # echo a word
        word = rng.choice(_CHAT_WORDS)
        return rng.choice(("say {w}.", "repeat the word {w}.", "echo {w}")).format(w=word), word
    words = rng.sample(_CHAT_WORDS, rng.randint(2, 3))  # reverse the order of words
    return f"reverse: {' '.join(words)}", " ".join(reversed(words))


def _chat_conversation(rng: random.Random, intent: int) -> ChatExample:
    """An optional system message, then one or two exchanges; the last (the answer scored) of `intent`."""
    system = rng.choice(_CHAT_SYSTEMS)
    messages = [Message("system", system)] if system else []
    intents = [rng.randrange(len(CHAT_INTENTS)), intent] if rng.random() < 1 / 3 else [intent]
    for each in intents:
        question, answer = _chat_exchange(rng, each)
        messages += [Message("user", question), Message("assistant", answer)]
    return ChatExample(tuple(messages))


def _chat(seed: int) -> TaskData:
    """Distinct conversations (valid and test never occur in train), the last exchange's intent
    taking turns, so each split holds every intent alike."""
    rng = random.Random(seed)
    seen: set[ChatExample] = set()
    splits = []
    for size in CHAT_SIZES:
        split: list[ChatExample] = []
        while len(split) < size:
            conversation = _chat_conversation(rng, len(split) % len(CHAT_INTENTS))
            if conversation not in seen:
                seen.add(conversation)
                split.append(conversation)
        splits.append(split)
    return TaskData("chat", *splits)


BUILTINS: dict[str, Callable[[int], TaskData]] = {
    "corpus": _corpus,
    "sentiment": _sentiment,
    "numbers": _numbers,
    "chat": _chat,
}


def load_builtin(name: str, seed: int = 0) -> TaskData:
    """A built-in dataset by name (``"numbers"`` or ``"builtin:numbers"``); same seed, same data."""
    key = name.removeprefix("builtin:")
    if key not in BUILTINS:
        valid = ", ".join(f"builtin:{n}" for n in BUILTINS)
        raise DataError(f"unknown built-in dataset {name!r}; choose one of {valid}")
    data = BUILTINS[key](seed)
    logger.info(
        "built-in %s (seed %d): %d/%d/%d examples",
        key, seed, len(data.train), len(data.valid), len(data.test),
    )  # fmt: skip
    return data


# Readers (runtime/datafiles.py reads every format; these keep the list-returning calls) ---------
_SPLITS = {"paragraphs": "blank-line-documents", "lines": "lines"}


def _kind_of_fields(fields: Sequence[str]) -> str:
    for kind, (_, kind_fields) in _KIND_FIELDS.items():
        if tuple(fields) == kind_fields:
            return kind
    choices = ", ".join(repr(f) for _, f in _KIND_FIELDS.values())
    raise ConfigError(f"fields must be one of {choices}; got {tuple(fields)!r}")


def _examples(data: DataFile, label_names: Sequence[str] | None = None) -> list[Example]:
    """Every example of ``data``; with ``label_names``, a label not among them is an error naming its line."""
    examples = []
    for line, example in data.numbered():
        if label_names is not None and data.kind == "classification" and example.label not in label_names:
            raise _data_error(
                f"unknown label {example.label!r}; known labels: {', '.join(label_names)} (every label must occur "
                "in the training data or the label list: add examples of it to the training file, or remove "
                "the line)", data.path, line)
        examples.append(example)
    return examples


def read_text_file(path: str | os.PathLike, *, split: str = "paragraphs") -> list[TextExample]:
    """Plain text -> documents.

    ``split="paragraphs"`` (default): documents are separated by blank lines; a document keeps
    its line breaks (so a line break also ends a sentence). ``split="lines"``: each non-blank
    line is a document. Leading and trailing whitespace of each line is removed.
    (``read_examples`` with ``text_layout=None`` detects the layout instead.)
    """
    if split not in _SPLITS:
        raise ConfigError(f"split must be 'paragraphs' or 'lines'; got {split!r}")
    return _examples(_text_file(path, _SPLITS[split]))


def _text_file(path: str | os.PathLike, layout: str) -> DataFile:
    """Any file read as plain text in ``layout`` (whatever its extension)."""
    return DataFile(Path(path), "txt", "text", FieldMap(text="text"), detected=False, text_layout=layout)


def _read_fixed(path, fields: Sequence[str], label_names, suffixes: tuple[str, ...]) -> list[Example]:
    kind = _kind_of_fields(fields)
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise _data_error(f"expected a {' or '.join(suffixes)} file; got {path.suffix or 'no extension'}", path)
    mapping = FieldMap(**{name: name for name in fields})
    return _examples(read_examples(path, kinds=(kind,), fields=mapping), label_names)


def read_jsonl(
    path: str | os.PathLike,
    fields: Sequence[str] = ("text", "label"),
    *,
    label_names: Sequence[str] | None = None,
) -> list[Example]:
    """JSON Lines: one object per line holding ``fields`` (other keys ignored); blank lines skipped.

    ``fields`` picks the example type: ``("text",)``, ``("text", "label")`` or
    ``("source", "target")``. Values must be non-empty strings; a label may also be an
    integer (read as its decimal string). With ``label_names``, any other label is an error.
    """
    return _read_fixed(path, fields, label_names, (".jsonl", ".json"))


def read_tsv(
    path: str | os.PathLike,
    fields: Sequence[str] = ("text", "label"),
    *,
    label_names: Sequence[str] | None = None,
) -> list[Example]:
    """Tab-separated values with a header row naming the columns (e.g. ``text<TAB>label``).

    The header must contain ``fields`` (other columns are ignored); fields hold no tabs and
    no quoting is applied. Blank lines are skipped.
    """
    return _read_fixed(path, fields, label_names, (".tsv",))


def read_label_names(path: str | os.PathLike) -> tuple[str, ...]:
    """One label per line; the line index is the class id."""
    names = []
    for line, example in _text_file(path, "lines").numbered():
        name = example.text
        if name in names:
            raise _data_error(f"duplicate label {name!r}; each label must appear once", path, line)
        names.append(name)
    return tuple(names)


def sorted_label_names(labels: Sequence[str]) -> tuple[str, ...]:
    """Distinct labels, sorted as numbers if all are integers ("2" < "10"), else as text."""
    distinct = set(labels)
    if all(re.fullmatch(r"-?\d+", label) for label in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


# Task loading -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SharedDataset:
    """A dataset in the shared data folder (file names relative to it)."""

    kind: str
    train: str
    valid: str | None = None
    test: str | None = None
    labels: str | None = None  # label list file; else labels sorted from the train file


SHARED_DATASETS: dict[str, SharedDataset] = {
    "sst2": SharedDataset("classification", "sst2_train.tsv", valid="sst2_dev.tsv"),
    "banking77": SharedDataset(
        "classification",
        "banking77_train.tsv",
        test="banking77_test.tsv",
        labels="banking77_labels.txt",
    ),
    "multi30k": SharedDataset(
        "seq2seq",
        "multi30k_en_de_train.jsonl",
        valid="multi30k_en_de_dev.jsonl",
        test="multi30k_en_de_test2016.jsonl",
    ),
    "tico19": SharedDataset("seq2seq", "tico19_en_fr_train.jsonl", "tico19_en_fr_dev.jsonl"),
    "tinyshakespeare": SharedDataset("text", "tinyshakespeare.txt"),
}
SHARED_DATA_ENV = "ONNXFORMER_SHARED_DATA"


def shared_data_dir() -> Path:
    """``$ONNXFORMER_SHARED_DATA`` if set, else ``shared/data`` beside the repository."""
    if os.environ.get(SHARED_DATA_ENV):
        return Path(os.environ[SHARED_DATA_ENV])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _open_split(path: Path, kinds, fields: FieldMap | None, text_layout: str | None) -> DataFile:
    """A split's file; the field names and the text layout apply where the format has them."""
    is_text = path.suffix.lower() == ".txt"
    return read_examples(path, kinds=kinds, fields=None if is_text else fields,
                         text_layout=text_layout if is_text else None)


def infer_kind(path: str | os.PathLike) -> str:
    """The task kind a file holds: plain text -> text; other formats by their field names."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        return "text"
    return read_examples(path).kind


def _split_off(examples: list, fraction: float, seed: int, data: DataFile) -> tuple[list, list]:
    """Deterministically hold out ``fraction`` of ``examples`` (at least one) as a valid split."""
    if len(examples) < 2:
        layout = (" (read as blank-line-documents; if each line is an example, pass --text-layout lines)"
                  if data.text_layout == "blank-line-documents" else "")
        raise _data_error(
            f"only {len(examples)} example{layout}; need at least 2 to hold out a validation split: add "
            "examples, or pass a validation file (--valid PATH)",
            data.path,
        )
    n_valid = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)  # files are often sorted by label: shuffle first
    held = set(order[:n_valid])
    train = [e for i, e in enumerate(examples) if i not in held]
    valid = [examples[i] for i in sorted(held)]
    return train, valid


# Sanity checks of classification data: warnings, since the data may be right after all
MANY_CLASSES_SHARE = 0.5  # more distinct labels than this share of the rows: probably not a label column
_TEXT_LIKE_WORDS = 4  # labels of this many words (median) look like text


def _median(values: Sequence[int]) -> int:
    return sorted(values)[len(values) // 2]


def _check_labels(examples: Sequence[LabeledExample], data: DataFile) -> None:
    labels = {e.label for e in examples}
    label_words = _median([len(label.split()) for label in labels])
    text_words = _median([len(e.text.split()) for e in examples])
    mapping = data.mapping
    if label_words >= _TEXT_LIKE_WORDS and text_words < label_words:
        swapped = FieldMap(text=mapping.label, label=mapping.text)
        logger.warning(
            "%s: the labels look like text (%d distinct, median %d words, e.g. %r) and the texts like labels "
            "(median %d words): are the text and label fields swapped? If so, pass %s",
            data.path, len(labels), label_words, min(labels, key=len)[:60], text_words, swapped.flags())
    elif len(examples) >= 20 and len(labels) > MANY_CLASSES_SHARE * len(examples):
        logger.warning(
            "%s: %d distinct labels in %d training rows (more than %d%%): most classes occur once or twice, too "
            "few to learn; check that field %r holds the class, or name the class field with --label-field NAME",
            data.path, len(labels), len(examples), round(100 * MANY_CLASSES_SHARE), mapping.label)


def load_task_data(
    spec: str | os.PathLike,
    kind: str | None = None,
    *,
    kinds: Sequence[str] | None = None,
    fields: FieldMap | None = None,
    text_layout: str | None = None,
    valid: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    label_names: Sequence[str] | None = None,
    valid_fraction: float = 0.05,
    seed: int = 0,
) -> TaskData:
    """Load a task from ``builtin:NAME``, ``shared:NAME`` or a training file path.

    A file is read by ``runtime.datafiles.read_examples``: its format from the extension, its
    kind and fields detected (``kinds``: the kinds the caller can use, most wanted first, e.g. a
    task's; ``kind``: exactly one) or named by ``fields``; a .txt file's layout detected or given
    as ``text_layout``. ``valid`` and ``test`` are optional files of the same kind; without
    ``valid``, a seeded random ``valid_fraction`` of the training file is held out; without
    ``test``, test is empty. Label names come from ``label_names``, else from the training labels
    (sorted); a valid/test label not among them is an error naming its line. Classification data
    that looks wrong (labels like text, nearly one class per row) is logged as a warning.
    """
    if kind is not None:
        if kinds is not None:
            raise ConfigError("pass kind or kinds, not both")
        kinds = (kind,)
    kinds = None if kinds is None else tuple(kinds)
    for name in kinds or ():
        if name not in _KIND_FIELDS:
            raise ConfigError(f"kind must be one of {', '.join(map(repr, TASK_KINDS))} or None; got {name!r}")
    if not 0.0 < valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in (0, 1); got {valid_fraction!r}")
    spec_text = str(spec)
    if spec_text.startswith(("builtin:", "shared:")) and (fields is not None and fields.roles or text_layout):
        raise ConfigError(f"{spec_text} has fixed fields and layout; drop the field names and the text layout "
                          "(--text-field, --label-field, --source-field, --target-field, --messages-field, "
                          "--text-layout)")
    if spec_text.startswith("builtin:"):
        if valid is not None or test is not None or label_names is not None:
            raise ConfigError(
                f"{spec_text} has fixed splits and labels; drop valid, test and label_names"
            )
        data = load_builtin(spec_text, seed=seed)
        if kinds is not None and data.kind not in kinds:
            raise DataError(f"{spec_text} is a {data.kind} task, not {' or '.join(kinds)}")
        return data

    if spec_text.startswith("shared:"):
        name = spec_text.removeprefix("shared:")
        if name not in SHARED_DATASETS:
            choices = ", ".join(f"shared:{n}" for n in SHARED_DATASETS)
            raise DataError(f"unknown shared dataset {spec_text!r}; choose one of {choices}")
        root = shared_data_dir()
        if not root.is_dir():
            raise _data_error(
                f"{spec_text} needs the shared data folder, which is missing; "
                f"set {SHARED_DATA_ENV} to the folder holding the shared data files",
                root,
            )
        shared = SHARED_DATASETS[name]
        if kinds is not None and shared.kind not in kinds:
            raise DataError(f"{spec_text} is a {shared.kind} task, not {' or '.join(kinds)}")
        kinds = (shared.kind,)
        train_path = root / shared.train
        if valid is None and shared.valid:
            valid = root / shared.valid
        if test is None and shared.test:
            test = root / shared.test
        if label_names is None and shared.labels:
            label_names = read_label_names(root / shared.labels)
    else:
        train_path = Path(spec)

    train_file = _open_split(train_path, kinds, fields, text_layout)
    kind = train_file.kind
    train = _examples(train_file, label_names)
    if kind == "classification":
        _check_labels(train, train_file)
        if not label_names:
            label_names = sorted_label_names([e.label for e in train])
        label_names = tuple(label_names)
    else:
        if label_names:
            raise ConfigError(f"label_names apply to classification only; kind is {kind!r}")
        label_names = ()
    if valid is None:
        train, valid_examples = _split_off(train, valid_fraction, seed, train_file)
    else:
        valid_examples = _examples(_open_split(Path(valid), (kind,), fields, text_layout), label_names or None)
    test_examples = [] if test is None else _examples(_open_split(Path(test), (kind,), fields, text_layout),
                                                      label_names or None)
    data = TaskData(kind, train, valid_examples, test_examples, label_names)
    logger.info(
        "loaded %s (%s): %d/%d/%d examples%s",
        spec_text, kind, len(data.train), len(data.valid), len(data.test),
        f", {len(label_names)} labels" if label_names else "",
    )  # fmt: skip
    return data


# Streaming: files too large to hold in memory ---------------------------------------------------
STREAM_BYTES = 64 << 20  # a training file of at least this many bytes is streamed (stream_task_data)
_LABEL_SAMPLE = 10_000  # classification sanity checks look at this many training examples


def _position_hash(seed: int, position: int) -> float:
    """A uniform number in [0, 1) from (seed, position): splitmix64, cheap enough for every row."""
    z = (seed * 0x9E3779B97F4A7C15 + (position + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) / 2.0**64


@dataclass(frozen=True)
class StreamedSplit:
    """A split read from its file on each iteration, never held in memory: every example of
    the file, or (``part``) those a seeded hash of their position holds out (``"valid"``: a
    ``fraction`` of them) or leaves (``"train"``). With ``label_names``, an unknown label is an
    error naming its line."""

    file: DataFile
    part: str = "all"  # all | train | valid
    fraction: float = 0.0
    seed: int = 0
    label_names: tuple[str, ...] | None = None

    def __iter__(self) -> Iterator[Example]:
        known = None if self.label_names is None else set(self.label_names)
        for position, (line, example) in enumerate(self.file.numbered()):
            if self.part != "all" and (_position_hash(self.seed, position) < self.fraction) != (self.part == "valid"):
                continue
            if known is not None and example.label not in known:
                raise _data_error(
                    f"unknown label {example.label!r}; known labels: {', '.join(self.label_names)} (every label "
                    "must occur in the training data or the label list: add examples of it to the training file, "
                    "or remove the line)", self.file.path, line)
            yield example

    def __bool__(self) -> bool:  # a data file holds at least one example (DataFile checks)
        return True


def stream_task_data(
    path: str | os.PathLike,
    *,
    kinds: Sequence[str] | None = None,
    fields: FieldMap | None = None,
    text_layout: str | None = None,
    valid: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    label_names: Sequence[str] | None = None,
    valid_fraction: float = 0.05,
    seed: int = 0,
) -> TaskData:
    """``load_task_data`` for a training file too large to hold in memory: the same readers
    and arguments, but each split is a ``StreamedSplit`` that reads its file when iterated.
    Without ``valid``, each example is held out with probability ``valid_fraction`` by a seeded
    hash of its position (not the exact share of a shuffle, which needs every example at once).
    Classification labels come from one pass over the training file."""
    if not 0.0 < valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in (0, 1); got {valid_fraction!r}")
    train_file = _open_split(Path(path), None if kinds is None else tuple(kinds), fields, text_layout)
    kind = train_file.kind
    if kind == "classification":
        sample, labels = [], set()
        for example in train_file:
            labels.add(example.label)
            if len(sample) < _LABEL_SAMPLE:
                sample.append(example)
        _check_labels(sample, train_file)
        label_names = tuple(label_names) if label_names else sorted_label_names(labels)
    elif label_names:
        raise ConfigError(f"label_names apply to classification only; kind is {kind!r}")
    names = tuple(label_names) if kind == "classification" else None
    if valid is None:
        train = StreamedSplit(train_file, "train", valid_fraction, seed)
        valid_split = StreamedSplit(train_file, "valid", valid_fraction, seed)
    else:
        train = StreamedSplit(train_file)
        valid_split = StreamedSplit(_open_split(Path(valid), (kind,), fields, text_layout), label_names=names)
    test_split = [] if test is None else StreamedSplit(_open_split(Path(test), (kind,), fields, text_layout),
                                                       label_names=names)
    data = TaskData(kind, train, valid_split, test_split, names or ())
    held = f"{valid_fraction:.0%} held out for validation" if valid is None else f"validation: {valid}"
    logger.info("streaming %s (%s, %.0f MB; %s): examples are counted as they are tokenized", path, kind,
                Path(path).stat().st_size / 1e6, held)
    return data
