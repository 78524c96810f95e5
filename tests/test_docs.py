"""The README's job reference is generated from the config dataclasses and must not drift."""

from pathlib import Path

from pipeline.docs import BEGIN, END, reference_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reference_matches_the_config_dataclasses():
    text = README.read_text()
    block = text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()
    assert block == reference_markdown().strip(), "stale README: run `python -m pipeline.docs --write README.md`"


def test_readme_mentions_every_subcommand():
    text = README.read_text()
    for cmd in ("prepare", "run", "sketch", "fit", "encode", "score", "eval", "status", "make demo"):
        assert cmd in text
