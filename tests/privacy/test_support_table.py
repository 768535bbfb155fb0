"""README's "what the engine supports" table is the one generated from the rules registry."""

from pathlib import Path

from memory_test.privacy.support import END, START, support_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_holds_the_generated_support_table():
    text = README.read_text()
    block = text[text.index(START) : text.index(END) + len(END)]
    assert block == support_markdown(), "regenerate with: python -m memory_test.privacy.support"
