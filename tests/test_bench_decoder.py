"""The 'decoder' bench suite end to end on a tiny Llama (2 layers, hidden 64, vocab 256, 8 new tokens):
every provider that can run here generates, and its row has positive tokens/s, a peak memory and an
agreement with the fp32 model in [0, 1]; the CLI writes the markdown and CSV. torch.compile is left out
(its compiles take about a minute even on this model); it goes through the same run_provider."""
import csv
import math

import pytest
import torch

pytest.importorskip("transformers")

from ember.bench import decoder  # noqa: E402
from ember.bench import main as bench_main  # noqa: E402

TINY = decoder.Spec(hidden=64, layers=2, intermediate=128, vocab=256, heads=4, kv_heads=2, prompts=2, prompt_len=16,
                    new_tokens=8)


def test_agreement_counts_positions_and_first_divergence():
    ref = [torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8])]
    assert decoder.agreement(ref, ref) == (1.0, None)
    frac, first = decoder.agreement(ref, [torch.tensor([1, 2, 9, 4]), torch.tensor([5, 0, 7, 8])])
    assert frac == 6 / 8 and first == 1
    # a shorter output: its missing tokens count as different, and it diverges where it stops
    assert decoder.agreement(ref[:1], [torch.tensor([1, 2])]) == (0.5, 2)


def test_spec_params_match_the_built_model():
    model = decoder.fresh_model(TINY, "cpu")
    assert TINY.params() == sum(p.numel() for p in model.parameters())
    # the same seed gives every provider the same weights
    again = decoder.fresh_model(TINY, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_cli_runs_the_suite_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(decoder.SPECS, ("cpu", True), TINY)
    rc = bench_main(["--device", "cpu", "--suites", "decoder", "--quick", "--no-compile", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "# ember decoder" in out and "Targets (issue #12)" in out
    (md,), (path,) = list(tmp_path.glob("ember-decoder_*.md")), list(tmp_path.glob("ember-decoder_*.csv"))
    with open(path, newline="") as f:
        rows = {r["provider"]: r for r in csv.DictReader(f)}
    ran = {"torch-fp32", "torch-bf16", "ember-w8a8", "ember-w8a16", "quantize_dynamic"}
    assert ran <= set(rows) and rows["torch.compile"]["status"] == "skipped"
    for name in ran:
        r = rows[name]
        assert r["status"] == "ok", (name, r["error"])
        for key in ("prefill_tok_s", "decode_tok_s"):
            assert math.isfinite(float(r[key])) and float(r[key]) > 0, (name, key, r[key])
        assert float(r["peak_mb"]) > 0
        assert 0.0 <= float(r["agreement"]) <= 1.0
        first = r["first_divergence"]
        assert first == "" or 0 <= int(first) < TINY.new_tokens
    # the reference agrees with itself everywhere
    assert float(rows["torch-fp32"]["agreement"]) == 1.0 and rows["torch-fp32"]["first_divergence"] == ""
