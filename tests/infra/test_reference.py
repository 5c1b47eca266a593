"""docs/configuration.md is generated from cdk.json and infra/config.py and kept up to date (issue 24, item 4)."""

from __future__ import annotations

import re

from infra import reference
from infra.config import _SPEC, MEANINGS, default_context


def test_the_configuration_reference_is_up_to_date() -> None:
    assert reference.DOC.read_text() == reference.render(), "run `make docs` (python -m infra.reference)"


def test_every_context_key_has_a_meaning_a_default_and_a_row() -> None:
    assert reference.problems() == []
    text = reference.DOC.read_text()
    documented = set(re.findall(r"^\| `([^`]+)` \|", text, re.MULTILINE))
    assert documented == set(default_context()), "every cdk.json context key, feature flags included"


def test_a_key_without_a_meaning_is_named(monkeypatch) -> None:
    monkeypatch.setitem(_SPEC, "new_knob", ("newKnob", int))
    monkeypatch.setattr("infra.config.default_context", lambda: {})
    assert "newKnob: no meaning in infra/config.py MEANINGS" in reference.problems()
    monkeypatch.setitem(MEANINGS, "newKnob", "what it does")
    assert "newKnob: no meaning in infra/config.py MEANINGS" not in reference.problems()


def test_every_parser_says_what_it_allows() -> None:
    assert [key for key, parse in _SPEC.values() if not getattr(parse, "allowed", None)] == []


def test_the_readme_links_the_references() -> None:
    readme = (reference.DOC.parent.parent / "README.md").read_text()
    assert "docs/configuration.md" in readme
    assert "docs/execution-input.md" in readme
