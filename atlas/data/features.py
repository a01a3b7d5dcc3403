"""Token features: named booleans over a tokenizer's vocabulary, computed from the decoded token strings.

Each feature reads one view of the decoded string `raw` (tokenizer.decode([i])):
  raw       the string as decoded (newlines and spaces kept);
  body      raw without ONE leading space (" 12" -> "12", "  12" -> " 12");
  stripped  raw.strip() (every leading and trailing whitespace removed).
The catalogue's order is fixed (labels and probes refer to features by name, scores by column).
A feature may hold for no token of a given vocabulary: it is still listed, with n_tokens 0.
Tokenizers whose single-token decode drops the word-start marker (SentencePiece's "▁") show no
leading spaces; byte-level BPE (GPT-2, NeoX, Llama 3) keeps them.
"""

from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

VIEWS = ("raw", "body", "stripped")

NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million "
    "billion trillion".split())
FIRST_PERSON = frozenset("i me my mine myself we us our ours ourselves".split())
SECOND_PERSON = frozenset("you your yours yourself yourselves".split())
THIRD_PERSON = frozenset(
    "he him his himself she her hers herself it its itself they them their theirs themselves".split())
MONTHS = frozenset("January February March April May June July August September October November December".split())
WEEKDAYS = frozenset("Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split())
STOPWORDS = frozenset(
    "a an the and or but if then so of to in on at by for with from as into about than is are was were be been "
    "being am do does did has have had not no this that these those there which who what when where how".split())
OPEN_BRACKETS, CLOSE_BRACKETS = set("([{"), set(")]}")
QUOTES = set("'\"`\u2018\u2019\u201c\u201d\u00ab\u00bb")
DASHES = {"--", "---", "\u2013", "\u2014"}
MATH_SYMBOLS = set("+*/=<>^%|~&")
CODE_CHARS = set("_()=.")
ASCII_DIGITS = set(string.digits)


@dataclass(frozen=True)
class Feature:
    name: str          # snake_case, at most 50 characters (the store's column)
    description: str   # one line, shown in the UI
    view: str          # 'raw' | 'body' | 'stripped': which string the predicate reads
    predicate: Callable[[str], bool]


def _is_digits(s: str) -> bool:
    return bool(s) and all(c in ASCII_DIGITS for c in s)


def _is_punctuation(s: str) -> bool:
    """Non-empty and every character is a punctuation or symbol character (Unicode P* or S*)."""
    return bool(s) and all(unicodedata.category(c)[0] in "PS" for c in s)


def _punct_with(chars: set[str]) -> Callable[[str], bool]:
    return lambda s: _is_punctuation(s) and any(c in chars for c in s)


def _alpha_suffix(suffix: str) -> Callable[[str], bool]:
    return lambda s: s.isalpha() and len(s) > len(suffix) and s.lower().endswith(suffix)


FEATURES: tuple[Feature, ...] = (
    Feature("leading_space", "starts with a space (a word start in byte-level BPE)", "raw",
            lambda s: s.startswith(" ")),
    Feature("word_start", "a space then letters only (' the')", "raw", lambda s: s[:1] == " " and s[1:].isalpha()),
    Feature("continuation", "letters only, no leading space (the inside or end of a word)", "raw", str.isalpha),
    Feature("alphabetic", "letters only, ignoring one leading space", "body", str.isalpha),
    Feature("capitalized", "letters only, the first one upper case, ignoring one leading space", "body",
            lambda s: s.isalpha() and s[0].isupper()),
    Feature("all_caps", "at least two letters, all upper case, ignoring surrounding whitespace", "stripped",
            lambda s: s.isupper() and sum(c.isalpha() for c in s) >= 2),
    Feature("lowercase", "letters only, all lower case, ignoring one leading space", "body",
            lambda s: s.isalpha() and s.islower()),
    Feature("digits", "ASCII digits only, ignoring one leading space", "body", _is_digits),
    Feature("single_digit", "one ASCII digit, ignoring one leading space", "body",
            lambda s: len(s) == 1 and _is_digits(s)),
    Feature("year", "four digits from 1000 to 2099, ignoring one leading space", "body",
            lambda s: len(s) == 4 and _is_digits(s) and 1000 <= int(s) <= 2099),
    Feature("contains_digit", "contains an ASCII digit", "raw", lambda s: any(c in ASCII_DIGITS for c in s)),
    Feature("number_word", "a number word (one..twenty, thirty..ninety, hundred, thousand, million, ...), any case",
            "stripped", lambda s: s.lower() in NUMBER_WORDS),
    Feature("punctuation", "punctuation or symbol characters only, ignoring surrounding whitespace", "stripped",
            _is_punctuation),
    Feature("period", "punctuation only, with a '.'", "stripped", _punct_with({"."})),
    Feature("comma", "punctuation only, with a ','", "stripped", _punct_with({","})),
    Feature("colon", "punctuation only, with a ':'", "stripped", _punct_with({":"})),
    Feature("semicolon", "punctuation only, with a ';'", "stripped", _punct_with({";"})),
    Feature("question_mark", "punctuation only, with a '?'", "stripped", _punct_with({"?"})),
    Feature("exclamation_mark", "punctuation only, with a '!'", "stripped", _punct_with({"!"})),
    Feature("hyphen", "exactly '-', ignoring surrounding whitespace", "stripped", lambda s: s == "-"),
    Feature("dash", "a dash: '--', '---', en dash or em dash, ignoring surrounding whitespace", "stripped",
            lambda s: s in DASHES),
    Feature("ellipsis", "'...' or the ellipsis character, ignoring surrounding whitespace", "stripped",
            lambda s: s in {"...", "\u2026"}),
    Feature("open_bracket", "punctuation only, with an opening bracket ( [ {", "stripped", _punct_with(OPEN_BRACKETS)),
    Feature("close_bracket", "punctuation only, with a closing bracket ) ] }", "stripped", _punct_with(CLOSE_BRACKETS)),
    Feature("quote", "punctuation only, with a quote mark (' \" ` or a typographic quote)", "stripped",
            _punct_with(QUOTES)),
    Feature("math_symbol", "only the symbols + * / = < > ^ % | ~ &, ignoring surrounding whitespace", "stripped",
            lambda s: bool(s) and all(c in MATH_SYMBOLS for c in s)),
    Feature("newline", "contains a newline", "raw", lambda s: "\n" in s),
    Feature("whitespace_only", "whitespace only (spaces, tabs, newlines)", "raw", str.isspace),
    Feature("ends_with_ing", "letters only ending in 'ing' (longer than the suffix), ignoring one leading space",
            "body", _alpha_suffix("ing")),
    Feature("ends_with_ed", "letters only ending in 'ed' (longer than the suffix), ignoring one leading space",
            "body", _alpha_suffix("ed")),
    Feature("ends_with_s", "letters only ending in 's' (longer than the suffix), ignoring one leading space",
            "body", _alpha_suffix("s")),
    Feature("ends_with_ly", "letters only ending in 'ly' (longer than the suffix), ignoring one leading space",
            "body", _alpha_suffix("ly")),
    Feature("pronoun_first_person", "I, me, my, mine, myself, we, us, our, ours, ourselves (any case)", "stripped",
            lambda s: s.lower() in FIRST_PERSON),
    Feature("pronoun_second_person", "you, your, yours, yourself, yourselves (any case)", "stripped",
            lambda s: s.lower() in SECOND_PERSON),
    Feature("pronoun_third_person", "he, him, his, she, her, it, its, they, them, their and -self forms (any case)",
            "stripped", lambda s: s.lower() in THIRD_PERSON),
    Feature("month", "a month name, capitalized (January..December)", "stripped", lambda s: s in MONTHS),
    Feature("weekday", "a weekday name, capitalized (Monday..Sunday)", "stripped", lambda s: s in WEEKDAYS),
    Feature("stopword", f"one of a fixed list of {len(STOPWORDS)} English function words (the, of, is, ...), any case",
            "stripped", lambda s: s.lower() in STOPWORDS),
    Feature("code_like", "contains one of _ ( ) = . (SPEC's code-like characters)", "raw",
            lambda s: any(c in CODE_CHARS for c in s)),
    Feature("non_ascii", "contains a non-ASCII character (an incomplete UTF-8 byte decodes to U+FFFD)", "raw",
            lambda s: any(ord(c) > 127 for c in s)),
)


def _view(raw: str, view: str) -> str:
    if view == "raw":
        return raw
    if view == "body":
        return raw[1:] if raw.startswith(" ") else raw
    return raw.strip()


def feature_names() -> list[str]:
    return [f.name for f in FEATURES]


def feature_matrix(token_strings: Sequence[str],
                   features: Sequence[Feature] = FEATURES) -> tuple[list[str], list[str], np.ndarray]:
    """(names, descriptions, bool [len(token_strings), len(features)]) in the catalogue's order."""
    matrix = np.zeros((len(token_strings), len(features)), dtype=bool)
    for column, feature in enumerate(features):
        predicate, view = feature.predicate, feature.view
        matrix[:, column] = [bool(predicate(_view(s, view))) for s in token_strings]
    return [f.name for f in features], [f.description for f in features], matrix
