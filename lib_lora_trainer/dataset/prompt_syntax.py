"""A1111's prompt syntax in captions: what it is, how a caption reads with and without it.

A1111 reads ``(tag)`` as weight x1.1, ``[tag]`` as /1.1, ``(tag:1.3)`` as 1.3, ``BREAK`` as the start of
a new 75-token chunk, and ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` as the character itself. Captions are
trained literally by default (as kohya does without ``--weighted_captions``), so a WD14 tag such as
``ganyu (genshin impact)`` keeps its brackets; :func:`literal_text` still reads the backslash escapes as
their character, so a caption written the way a prompt must be written (``ganyu \\(genshin impact\\)``)
trains as the same text. :func:`parse_weighted` reads the syntax as A1111's ``parse_prompt_attention``
does (our implementation of its documented rules) for the weighted-captions option outside A1111.
"""

from __future__ import annotations

import re

BREAK = "BREAK"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One token of the syntax: an escape, a bracket, ":weight)" closing a round bracket, or plain text.
_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]          # an escaped bracket or backslash
    | \\                  # a lone backslash (dropped, as A1111 does)
    | [(\[]               # an opening bracket
    | :\s*([+-]?[.\d]+)\s*\)   # ":1.2)" closing a weighted round bracket
    | [)\]]               # a closing bracket
    | [^\\()\[\]:]+       # plain text
    | :                   # a colon that closes nothing
    """,
    re.X,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ESCAPE = re.compile(r"\\([()\[\]\\])")


def literal_text(caption: str) -> str:
    """The caption as plain text: only A1111's backslash escapes become the character they stand for."""
    return _ESCAPE.sub(r"\1", caption)


def parse_weighted(caption: str) -> list[tuple[str, float]]:
    """``caption`` as (text, weight) pieces the way A1111 parses a prompt; ``("BREAK", -1.0)`` marks a
    chunk break. Runs of equal weight are merged; an empty caption is ``[("", 1.0)]``."""
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _TOKEN.finditer(caption):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            multiply_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for index, part in enumerate(_BREAK_WORD.split(token)):
                if index:
                    pieces.append([BREAK, -1.0])
                pieces.append([part, 1.0])
    for start in open_round:  # unclosed brackets still weigh what follows them
        multiply_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_MULTIPLIER)
    merged: list[list] = []
    for piece in pieces or [["", 1.0]]:
        if merged and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(text, weight) for text, weight in merged]


def prompt_syntax(caption: str) -> list[str]:
    """The prompt syntax ``caption`` contains, as short labels (empty when A1111 would read it as plain
    text): "(...)", "[...]", "(...:w)" and "BREAK". Escaped brackets are plain text, not syntax."""
    found = []
    unescaped = _ESCAPE.sub("", caption)
    if re.search(r":\s*[+-]?[.\d]+\s*\)", unescaped) and "(" in unescaped:
        found.append("(...:w)")
    elif "(" in unescaped:
        found.append("(...)")
    if "[" in unescaped:
        found.append("[...]")
    if _BREAK_WORD.search(unescaped):
        found.append(BREAK)
    if not found:
        return []
    pieces = parse_weighted(caption)
    changes_reading = any(weight != 1.0 for _, weight in pieces)
    return found if changes_reading else []
