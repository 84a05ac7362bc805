"""The influence report: what it collects from InfluenceFunction, its JSON, figures and page."""

import json

import torch
import user_model
from sklearn.metrics import roc_auc_score

import curvscope
from curvscope.report.influence_example import noisy_digits_example
from curvscope.report.influence_report import _auc, influence_report


def _report(**kwargs):
    inputs, labels = user_model.full_data()
    return influence_report(
        user_model.build_model(), torch.nn.CrossEntropyLoss(), user_model.build_data(),
        (inputs[:3], labels[:3]), damping=0.1, top=4, **kwargs,
    )  # fmt: skip


def test_report_holds_the_scores_of_influence_function_and_counts_flipped_examples():
    flipped = torch.tensor([0, 5, 7, 11])
    report = _report(flipped=flipped)
    inputs, labels = user_model.full_data()
    influence = curvscope.InfluenceFunction(
        user_model.build_model(), torch.nn.CrossEntropyLoss(), user_model.build_data(), damping=0.1
    )
    top = influence.top((inputs[:3], labels[:3]), k=4)
    self_scores = influence.self_influence()
    for row, example in enumerate(report.examples):
        assert [t.index for t in example.harmful] == top.harmful_indices[row].tolist()
        assert example.label == int(labels[row])
        assert all(t.flipped == (t.index in {0, 5, 7, 11}) for t in example.helpful)
    order = self_scores.argsort(descending=True)
    assert [t.index for t in report.self_influence] == order[:20].tolist()
    truth = torch.zeros(30, dtype=torch.bool)
    truth[flipped] = True
    assert report.flipped_in_top(4) == int(truth[order[:4]].sum())
    assert report.flipped_in_top(30) == 4 and report.num_flipped == 4
    assert abs(report.flipped_auc - roc_auc_score(truth.numpy(), self_scores.numpy())) < 1e-12
    saved = json.loads(report.to_json())
    assert saved["kind"] == "InfluenceReport" and "train_images" not in saved
    assert saved["solver_status"]["scores"]["solver"] == "exact"


def test_auc_averages_ties():
    scores = torch.tensor([1.0, 1.0, 2.0, 0.0], dtype=torch.float64)
    positive = torch.tensor([True, False, True, False])
    assert _auc(scores, positive) == roc_auc_score(positive.numpy(), scores.numpy()) == 0.875


def test_save_writes_the_page_without_images_for_non_image_inputs(tmp_path):
    directory = _report().save(tmp_path / "out")
    assert sorted(p.name for p in directory.iterdir()) == [
        "index.html", "results.json", "scores.png"
    ]  # fmt: skip
    page = (directory / "index.html").read_text()
    assert 'id="examples"' in page and "flipped labels" not in page


def test_digits_pages_draw_the_digits_and_the_flipped_ones():
    example = noisy_digits_example(steps=5, dtype=torch.float64)
    assert len(example.flipped) == 150 and len(example.train[0][1]) == 1500
    changed = example.train[0][1] != example.clean_labels
    assert torch.equal(changed.nonzero().squeeze(1), example.flipped)
    inputs, labels = example.test
    report = influence_report(
        example.model, example.loss_fn, example.train, (inputs[:2], labels[:2]),
        curvature="identity", top=3, flipped=example.flipped, clean_labels=example.clean_labels,
    )  # fmt: skip
    assert sorted(report.figures()) == [
        "examples.png", "flipped_found.png", "scores.png", "self_influence.png"
    ]  # fmt: skip
    assert report.flipped_auc > 0.5
    flipped_shown = [t for t in report.self_influence if t.flipped]
    assert all(t.clean_label != t.label for t in flipped_shown)
