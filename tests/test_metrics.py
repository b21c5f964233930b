"""Metrics on small examples whose answers were worked out by hand."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cnntrain.metrics import ConfusionMatrix, classification_report, topk_correct


def test_topk_correct_hand_example():
    # 4 samples, 6 classes; the ranking of each row is visible in its logits.
    logits = torch.tensor(
        [
            [0.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # ranking 1,2,3,4,5,0
            [5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # ranking 0,1,2,3,4,5
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # ranking 5,4,3,2,1,0
            [1.0, 0.0, 0.0, 0.0, 0.0, 9.0],  # ranking 5,0,...
        ]
    )
    targets = torch.tensor([1, 3, 0, 0])
    # sample 0: top-1 hit; sample 1: rank 4 (top-5 hit); sample 2: rank 6 (miss); sample 3: rank 2.
    assert topk_correct(logits, targets) == {1: 1, 5: 3}
    assert topk_correct(logits, targets, ks=(1, 2, 3, 4, 6)) == {1: 1, 2: 2, 3: 2, 4: 3, 6: 4}


def test_topk_clamps_k_to_class_count():
    logits = torch.tensor([[0.1, 0.2, 0.7], [0.9, 0.05, 0.05], [0.3, 0.3, 0.4]])
    targets = torch.tensor([0, 1, 2])
    assert topk_correct(logits, targets, ks=(1, 5)) == {1: 1, 5: 3}


def test_topk_empty_batch_and_bad_input():
    assert topk_correct(torch.empty(0, 4), torch.empty(0, dtype=torch.long)) == {1: 0, 5: 0}
    with pytest.raises(ValueError):
        topk_correct(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        topk_correct(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), ks=(0,))


def _example() -> ConfusionMatrix:
    # true:  0 0 0 1 1 2 2 2 2
    # pred:  0 0 1 1 0 0 1 1 1   -> class 2 is never predicted
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2]))
    return cm


def test_confusion_matrix_counts():
    cm = _example()
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == [[2, 1, 0], [1, 1, 0], [1, 3, 0]]
    assert cm.total == 9
    assert cm.accuracy() == pytest.approx(3 / 9)


def test_per_class_precision_recall_f1_support():
    rows = _example().per_class()
    # class 0: tp 2, predicted 4, support 3 -> p 0.5, r 2/3, f1 = 2*(1/3)/(7/6) = 4/7
    # class 1: tp 1, predicted 5, support 2 -> p 0.2, r 0.5, f1 = 0.2/0.7 = 2/7
    # class 2: tp 0, predicted 0, support 4 -> p 0 (not NaN), r 0, f1 0
    expected = [(0.5, 2 / 3, 4 / 7, 3), (0.2, 0.5, 2 / 7, 2), (0.0, 0.0, 0.0, 4)]
    for row, (p, r, f1, support) in zip(rows, expected, strict=True):
        assert row["precision"] == pytest.approx(p)
        assert row["recall"] == pytest.approx(r)
        assert row["f1"] == pytest.approx(f1)
        assert row["support"] == support
        assert isinstance(row["support"], int)
    assert not any(math.isnan(v) for row in rows for v in row.values())
    assert _example().macro_f1() == pytest.approx((4 / 7 + 2 / 7 + 0) / 3)


def test_class_absent_everywhere_is_left_out_of_macro_f1():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]))
    # class 0: p 1, r 0.5, f1 2/3; class 1: p 0.5, r 1, f1 2/3; classes 2, 3 never seen.
    assert cm.per_class()[3] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert cm.macro_f1() == pytest.approx(2 / 3)


def test_empty_matrix_is_all_zero_not_nan():
    cm = ConfusionMatrix(2)
    assert cm.accuracy() == 0.0
    assert cm.macro_f1() == 0.0
    assert all(v == 0 for row in cm.per_class() for v in row.values())


def test_batches_accumulate_to_one_shot():
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 5, (103,), generator=g)
    targets = torch.randint(0, 5, (103,), generator=g)
    one_shot = ConfusionMatrix(5)
    one_shot.update(preds, targets)
    batched = ConfusionMatrix(5)
    for p, t in zip(preds.split(16), targets.split(16), strict=True):
        batched.update(p, t)
    assert torch.equal(one_shot.matrix, batched.matrix)
    assert batched.total == 103

    a, b = ConfusionMatrix(5), ConfusionMatrix(5)
    a.update(preds[:50], targets[:50])
    b.update(preds[50:], targets[50:])
    a.merge(b)
    assert torch.equal(a.matrix, one_shot.matrix)


def test_update_takes_logits_ignores_bad_targets_rejects_bad_preds():
    cm = ConfusionMatrix(3)
    logits = torch.tensor([[0.1, 0.8, 0.1], [0.9, 0.0, 0.1], [0.2, 0.2, 0.6]])
    cm.update(logits, torch.tensor([1, -100, 0]))  # -100: ignore index, skipped
    assert cm.matrix.tolist() == [[0, 0, 1], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(ValueError):
        cm.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([-1]), torch.tensor([0]))
    with pytest.raises(ValueError):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))


def test_from_matrix_and_reset():
    cm = ConfusionMatrix.from_matrix([[2, 1, 0], [1, 1, 0], [1, 3, 0]])
    assert cm.per_class() == _example().per_class()
    cm.reset()
    assert cm.total == 0
    with pytest.raises(ValueError):
        ConfusionMatrix.from_matrix([[1, 2]])


def test_classification_report_rows():
    rows = classification_report(_example(), ["cat", "dog", "fox"])
    assert [r["class"] for r in rows] == ["cat", "dog", "fox"]
    assert rows[2] == {"class": "fox", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 4}
    json.dumps(rows, allow_nan=False)  # strict JSON for `cnntrain eval --json`

    with_avg = classification_report(_example(), ["cat", "dog", "fox"], averages=True)
    macro, weighted = with_avg[3], with_avg[4]
    assert macro["class"] == "macro avg" and weighted["class"] == "weighted avg"
    assert macro["f1"] == pytest.approx(_example().macro_f1())
    assert weighted["recall"] == pytest.approx(_example().accuracy())  # weighted recall == accuracy
    assert macro["support"] == weighted["support"] == 9

    with pytest.raises(ValueError):
        classification_report(_example(), ["cat", "dog"])
