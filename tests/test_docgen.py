"""The committed config reference is what the passes say about themselves today."""

from pathlib import Path

from sparsegraph import docgen
from sparsegraph.passes import BUILTIN

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"


def test_config_reference_is_up_to_date():
    assert REFERENCE.read_text() == docgen.render(), (
        "docs/config-reference.md is stale: run `python -m sparsegraph.docgen > docs/config-reference.md`")


def test_every_option_is_documented():
    import dataclasses

    from sparsegraph.registry import get_pass

    for name in BUILTIN:
        for f in dataclasses.fields(get_pass(name)):
            assert f.metadata.get("doc"), f"option {f.name!r} of pass {name!r} has no documentation"
