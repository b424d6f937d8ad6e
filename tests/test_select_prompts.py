"""The fixed-prompt selection: rates over sure images, the proxy's within-prompt AUROC, the choice."""

import math

import pytest

from benchmarks.select_prompts import Candidate, select


def test_rate_leaves_unsure_images_out():
    c = Candidate("p", correct=[True, False, False, True], unsure=[False, False, True, True], proxy=[0.0] * 4)
    assert c.sure == 2 and c.rate == 0.5


def test_agreement_is_the_auroc_over_sure_images_by_hand():
    # sure-correct proxies 0.9, 0.4; sure-wrong 0.5, 0.4; the unsure image (proxy 1.0) is left out.
    # pairs: 0.9>0.5, 0.9>0.4, 0.4<0.5, 0.4=0.4 (half) -> 2.5 / 4
    c = Candidate("p", correct=[True, True, False, False, True], unsure=[False, False, False, False, True],
                  proxy=[0.9, 0.4, 0.5, 0.4, 1.0])
    assert c.agreement == pytest.approx(2.5 / 4)


def test_agreement_needs_both_kinds():
    assert math.isnan(Candidate("p", [True, True], [False, False], [0.1, 0.2]).agreement)


def _cand(name: str, rate_right: int, agreement_high: bool, n: int = 8) -> Candidate:
    correct = [i < rate_right for i in range(n)]
    proxy = [float(c) if agreement_high else float(not c) for c in correct]
    return Candidate(name, correct, [False] * n, proxy)


def test_select_keeps_in_range_prompts_with_the_highest_agreement_in_candidate_order():
    cands = [_cand("a", 4, False), _cand("b", 4, True), _cand("c", 8, True),  # c: always right
             _cand("d", 3, True), _cand("e", 5, False)]
    kept = select(cands, keep=2, min_sure=8)
    assert [c.prompt for c in kept] == ["b", "d"]


def test_select_refuses_when_too_few_candidates_qualify():
    with pytest.raises(ValueError, match="only 1 candidates .* need 2"):
        select([_cand("a", 4, True), _cand("b", 0, True)], keep=2, min_sure=8)


def test_proxy_ceiling_takes_the_proxy_top_share_by_hand():
    from benchmarks.proxy_ceiling import ceiling, top_verdicts

    # proxy order: 0.9 (right), 0.8 (unsure), 0.5 (wrong), 0.1 (right)
    c = Candidate("p", correct=[True, False, True, True], unsure=[False, False, False, True],
                  proxy=[0.1, 0.5, 0.9, 0.8])
    assert top_verdicts(c, 1.0) == [True, False, True]  # the unsure image is left out
    assert top_verdicts(c, 0.5) == [True]  # 0.9 right, 0.8 unsure
    assert top_verdicts(c, 0.1) == [True]  # at least one image
    d = Candidate("q", correct=[False, False], unsure=[False, False], proxy=[0.3, 0.2])
    rate, (lo, hi), n = ceiling([c, d], 0.5)
    assert (rate, n) == (0.5, 2) and lo <= rate <= hi
    with pytest.raises(ValueError, match="no sure image"):
        ceiling([Candidate("r", [True], [True], [0.0])], 1.0)
