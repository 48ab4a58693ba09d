"""loss.png: train and validation loss over steps (and a preference run's accuracy, a GRPO run's mean reward),
redrawn during and at the end of a run."""

from __future__ import annotations

from pathlib import Path

from mlxtune.train.metrics import read_metrics


def plot_losses(metrics_path: Path, out_path: Path, title: str = "") -> Path | None:
    """Draw metrics.jsonl's losses; returns None when there is nothing to draw yet."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    train, valid = [], []
    for record in read_metrics(metrics_path):
        if "train_loss" in record:
            train.append((record["step"], record["train_loss"]))
        if "val_loss" in record:
            valid.append((record["step"], record["val_loss"]))
    if not train and not valid:
        return None
    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        axes.plot(*zip(*train), label="train", color="#1f77b4")
    if valid:
        axes.plot(*zip(*valid), label="validation", color="#d62728", marker="o", markersize=3)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (nats / supervised token)")
    axes.set_title(title or "mlxtune")
    axes.grid(alpha=0.3)
    handles, labels = axes.get_legend_handles_labels()
    accuracy = _preference_series(read_metrics(metrics_path))
    reward = _preference_series(read_metrics(metrics_path), ("train_reward", "val_reward"))
    if accuracy or reward:  # dpo/orpo: preference accuracy on a second axis; grpo: the mean reward
        axes.set_ylabel("loss (per pair)" if accuracy else "loss (clipped surrogate)")
        second = axes.twinx()
        styles = {"train_accuracy": ("train accuracy", "#2ca02c", "-"), "val_accuracy": ("validation accuracy",
                                                                                         "#2ca02c", "--"),
                  "train_reward": ("train mean reward", "#2ca02c", "-"),
                  "val_reward": ("validation mean reward", "#2ca02c", "--")}
        for key, points in (accuracy or reward).items():
            label, color, line = styles[key]
            second.plot(*zip(*points), label=label, color=color, linestyle=line, marker="." if "val" in key else None)
        second.set_ylabel("preference accuracy" if accuracy else "mean reward")
        if accuracy:
            second.set_ylim(0.0, 1.05)
        extra_handles, extra_labels = second.get_legend_handles_labels()
        handles, labels = handles + extra_handles, labels + extra_labels
    axes.legend(handles, labels, fontsize=8)
    figure.tight_layout()
    tmp = out_path.with_name(f".{out_path.stem}.tmp.png")
    tmp.unlink(missing_ok=True)  # savefig opens a name as it finds it: a link planted there is removed, not followed
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(out_path)
    return out_path


def _preference_series(records: list[dict], keys=("train_accuracy", "val_accuracy")
                       ) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for key in keys:
            if key in record:
                series.setdefault(key, []).append((record["step"], record[key]))
    return series
