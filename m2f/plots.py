"""PNG plots of a run: loss curves from its JSONL log, and predictions overlaid on images."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import matplotlib

# pyplot (~0.4 s) is imported by the functions that draw; it takes this backend then
matplotlib.use("Agg")
import numpy as np  # noqa: E402

from .data.sample import DatasetInfo  # noqa: E402

LOSS_LABELS = {"loss": "total (all layers)", "loss_ce": "class (last layer)", "loss_mask": "mask BCE (last layer)",
               "loss_dice": "dice (last layer)"}
EVAL_KEYS = ("PQ", "mIoU", "AP")


def read_log(path: str) -> List[Dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def save_loss_curve(log_path: str, png_path: str) -> None:
    """Training losses (log scale) and, when the log has evaluations, PQ / mIoU / AP vs step."""
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval" in r]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(11 if evals else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for key, label in LOSS_LABELS.items():
        points = [(r["step"], r[key]) for r in train if key in r]
        if points:
            ax.plot(*zip(*points), label=label, lw=2 if key == "loss" else 1)
    ax.set(xlabel="step", ylabel="weighted loss", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals:
        ax = axes[0, 1]
        for key in EVAL_KEYS:
            points = [(r["step"], r["eval"][key]) for r in evals if key in r["eval"]]
            if points:
                ax.plot(*zip(*points), marker="o", label=key)
        ax.set(xlabel="step", ylabel="%", title="evaluation")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, png_path)


def save_run_comparison(log_paths: Dict[str, str], png_path: str) -> None:
    """Total training loss (log scale) and speed (it/s) against step for several runs, e.g.
    ``{"fused": "runs/a/metrics.jsonl", "reference": "runs/b/metrics.jsonl"}``."""
    import matplotlib.pyplot as plt

    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for label, path in log_paths.items():
        train = [r for r in read_log(path) if "loss" in r]
        loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label=label)
        speed_ax.plot([r["step"] for r in train], [r.get("it_s", float("nan")) for r in train], label=label)
    loss_ax.set(xlabel="step", ylabel="weighted loss", yscale="log", title="training loss")
    speed_ax.set(xlabel="step", ylabel="it/s", title="training speed")
    for ax in (loss_ax, speed_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, png_path)


def _palette(n: int) -> np.ndarray:
    import matplotlib.pyplot as plt

    name, size = ("tab10", 10) if n <= 10 else ("tab20", 20)
    return plt.get_cmap(name)(np.arange(size))[:, :3][np.arange(n) % size]


def _colorize(ids: np.ndarray, color_of: Dict[int, np.ndarray]) -> np.ndarray:
    """[H, W] ids -> [H, W, 4] RGBA; ids missing from ``color_of`` are transparent."""
    out = np.zeros(ids.shape + (4,))
    for i, c in color_of.items():
        out[ids == i] = (*c, 1.0)
    return out


def _boundaries(ids: np.ndarray) -> np.ndarray:
    edge = np.zeros(ids.shape, bool)
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    return edge


def overlay(image: np.ndarray, ids: np.ndarray, color_of: Dict[int, np.ndarray], alpha: float = 0.6) -> np.ndarray:
    """image float [H, W, 3] in [0, 1], in grey so the class colours read true, blended with
    the colours of ``ids``; boundaries in white."""
    rgba = _colorize(ids, color_of)
    grey = np.repeat(image.mean(-1, keepdims=True), 3, axis=-1)
    out = grey * (1 - alpha * rgba[..., 3:]) + alpha * rgba[..., :3] * rgba[..., 3:]
    out[_boundaries(ids)] = 1.0
    return out


def _segment_colors(segments: List[Dict], palette: np.ndarray) -> Dict[int, np.ndarray]:
    """Category colour per segment; thing instances get a brightness jitter so neighbours differ."""
    colors = {}
    for s in segments:
        c = palette[s["category_id"]]
        if s.get("isthing"):
            c = np.clip(c * (0.7 + 0.6 * ((s["id"] * 0.618) % 1.0)), 0, 1)
        colors[int(s["id"])] = c
    return colors


def save_predictions(examples: List[Dict], info: DatasetInfo, png_path: str, title: Optional[str] = None) -> None:
    """A grid, one row per image: image | ground truth | prediction, panoptic (segments of
    class colours, instances shaded apart) then semantic for panoptic datasets."""
    if not examples:
        return
    import matplotlib.pyplot as plt

    palette = _palette(info.num_classes)
    class_colors = {c: palette[c] for c in range(info.num_classes)}
    panoptic = "pan_seg" in examples[0]
    names = ("image", "ground truth", "panoptic prediction", "semantic prediction") if panoptic else \
        ("image", "ground truth", "prediction")
    fig, axes = plt.subplots(len(examples), len(names), figsize=(3 * len(names), 3 * len(examples)), squeeze=False)
    for row, ex in zip(axes, examples):
        image = ex["image"].permute(1, 2, 0).numpy() / 255.0
        if panoptic:
            panels = (image, overlay(image, ex["pan_seg"].numpy(), _segment_colors(ex["segments"], palette)),
                      overlay(image, ex["pred_pan_seg"].numpy(), _segment_colors(ex["pred_segments"], palette)),
                      overlay(image, ex["pred_sem_seg"].numpy(), class_colors))
        else:
            panels = (image, overlay(image, ex["sem_seg"].numpy(), class_colors),
                      overlay(image, ex["pred_sem_seg"].numpy(), class_colors))
        for ax, img, name in zip(row, panels, names):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=palette[c]) for c in range(min(info.num_classes, 20))]
    fig.legend(handles, info.class_names[:20], loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    _save(fig, png_path)


def _save(fig, png_path: str) -> None:
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
