"""``python -m m2f_kernels.demo``: run masked attention, MSDeformAttn and the matcher's costs
+ point loss once (forward and backward) at a small Mask2Former-like size and say what ran
where. A first check that an install works; the training CLI is ``m2f.train``."""
from __future__ import annotations

import time

import torch

import m2f_kernels as mk
from m2f_kernels import _dispatch


def _timed(label: str, op: str, device, dtype, fn):
    backend = _dispatch.resolve(op, device, dtype)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    print(f"  {label:<34} backend={backend:<9} {ms:8.1f} ms  {result}")


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("No CUDA GPU: the fused kernels need one, so 'auto' runs the reference backend on the CPU.")
    dtype = torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    rand = lambda *s: torch.rand(*s, device=device, generator=g)  # noqa: E731
    randn = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    print(f"m2f_kernels demo on {device} ({dtype}):")

    b, h, q, d, side = 2, 8, 100, 32, 32
    n = side * side
    qkv = [randn(b, h, length, d).requires_grad_() for length in (q, n, n)]
    mask_logits = randn(b, q, n)

    def attention():
        out = mk.masked_attention(*qkv, mask_logits)
        out.square().sum().backward()
        visible = (mask_logits >= 0).float().mean().item()
        return f"out {tuple(out.shape)}, {visible:.0%} keys visible, |dq| {qkv[0].grad.norm():.3f}"

    _timed("masked_attention fwd+bwd", "masked_attention", device, dtype, attention)

    shapes = torch.tensor([[32, 32], [16, 16], [8, 8]], device=device)
    starts = torch.tensor([0, 1024, 1280], device=device)
    s = 1024 + 256 + 64
    value = randn(b, s, h, d).requires_grad_()
    loc = rand(b, s, h, 3, 4, 2).requires_grad_()
    logits = randn(b, s, h, 3, 4).requires_grad_()

    def deform():
        out = mk.ms_deform_attn(value, shapes, starts, loc, logits, softmax=True)
        out.square().sum().backward()
        return f"out {tuple(out.shape)}, |dvalue| {value.grad.norm():.3f}"

    _timed("ms_deform_attn fwd+bwd (softmax)", "ms_deform_attn", device, dtype, deform)

    pred = randn(b, q, 64, 64).requires_grad_()
    target = rand(6, 256, 256) > 0.5
    index = (torch.tensor([0, 0, 0, 1, 1, 1], device=device), torch.tensor([3, 7, 9, 0, 1, 2], device=device))

    def loss():
        with torch.no_grad():
            points = mk.uncertain_point_coords(pred, 1568, generator=g, pred_index=index)
            cost_bce, cost_dice = mk.pairwise_mask_cost(pred[0], target[:3], rand(1568, 2))
        bce, dice = mk.point_mask_loss(pred, target, points, 6.0, pred_index=index)
        (bce + dice).backward()
        return f"bce {bce.item():.4f}, dice {dice.item():.4f}, cost {tuple(cost_bce.shape)}"

    _timed("matcher cost + point loss fwd+bwd", "point_mask_loss", device, dtype, loss)
    print("done. `python -m m2f_kernels.info` shows every backend's status.")


if __name__ == "__main__":
    main()
