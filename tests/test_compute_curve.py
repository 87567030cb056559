"""eval/compute_curve.py: the verdicts it prints from gen_quality records (made-up numbers, known answers)."""

from eval import compute_curve


def row(forwards, ppl, agreement=None, distinct_2=None):
    return {"iters": forwards, "mean_nfe_per_batch": float(forwards), "parent_ppl": ppl, "parent_agreement": agreement,
            "distinct_2": distinct_2}


RECORD = {"label": "run", "model_short": "m", "command": "python -m eval.gen_quality ...", "ar": {"parent_ppl": 2.0},
          "sweep": {"confidence": [row(32, 5.0, 0.5), row(8, 20.0, 0.2), row(16, 10.0, 0.3)],
                    "confidence + polish 4": [row(10, 8.0), row(20, 12.0)],
                    "refine": [row(8, 6.0), row(64, 6.2)]}}


def test_verdicts_read_the_curve_from_fewest_to_most_forwards():
    curves = compute_curve.curves(RECORD)
    assert [r["mean_nfe_per_batch"] for r in curves["confidence"]] == [8.0, 16.0, 32.0]
    assert compute_curve.verdict(curves["confidence"]) == "bought quality (ppl ×0.25)"
    assert compute_curve.verdict(curves["refine"]) == "bought nothing (ppl ×1.03)"
    assert compute_curve.verdict([row(8, 5.0), row(16, 6.0)]) == "cost quality (ppl ×1.20)"


def test_a_lower_perplexity_of_repeated_words_is_not_called_quality():
    looping = [row(8, 10.0, distinct_2=0.3), row(32, 5.0, distinct_2=0.2)]
    assert compute_curve.verdict(looping, parent_distinct_2=0.8) == \
        "bought perplexity (ppl ×0.50), but the answers repeat themselves (distinct-2 0.20, parent 0.80)"
    varied = [row(8, 10.0, distinct_2=0.7), row(32, 5.0, distinct_2=0.6)]
    assert compute_curve.verdict(varied, parent_distinct_2=0.8) == "bought quality (ppl ×0.50)"


def test_polish_is_compared_with_the_plain_sampler_at_equal_or_more_forwards():
    # 10 forwards polished (8.0) vs confidence at 16 (10.0): better; 20 polished (12.0) vs 32 (5.0): worse
    assert compute_curve.polish_gain(RECORD, "confidence") == "1/2 points better than confidence at equal or more forwards"
    assert compute_curve.polish_gain(RECORD, "refine") == "-"


def test_table_has_a_row_per_sampler_and_the_parent():
    text = compute_curve.table([RECORD])
    assert "| run | confidence | 8 → 20.0 (0.20, -), 16 → 10.0 (0.30, -), 32 → 5.0 (0.50, -) | bought quality" in text
    assert "| run | AR parent | 2.00 (distinct-2 -) | | |" in text
