import pytest

from sparsegraph.data.stdlib_text import sentences


@pytest.mark.slow  # splits the whole stdlib twice: 5-8 s
@pytest.mark.ci
def test_splits_are_disjoint_deterministic_and_sentence_like():
    cal, held = sentences("calibration"), sentences("heldout")
    assert len(cal) > 2000 and len(held) > 1000
    assert not set(cal) & set(held)
    assert sentences("heldout", limit=20) == held[:20]
    for s in cal[:200] + held[:200]:
        assert s[0].isupper() and s.endswith(".") and len(s.split()) >= 6 and ">>>" not in s
