"""Caption encoding outside A1111 (model/text_encoding.py, dataset/prompt_syntax.py): A1111's prompt
syntax read as A1111 documents it, chunk layout, literal by default in the stand-alone host too."""

from __future__ import annotations

import pytest
import torch

from lib_lora_trainer.dataset.prompt_syntax import literal_text, parse_weighted, prompt_syntax
from lib_lora_trainer.model.host import HostOptions
from lib_lora_trainer.model.text_encoding import build_chunks
from tests.engine.helpers import tiny_host


@pytest.mark.parametrize(
    ("prompt", "pieces"),
    [  # the examples of A1111's parse_prompt_attention docstring (modules/prompt_parser.py, v1.10.1)
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("", [("", 1.0)]),
    ],
)
def test_weighted_captions_are_parsed_as_a1111_documents(prompt, pieces):
    assert parse_weighted(prompt) == pieces


def test_literal_text_reads_only_the_escapes():
    plain = "ganyu (genshin impact), (smile:1.2) BREAK"
    assert literal_text(plain) == plain
    assert literal_text(r"ganyu \(genshin impact\), a\\b") == r"ganyu (genshin impact), a\b"


@pytest.mark.parametrize(
    ("caption", "found"),
    [
        ("ganyu (genshin impact), smile", ["(...)"]),
        ("alice, (smile:1.2)", ["(...:w)"]),
        ("[background], alice BREAK outdoors", ["BREAK", "[...]"]),
        (r"ganyu \(genshin impact\)", []),  # escaped: plain text in A1111 too
        ("alice, smile :3", []),
        ("a smile)", []),  # a closing bracket alone is text for A1111
    ],
)
def test_prompt_syntax_is_named(caption, found):
    assert sorted(prompt_syntax(caption)) == sorted(found)


def test_a_full_chunk_moves_the_tag_after_the_last_comma_on():
    comma, eos = 0, 99
    tags = [1, 2, 3, comma] * 18  # 72 tokens of tags, each ending in a comma
    last_tag = [5, 6, 7, 8, 9]  # would be cut after 7 at the 75th token
    chunks = build_chunks([(tags + last_tag, 1.0)], bos=98, eos=eos, comma=comma, backtrack=20)
    assert [len(c.tokens) for c in chunks] == [77, 77]
    assert chunks[0].tokens[1:73] == tags and chunks[0].tokens[73:] == [eos] * 4
    assert chunks[1].tokens[1:6] == last_tag
    cut = build_chunks([(tags + last_tag, 1.0)], bos=98, eos=eos, comma=comma, backtrack=0)
    assert cut[0].tokens[73:76] == [5, 6, 7] and cut[1].tokens[1:3] == [8, 9]


def encode(host, captions, **options):
    with host.session(HostOptions(train_text_encoder=False, **options)), torch.no_grad():
        return host.encode_text(captions), host.max_token_length()


def test_the_standalone_host_is_literal_unless_weighted_captions_are_on():
    host = tiny_host()
    caption = "alice, (red scarf:1.5)"
    literal, _ = encode(host, [caption])
    weighted, _ = encode(host, [caption], weighted_captions=True)
    plain_words, _ = encode(host, ["alice, red scarf"], weighted_captions=True)
    escaped, _ = encode(host, [r"alice, \(red scarf:1.5\)"], weighted_captions=True)
    assert torch.equal(literal, escaped)  # literal = the caption with its brackets, as escaped text reads
    assert not torch.equal(literal, weighted)  # the option changes what is computed ...
    assert not torch.equal(weighted, plain_words)  # ... by the weight, not only the brackets


def test_the_standalone_host_keeps_every_chunk_and_clip_skip_is_its_own():
    host = tiny_host()
    long_caption = ", ".join(f"tag{index}" for index in range(60))  # 119 hash-tokenizer words
    cond, longest = encode(host, ["alice", long_caption])
    assert cond.shape[:2] == (2, 2 * 77) and longest == 150
    short, longest = encode(host, ["alice"])
    assert short.shape[1] == 77 and longest is None
    skipped, _ = encode(host, ["alice"], clip_skip=2)
    assert not torch.equal(short, skipped)


def test_kohya_ss_weighted_captions_and_max_token_length_are_read():
    from lib_lora_trainer.kohya_ss_import import import_kohya_ss_config

    result = import_kohya_ss_config({"weighted_captions": True, "max_token_length": 225})
    assert result.config.weighted_captions is True
    (ignored,) = [item for item in result.ignored if item.key == "max_token_length"]
    assert "never cut" in ignored.reason
