"""The seeds' example trained end to end (issue #13 part 4): a small CNN on scikit-learn's digits.

    python -m ember bench --suites cnn             # 20 epochs per provider
    python -m ember bench --suites cnn --quick     # 6 epochs
    python -m ember.bench.cnn [--device cpu] [--epochs N] [--out bench/results]

The network is the one the project's seeds train: conv-ReLU-max-pool twice, then Linear-ReLU-Linear-
ReLU-Linear, with SGD and momentum 0.9. The data are the real 8x8 digit images scikit-learn ships
(1797 of them, no download), scaled to [0, 1] and split 80/20 with a fixed seed. Providers, from the
same initial weights and the same batch order:

  torch   eager, ``torch.optim.SGD(momentum=0.9)``
  ember   ``ember.swap(model)`` (the classifier's Linear+ReLU pairs fused; the convs' lone ReLUs stay torch's,
          as swap never replaces a lone activation ember is not faster at) and
          ``ember.optim.SGD(momentum=0.9)``

Reported per provider: test accuracy after the last epoch, the median time of an epoch (the first,
warm-up epoch excluded) and the accuracy curve. The targets: ember's accuracy >= 0.9 and within 2
points of torch's. The time is reported, not a target: the model is tiny (about 20k parameters), so an
epoch is bound by per-op overhead, not by any kernel.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import report as _report

SUITE = "cnn"
ACCURACY_FLOOR = 0.9
ACCURACY_GAP = 0.02


class DigitsCNN(nn.Module):
    """conv-ReLU-pool x2 (8x8 -> 4x4 -> 2x2), then Linear-ReLU-Linear-ReLU-Linear to the 10 digits."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 2 * 2, 64), nn.ReLU(),
            nn.Linear(64, 32), nn.ReLU(),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@dataclass(frozen=True)
class Spec:
    epochs: int = 20
    batch: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0

    def describe(self) -> str:
        return (f"DigitsCNN ({sum(p.numel() for p in DigitsCNN().parameters())} params) on scikit-learn digits "
                f"(8x8, 80/20 split), SGD lr {self.lr} momentum {self.momentum}, batch {self.batch}, "
                f"{self.epochs} epochs, seed {self.seed}")


