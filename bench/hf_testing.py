"""Random-init HF Mask2Former and EoMT models and seeded training steps, for comparing a model
with and without :func:`m2f_kernels.integrations.transformers.apply_m2f_kernels_to_mask2former`
(or ``apply_m2f_kernels_to_eomt``): the integration tests and ``python -m bench.hf_mask2former``.
Needs transformers. Not installed (the repo's ``bench`` package); importing it sets
HF_HUB_OFFLINE=1 unless set.
"""
from __future__ import annotations

import collections
import contextlib
import os

import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402
from transformers.models.mask2former import modeling_mask2former as hf  # noqa: E402


def make_config(size: str = "tiny"):
    """A Mask2FormerConfig with a Swin backbone built locally; 'tiny' for the CPU."""
    if size == "tiny":
        swin = transformers.SwinConfig(
            image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
            drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
        return transformers.Mask2FormerConfig(
            backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
            encoder_layers=2, decoder_layers=4, num_attention_heads=2, dim_feedforward=32, num_queries=6,
            train_num_points=64, num_labels=4)
    swin = transformers.SwinConfig(  # Swin-T, the official Mask2Former decoder sizes
        image_size=384, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=12,
        drop_path_rate=0.0, out_features=["stage1", "stage2", "stage3", "stage4"])
    return transformers.Mask2FormerConfig(backbone_config=swin, num_labels=133)


def make_eomt_config(size: str = "tiny"):
    """An EomtConfig: 'tiny' for the CPU (64^2 images, 8^2 patches, 3 ViT layers of which the
    last 2 are query blocks, 6 queries); 'real' and 'small' = the sizes of
    tue-mps/coco_panoptic_eomt_large_640 and ..._small_640 (ViT-L/16 and ViT-S/16 at 640^2,
    200 queries, 4 query blocks, 12544 training points, 133 classes)."""
    if size == "tiny":
        return transformers.EomtConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2, image_size=64, patch_size=8,
            num_register_tokens=1, num_blocks=2, num_queries=6, train_num_points=64, num_labels=4)
    vit = {"real": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16),
           "small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6)}[size]
    return transformers.EomtConfig(
        **vit, image_size=640, patch_size=16, num_register_tokens=4, num_blocks=4, num_queries=200,
        num_upscale_blocks=2, train_num_points=12544, num_labels=133)


def random_boxes(count: int, size: int, device) -> torch.Tensor:
    """[count, size, size] float masks of random rectangles (structured, unlike pixel noise)."""
    corners = (torch.rand(count, 2, 2) * size).sort(dim=1).values.long()  # [T, (lo, hi), (y, x)]
    grid = torch.arange(size)
    ys = (grid[None, :] >= corners[:, 0, 0, None]) & (grid[None, :] <= corners[:, 1, 0, None])
    xs = (grid[None, :] >= corners[:, 0, 1, None]) & (grid[None, :] <= corners[:, 1, 1, None])
    return (ys[:, :, None] & xs[:, None, :]).float().to(device)


def make_batch(config, batch: int, size: int, device):
    """pixel_values [B, 3, size, size], mask_labels [T_i, size, size] float, class_labels [T_i]."""
    counts = torch.randint(1, 4, (batch,)).tolist()
    return dict(
        pixel_values=torch.randn(batch, 3, size, size, device=device),
        mask_labels=[random_boxes(t, size, device) for t in counts],
        class_labels=[torch.randint(0, config.num_labels, (t,), device=device) for t in counts],
    )


@torch.no_grad()
def generic_points(model) -> None:
    """Perturb the zero-initialised deformable-attention weights so that sampling points
    are off pixel centres, where bilinear sampling has no unique location gradient."""
    for m in model.modules():
        if isinstance(m, hf.Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention):
            m.sampling_offsets.weight.add_(torch.randn_like(m.sampling_offsets.weight) * 0.02)
            m.attention_weights.weight.add_(torch.randn_like(m.attention_weights.weight) * 0.02)


class OpLog(TorchDispatchMode):
    """Counts the operators that reach the dispatcher's Python key (names like 'ns::op')."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.name()] += 1
        return func(*args, **(kwargs or {}))


def train_step(model, batch, seed: int, log: bool = False):
    """(outputs, loss, {name: grad}, op counts) of one seeded forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    mode = OpLog() if log else contextlib.nullcontext()
    with mode:
        out = model(**batch)
        out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return out, out.loss.detach(), grads, (mode.ops if log else None)


def timed_fp32_steps(models: dict, batch, seed: int, label: str) -> dict:
    """{name: :func:`train_step` result} for each CUDA model of ``models`` ({name: model}), in
    fp32 without tf32, each after a warm-up step (kernel compilation, allocator); prints
    "[device] <label>, <name>: step ms, peak MiB" per model."""
    import time

    results = {}
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        for name, model in models.items():
            train_step(model, batch, seed)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            results[name] = train_step(model, batch, seed)
            torch.cuda.synchronize()
            print(f"\n[{torch.cuda.get_device_name()}] {label}, {name}: {(time.perf_counter() - start) * 1e3:.1f} ms, "
                  f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    return results


@contextlib.contextmanager
def module_restored(module, names, revert):
    """Yields {name: original} of ``module``'s attributes ``names``; afterwards ``revert()`` has
    run and every one of them is the original again, whatever happened inside."""
    originals = {n: getattr(module, n) for n in names}
    try:
        yield originals
    finally:
        revert()
        for name, obj in originals.items():
            setattr(module, name, obj)