def digits(device: str, seed: int = 0):
    """(x_train, y_train, x_test, y_test): the 1797 digit images as (N, 1, 8, 8) floats in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order].to(device), y[order].to(device)
    cut = int(0.8 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def _torch(model: nn.Module, spec: Spec):
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)


def _ember(model: nn.Module, spec: Spec):
    import ember

    report = ember.swap(model)
    if not report.replaced:
        raise RuntimeError(f"ember.swap replaced nothing in DigitsCNN:\n{report}")
    return ember.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)


# provider -> (model, spec) -> optimizer (after changing the model in place, if the provider does)
PROVIDERS = {"torch": _torch, "ember": _ember}


@dataclass
class Result:
    provider: str
    accuracy: list[float] = field(default_factory=list)  # test accuracy after each epoch
    epoch_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def final_accuracy(self) -> float | None:
        return self.accuracy[-1] if self.accuracy else None

    @property
    def median_epoch_s(self) -> float | None:
        times = self.epoch_s[1:] or self.epoch_s  # the first epoch warms up allocator and kernels
        return statistics.median(times) if times else None


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


def train(provider: str, spec: Spec, device: str = "cpu") -> Result:
    """Train a fresh DigitsCNN (seeded weights) with ``provider``; the test accuracy after each epoch."""
    res = Result(provider)
    x_tr, y_tr, x_te, y_te = digits(device, spec.seed)
    torch.manual_seed(spec.seed)
    model = DigitsCNN().to(device)
    opt = PROVIDERS[provider](model, spec)
    loss_fn = nn.CrossEntropyLoss()
    batches = torch.Generator().manual_seed(spec.seed + 1)  # the same batch order for every provider
    for _ in range(spec.epochs):
        order = torch.randperm(len(y_tr), generator=batches).to(device)
        t0 = time.perf_counter()
        model.train()
        for i in range(0, len(order), spec.batch):
            idx = order[i:i + spec.batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        res.epoch_s.append(time.perf_counter() - t0)
        res.accuracy.append(accuracy(model, x_te, y_te))
    return res


def measure(spec: Spec, device: str, only: list[str] | None = None) -> list[Result]:
    from tqdm.auto import tqdm

    results = []
    for name in tqdm(only or list(PROVIDERS), desc="cnn providers", file=sys.stderr):
        try:
            results.append(train(name, spec, device))
        except Exception as err:  # noqa: BLE001 - one broken provider must not sink the other
            results.append(Result(name, error=f"{type(err).__name__}: {err}".splitlines()[0][:300]))
    return results


def verdicts(results: list[Result]) -> list[tuple[str, str]]:
    by = {r.provider: r for r in results}
    t, e = by.get("torch"), by.get("ember")
    if not (t and e and t.final_accuracy is not None and e.final_accuracy is not None):
        return [("ember and torch both trained", "not measured")]
    gap = abs(e.final_accuracy - t.final_accuracy)
    return [
        (f"ember test accuracy >= {ACCURACY_FLOOR}", f"{e.final_accuracy:.4f}: "
         + ("PASS" if e.final_accuracy >= ACCURACY_FLOOR else "FAIL")),
        (f"within {ACCURACY_GAP * 100:.0f} points of torch ({t.final_accuracy:.4f})",
         f"{gap * 100:.2f} points: " + ("PASS" if gap <= ACCURACY_GAP else "FAIL")),
    ]


def markdown(spec: Spec, device: str, results: list[Result], when: str) -> str:
    by = {r.provider: r for r in results}
    base = by.get("torch")
    rows = []
    for r in results:
        ratio = (base.median_epoch_s / r.median_epoch_s
                 if base and base.median_epoch_s and r.median_epoch_s else None)
        rows.append([r.provider, _report._num(r.final_accuracy), _report._num(None if r.median_epoch_s is None
                                                                              else r.median_epoch_s * 1e3),
                     _report._num(ratio), r.error or "ok"])
    lines = [f"# ember cnn: the seeds' CNN on scikit-learn digits ({when})", "",
             f"- device: {_report.cpu_name() if torch.device(device).type == 'cpu' else torch.cuda.get_device_name(device)}"
             f" ({device}), {torch.get_num_threads()} threads, torch {torch.__version__}, git {_report.git_sha()}",
             f"- workload: {spec.describe()}", ""]
    lines += _report.markdown_table(["provider", "test accuracy", "median ms/epoch", "speed vs torch", "status"],
                                    rows, ["---", "--:", "--:", "--:", "---"])
    lines += ["", "Test accuracy after each epoch:", ""]
    lines += _report.markdown_table(["epoch"] + [r.provider for r in results],
                                    [[i + 1] + [_report._num(r.accuracy[i]) if i < len(r.accuracy) else "" for r in results]
                                     for i in range(spec.epochs)])
    lines += ["", "Targets (issue #13):"] + [f"- {text}: {v}" for text, v in verdicts(results)]
    return "\n".join(lines) + "\n"


def _draw(results: list[Result]):
    def draw(plt):
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        for r in results:
            axes[0].plot(range(1, len(r.accuracy) + 1), r.accuracy, label=r.provider)
        axes[0].set_xlabel("epoch")
        axes[0].set_title("test accuracy", fontsize=9)
        axes[0].legend(fontsize=8)
        ok = [r for r in results if r.median_epoch_s]
        axes[1].bar([r.provider for r in ok], [r.median_epoch_s * 1e3 for r in ok])
        axes[1].set_title("median ms per epoch", fontsize=9)
        fig.tight_layout()
        return fig
    return draw


CSV_COLUMNS = ["timestamp", "device", "git_sha", "torch", "workload", "provider", "final_accuracy",
               "median_epoch_ms", "accuracy_per_epoch", "status", "error"]


def write(spec: Spec, device: str, results: list[Result], out_dir: str | os.PathLike):
    import datetime

    now = datetime.datetime.now().astimezone()
    kind = "cpu" if torch.device(device).type == "cpu" else "gpu"
    stem = Path(out_dir) / f"ember-cnn_{kind}_{now:%Y-%m-%d_%H%M%S}"
    text = markdown(spec, device, results, f"{now:%Y-%m-%d %H:%M %Z}")
    common = {"timestamp": now.isoformat(timespec="seconds"),
              "device": _report.cpu_name() if kind == "cpu" else torch.cuda.get_device_name(device),
              "git_sha": _report.git_sha(), "torch": torch.__version__, "workload": spec.describe()}
    records = [{**common, "provider": r.provider, "final_accuracy": r.final_accuracy,
                "median_epoch_ms": None if r.median_epoch_s is None else round(r.median_epoch_s * 1e3, 3),
                "accuracy_per_epoch": " ".join(f"{a:.4f}" for a in r.accuracy),
                "status": "error" if r.error else "ok", "error": r.error} for r in results]
    written = _report.write_results(stem.with_suffix(".md"), text, csv_path=stem.with_suffix(".csv"),
                                    columns=CSV_COLUMNS, records=records, draw=_draw(results))
    return written, text


SPECS = {False: Spec(), True: Spec(epochs=6)}


def report(cfg, out_dir):
    """The bench CLI's entry point for this report suite."""
    spec = SPECS[bool(cfg.quick)]
    print(f"ember bench cnn: {spec.describe()} on {cfg.device}", file=sys.stderr)
    return write(spec, cfg.device, measure(spec, cfg.device), out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ember.bench.cnn", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=Spec.epochs)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    spec = Spec(epochs=a.epochs)
    results = measure(spec, a.device)
    written, text = write(spec, a.device, results, a.out)
    print(text)
    print(f"wrote {written}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
