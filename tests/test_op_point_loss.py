"""The point-loss ops (point_sample, uncertain_point_coords, point_mask_loss,
pairwise_mask_cost): each kernel backend (triton, cuda) against backend='reference' on
fresh random inputs and the same points (forward and gradient through the public ops), the
reference against float64 loops, and the triton backend's launch configs.

Inputs cover every pred dtype, points on borders, corners and outside the maps, targets of
another resolution, bool/uint8/float targets, the pred_index form, one point, one mask.
CPU: the triton backend under TRITON_INTERPRET=1 on small shapes; the cuda tests skip. GPU:
the same tests, plus the standard Mask2Former shapes of docs/ops.md.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import m2f_kernels as mk
from m2f_kernels.reference import point_loss as ref
from ._inputs import (
    EXACT, FD_TOL, LOW_PRECISION, POINT_DTYPES, TARGET_KINDS, assert_costs_match, assert_loss_matches, bce,
    bilinear, check_importance_points, corner_weights, dice, fd_grads, loss_coords, make_coords, make_indexed_logits,
    make_loss_inputs, make_point_sample_inputs, make_target, np64, point_sample_api, sample_coords, sigmoid,
    standard_point_loss_case, uncertain_points_indexed_vs_copied,
)
from .conftest import (
    ALL_BACKENDS, DEVICE, KERNEL_BACKENDS, TOLERANCE, assert_close, op_module, per_backend, poisoned, requires_gpu,
    requires_triton,
)

try:
    import triton
    from m2f_kernels.triton import _pairwise_mask_cost as tri_pairwise, _point_mask_loss as tri_loss
    from m2f_kernels.triton import point_loss as tri
except ImportError:  # no triton: the triton cases skip (requires_triton)
    triton = tri = tri_pairwise = tri_loss = None

pytestmark = [
    pytest.mark.usefixtures("seed"),
    # the Triton interpreter's own range(<runtime int>) (numpy >= 1.25), not this code
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
]

FAMILY = "point_loss"


def _dtype_id(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ============================================================================ point_sample


@pytest.mark.parametrize("channels,strided,p", [(1, False, 41), (3, True, 57), (2, False, 1)],
                         ids=["one_channel", "channels_last", "one_point"])
@pytest.mark.parametrize("dtype", POINT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_point_sample(backend, dtype, channels, strided, p, seed):
    """Output and input gradient through the public op; strided: channels-last input and
    transposed coords."""
    n, h, w = 3, 7, 9
    x, coords = make_point_sample_inputs(n, channels, h, w, p, dtype, strided)
    weights = torch.randn(n, channels, p, device=DEVICE)
    with poisoned(backend):
        out, grad = point_sample_api(backend, x, coords, weights)
    eout, egrad = point_sample_api("reference", x, coords, weights)
    assert out.dtype == dtype and out.shape == (n, channels, p) and out.is_contiguous()
    assert grad.dtype == dtype and grad.shape == x.shape and grad.is_contiguous()
    assert_close(out, eout, TOLERANCE[dtype], f"point_sample (seed {seed})")
    assert_close(grad, egrad, TOLERANCE[dtype], f"grad input (seed {seed})")


@pytest.mark.parametrize("kind,strided", [("bool", False), ("uint8", True)], ids=["bool", "uint8_strided"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_point_sample_byte_input(backend, kind, strided, seed):
    """0/1 masks (bool or uint8, here a non-contiguous view of a padded batch) give float32
    samples equal to the reference's."""
    n, c, h, w, p = 3, 2, 7, 9, 45
    maps = make_target(kind, n * c, h, w, padded=strided).reshape(n, c, h, w)  # a view: strides kept
    assert maps.is_contiguous() != strided
    coords = make_coords(n, p, [(h, w)])
    with poisoned(backend):
        out = mk.point_sample(maps, coords, backend=backend)
    expected = mk.point_sample(maps, coords, backend="reference")
    assert out.dtype == torch.float32 and out.shape == (n, c, p) and out.is_contiguous()
    assert_close(out, expected, TOLERANCE[torch.float32], f"point_sample of {kind} maps (seed {seed})")


# ============================================================================ importance sampling


@pytest.mark.parametrize("dtype", POINT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_uncertain_point_coords_given_draws(backend, dtype, seed):
    """The same candidates / random points give the reference's points."""
    n, h, w, points = 3, 11, 13, 16
    s, k = 3 * points, int(0.75 * points)
    logits = (torch.randn(n, h, w, device=DEVICE) * 3).to(dtype)
    candidates = torch.rand(n, s, 2, device=DEVICE)
    random = torch.rand(n, points - k, 2, device=DEVICE)
    with poisoned(backend):
        out = op_module(backend, FAMILY).uncertain_point_coords(logits, candidates, random, k)
    clear = check_importance_points(out, logits, candidates, random, k)
    assert clear.any(), f"no row could be compared exactly (seed {seed})"


@pytest.mark.parametrize("dtype", POINT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_uncertain_point_coords_public(backend, dtype):
    """Public op, seeded generator: reproducible, the reference's random points and uncertainties."""
    logits = (torch.randn(2, 9, 10, device=DEVICE) * 3).to(dtype)
    gen_seed = int(torch.randint(0, 2**31, ()).item())

    def run(backend):
        gen = torch.Generator(device=DEVICE).manual_seed(gen_seed)
        return mk.uncertain_point_coords(logits, 20, generator=gen, backend=backend)

    out = run(backend)
    assert out.shape == (2, 20, 2) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(out, run(backend)), "same generator seed, different points"
    expected = run("reference")
    k = 15
    assert torch.equal(out[:, k:], expected[:, k:])
    u = [ref.point_sample_fwd(logits.float().unsqueeze(1), pts[:, :k])[:, 0].abs() for pts in (out, expected)]
    assert (u[0] - u[1]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("layout", ("contiguous", "strided"))
@pytest.mark.parametrize("dtype", POINT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_uncertain_point_coords_indexed(backend, dtype, layout, seed):
    """logits [B, Q, H, W] + (batch, query) index (repeated, out of order): exactly the
    points of the gathered [N, H, W] copy, which are the reference's."""
    out, copied, candidates, random, k = uncertain_points_indexed_vs_copied(op_module(backend, FAMILY), dtype, layout)
    clear = check_importance_points(out, copied, candidates, random, k)
    assert clear.any(), f"no row could be compared exactly (seed {seed})"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_uncertain_point_coords_indexed_int32_index(backend):
    uncertain_points_indexed_vs_copied(op_module(backend, FAMILY), torch.float32, "contiguous", torch.int32)


@pytest.mark.parametrize("dtype", POINT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_uncertain_point_coords_public_indexed(backend, dtype):
    """Public op: pred_index gives the points of logits[batch_index, query_index], bit for
    bit, from the same generator draws; N = 0 matched masks gives [0, P, 2]."""
    logits, bidx, qidx = make_indexed_logits(dtype, "contiguous")
    gen_seed = int(torch.randint(0, 2**31, ()).item())

    def run(x, **kw):
        gen = torch.Generator(device=DEVICE).manual_seed(gen_seed)
        return mk.uncertain_point_coords(x, 20, generator=gen, backend=backend, **kw)

    out = run(logits, pred_index=(bidx, qidx))
    assert out.shape == (5, 20, 2) and out.dtype == torch.float32
    assert torch.equal(out, run(logits[bidx, qidx])), f"generator seed {gen_seed}"
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    none = run(logits, pred_index=(empty, empty))
    assert none.shape == (0, 20, 2) and none.dtype == torch.float32
    assert torch.equal(none, run(logits[empty, empty]))


# ============================================================================ point_mask_loss
# The cuda backend's forward is also checked bitwise repeatable in each case (repeat_forward).


@pytest.mark.parametrize("target_hw", (None, (17, 9)), ids=("same_res", "other_res"))
@pytest.mark.parametrize("target_kind", TARGET_KINDS)
@pytest.mark.parametrize("form", ("plain", "strided", "indexed"))
@pytest.mark.parametrize("dtype", POINT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_point_mask_loss(backend, dtype, form, target_kind, target_hw, seed):
    inputs = make_loss_inputs(dtype, form, n=3, p=53, target_hw=target_hw, target_kind=target_kind)
    assert_loss_matches(backend, dtype, *inputs, num_masks=4.5, seed=seed, repeat_forward=backend == "cuda")


LOSS_SIZES = {  # name: (masks N, points P)
    "one_point_one_mask": (1, 1), "one_mask": (1, 40), "one_point": (4, 1),
    "many_masks": (33, 9), "several_blocks": (1, 4200), "many_blocks": (2, 2900),
}
# (dtype, size, _BLOCK_K). triton: the small sizes in every dtype; in fp32 more masks than
# one finish step reduces (32), several point blocks, and more point blocks than one
# partial-sum step reduces (the step, 64 blocks, lowered to 4 to keep the interpreter fast).
# cuda: every size in every dtype.
LOSS_SIZE_CASES = {
    "triton": [(dtype, name, None) for dtype in POINT_DTYPES
               for name in ("one_point_one_mask", "one_mask", "one_point")]
    + [(torch.float32, "many_masks", None), (torch.float32, "several_blocks", None), (torch.float32, "many_blocks", 4)],
    "cuda": [(dtype, name, None) for dtype in POINT_DTYPES for name in LOSS_SIZES],
}


@pytest.mark.parametrize("form", ("plain", "indexed"))
@pytest.mark.parametrize("backend,dtype,size,block_k", per_backend(
    LOSS_SIZE_CASES, ids=lambda b, c: f"{b}-{c[1]}-{_dtype_id(c[0])}"))
def test_point_mask_loss_sizes(backend, dtype, size, block_k, form, monkeypatch, seed):
    """One point / one mask, many masks, several and many point blocks."""
    n, p = LOSS_SIZES[size]
    if block_k is not None:
        monkeypatch.setattr(tri_loss, "_BLOCK_K", block_k)
        assert triton.cdiv(p, tri.LOSS_CONFIG.block_p) > 2 * block_k
    inputs = make_loss_inputs(dtype, form, n=n, p=p, pred_hw=(5, 7), target_hw=(9, 6))
    assert_loss_matches(backend, dtype, *inputs, num_masks=float(n), seed=seed, repeat_forward=backend == "cuda")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_point_mask_loss_int32_index(backend, seed):
    pred, target, coords, bidx, qidx = make_loss_inputs(torch.float32, "indexed", n=4, p=30, target_kind="uint8")
    assert_loss_matches(backend, torch.float32, pred, target, coords, bidx.int(), qidx.int(), num_masks=3.0,
                        seed=seed, repeat_forward=backend == "cuda")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_point_mask_loss_zero_masks(backend):
    """No matched mask: both losses 0, a zero gradient, no error."""
    pred = torch.randn(2, 4, 6, 5, device=DEVICE, requires_grad=True)
    target = torch.zeros(0, 8, 8, dtype=torch.bool, device=DEVICE)
    coords = torch.rand(0, 7, 2, device=DEVICE)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    bce_loss, dice_loss = mk.point_mask_loss(pred, target, coords, 1.0, pred_index=(empty, empty), backend=backend)
    assert bce_loss.item() == 0 and dice_loss.item() == 0
    (bce_loss + dice_loss).backward()
    assert pred.grad is not None and (pred.grad == 0).all()


# ============================================================================ pairwise_mask_cost


@pytest.mark.parametrize("target_kind", TARGET_KINDS)
@pytest.mark.parametrize("dtype", POINT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_pairwise_mask_cost(backend, dtype, target_kind, seed):
    q, t, hp, wp, ht, wt, p = 7, 5, 10, 12, 23, 19, 150
    pred = (torch.randn(q, hp, wp, device=DEVICE) * 3).to(dtype)
    target = make_target(target_kind, t, ht, wt, padded=True)
    coords = make_coords(1, p, [(hp, wp), (ht, wt)])[0]
    with poisoned(backend):
        got = mk.pairwise_mask_cost(pred, target, coords, backend=backend)
    assert_costs_match(got, pred, target, coords, seed)


# (Q, T, P): a single point / mask, and Q, T across the tile edges (triton 64 x 32; cuda 16
# wide, and P across it)
PAIRWISE_SIZES = {
    "triton": [(1, 1, 1), (70, 35, 130), (3, 2, 1)],
    "cuda": [(1, 1, 1), (70, 35, 130), (3, 2, 1), (17, 16, 33)],
}


@pytest.mark.parametrize("backend,q,t,p", per_backend(PAIRWISE_SIZES, ids=lambda b, c: f"{b}-{c[0]}-{c[1]}-{c[2]}"))
def test_pairwise_mask_cost_sizes(backend, q, t, p, seed):
    """Tile edges and single points and masks; a non-contiguous pred."""
    pred = (torch.randn(6, 5, q, device=DEVICE) * 3).permute(2, 0, 1)
    target = make_target("bool", t, 8, 9, padded=False)
    coords = make_coords(1, p, [(6, 5), (8, 9)])[0]
    with poisoned(backend):
        got = mk.pairwise_mask_cost(pred, target, coords, backend=backend)
    assert_costs_match(got, pred, target, coords, seed)


# ============================================================================ standard shapes (GPU)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", POINT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_standard_shapes_gpu(backend, dtype, seed):
    """docs/ops.md point-loss shapes: B=2, Q=100, pred 256^2, 30 targets per image at 1024^2,
    P=12544: the matcher cost per image, importance sampling and the loss on 60 matches."""
    module = op_module(backend, FAMILY)
    case = standard_point_loss_case(dtype)
    for i in range(case.b):
        pred, target = case.pred[i], case.target[i * case.t:(i + 1) * case.t]
        coords = torch.rand(case.p, 2, device=DEVICE)
        with poisoned(backend):
            got = mk.pairwise_mask_cost(pred, target, coords, backend=backend)
        assert_costs_match(got, pred, target, coords, seed)
    logits = case.pred[case.bidx, case.qidx]
    coords = module.uncertain_point_coords(logits, case.candidates, case.random, case.k)
    check_importance_points(coords, logits, case.candidates, case.random, case.k)
    indexed = module.uncertain_point_coords(case.pred, case.candidates, case.random, case.k, case.bidx, case.qidx)
    assert torch.equal(indexed, coords)

    num_masks = float(case.b * case.t)
    repeat = backend == "cuda"
    assert_loss_matches(backend, dtype, case.pred, case.target, coords, case.bidx, case.qidx, num_masks, seed, repeat)
    assert_loss_matches(backend, dtype, logits, case.target, coords, None, None, num_masks, seed, repeat)


# ============================================================================ triton internals
# Shared memory a program may opt into, bytes (CUDA programming guide, compute capabilities).
SMEM_LIMITS = {80: 166912, 86: 101376, 90: 232448}

# Matcher launch configs the sweep may pick (built when a test runs: the module may lack
# triton), the point count, and which split structure the case must reach.
PAIRWISE_CONFIG_CASES = {
    "one_split_many_steps": (lambda: tri.PairwiseConfig(16, 16, 16, programs=1), 100,
                             lambda splits, steps: splits == 1 and steps > 1),
    "more_splits_than_a_finish_step": (lambda: tri.PairwiseConfig(32, 32, 16, programs=4096), 530,
                                       lambda splits, steps: splits > tri_pairwise._FINISH_BLOCK_S),
    "tf32x3": (lambda: tri.PairwiseConfig(64, 32, 16, programs=8, precision="tf32x3"), 90,
               lambda splits, steps: True),
}

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repo root: bench/ lives here

# Runs in a fresh interpreter without TRITON_INTERPRET (this process's kernels are
# interpreted, not JITFunctions): bench/tools/triton_aot_dump.py records the launches that the
# real backend wrapper makes on CPU tensors, so each compile request carries the
# specialisation of a GPU launch (pointer dtypes, bool targets as u8, unit strides as
# constexpr 1, 16-divisible ints, num_warps / num_stages), not a hand-written signature.
_COMPILE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import bench.tools.triton_aot_dump as aot  # first: it unsets TRITON_INTERPRET before any kernel exists
import torch
from m2f_kernels.triton import point_loss as pl

launches = {}


def matcher_calls():
    # the matcher's call per image at the docs/ops.md shape: pred [Q=100, 256, 256] in each
    # dtype of the config table, 30 bool targets at 1024^2 (and fp32 targets, the largest
    # gathered tiles, for fp32 pred), P = 12544 shared points
    q, t, hp, ht, p = 100, 30, 256, 1024, 12544
    coords = torch.empty(p, 2)
    for dtype, config in pl.PAIRWISE_CONFIGS.items():
        for target_dtype in (torch.bool, torch.float32) if dtype == torch.float32 else (torch.bool,):
            name = f"{dtype}-{target_dtype}".replace("torch.", "")
            pred, target = torch.empty(q, hp, hp, dtype=dtype), torch.empty(t, ht, ht, dtype=target_dtype)
            launches["_pairwise_partial_kernel." + name] = {
                "config": repr(config), "num_warps": config.num_warps, "num_stages": config.num_stages,
                "estimate": pl.pairwise_smem_bytes(config, pred.element_size(), target.element_size())}
            with aot.tag(name):
                pl.pairwise_mask_cost(pred, target, coords)


results = aot.compile_launches([matcher_calls], json.loads(sys.argv[2]), kernels={"_pairwise_partial_kernel"}, jobs=2)
print(json.dumps([dict(r, **launches[r["name"]]) for r in results]))
"""


def _element_bytes(dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@requires_triton
class TestTriton:
    """The triton backend's launch configs: the split structures they reach, their shared
    memory, their compiled resources, and the in-place read of indexed logits."""

    @pytest.mark.parametrize("name", list(PAIRWISE_CONFIG_CASES))
    def test_pairwise_mask_cost_configs(self, name, seed):
        """Launch configs the sweep may pick: a program over many point steps, more splits
        than one finish step reduces, tensor-core dots."""
        make_config, p, covers = PAIRWISE_CONFIG_CASES[name]
        config = make_config()
        q, t = 19, 21
        grid, chunk = tri.pairwise_split(config, q, t, p)
        assert grid[2] * chunk >= p > (grid[2] - 1) * chunk and chunk % config.block_p == 0
        assert covers(grid[2], chunk // config.block_p)
        pred = torch.randn(q, 6, 7, device=DEVICE) * 3
        target = make_target("uint8", t, 9, 8, padded=True)
        coords = make_coords(1, p, [(6, 7), (9, 8)])[0]
        assert_costs_match(tri.pairwise_mask_cost(pred, target, coords, config=config), pred, target, coords, seed)

    def test_pairwise_configs_fit_shared_memory(self):
        """Every default matcher config fits sm_80, sm_86 and sm_90 for every pred and target
        dtype, by the estimate; the estimate covers the (64, 32, 64, num_stages=3) config that
        failed on an H200 with OutOfResources (239616 bytes of shared memory)."""
        old = tri.PairwiseConfig(64, 32, 64, 256, 8, num_stages=3)
        assert tri.pairwise_smem_bytes(old, 4, 4) >= 239616 > SMEM_LIMITS[90]  # the GPU's number
        assert set(tri.PAIRWISE_CONFIGS) == set(POINT_DTYPES)
        for dtype, config in tri.PAIRWISE_CONFIGS.items():
            for target_bytes in (1, 2, 4):
                need = tri.pairwise_smem_bytes(config, _element_bytes(dtype), target_bytes)
                for arch, limit in SMEM_LIMITS.items():
                    assert need <= limit, \
                        f"{config} for {dtype}, {target_bytes}-byte targets: {need} B > sm_{arch}'s {limit}"
            for block in (config.block_q, config.block_t, config.block_p):
                assert block >= 16 and block & (block - 1) == 0, f"{config}: tl.dot needs powers of 2 >= 16"
        for config in (tri.POINT_CONFIG, tri.LOSS_CONFIG):
            assert config.block_p & (config.block_p - 1) == 0

    @pytest.mark.slow
    def test_pairwise_default_compiles_within_shared_memory(self):
        """Compile the default matcher kernel for sm_80 and sm_90 (no GPU needed) exactly as the
        matcher launches it (bench/tools/triton_aot_dump.py; every pred dtype with bool targets,
        fp32 pred with fp32 targets): shared memory within the estimate and the limit, and no
        register spills (the (64, 32, 64, num_stages=3) config spilled 2.6 KB per thread)."""
        pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        archs = (80, 90)
        run = subprocess.run([sys.executable, "-c", _COMPILE, str(ROOT), json.dumps(archs)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        results = json.loads(run.stdout.strip().splitlines()[-1])
        # one compile per (pred dtype, target dtype, arch): a recorder that caught nothing fails here
        assert len(results) == (len(tri.PAIRWISE_CONFIGS) + 1) * len(archs), [r["name"] for r in results]
        for r in results:
            what = f"{r['name']} ({r['config']}) on sm_{r['arch']}"
            res, limit = r["resources"], SMEM_LIMITS[r["arch"]]
            assert (r["options"]["num_warps"], r["options"]["num_stages"]) == (r["num_warps"], r["num_stages"]), what
            assert 0 < res["shared"] <= r["estimate"] <= limit, \
                f"{what}: {res['shared']} B shared, estimate {r['estimate']}, limit {limit}"
            if "regs" in res:  # cuobjdump ships with Triton's NVIDIA backend
                assert res["stack"] == 0 and res["local"] == 0, \
                    f"{what} spills registers: {res['regs']} registers, {res['stack']} B stack, {res['local']} B local"

    def test_uncertain_point_coords_indexed_gathers_nothing(self):
        """The triton backend never indexes the logits (no [N, H, W] copy): aten.index is not called."""
        from torch.utils._python_dispatch import TorchDispatchMode

        class Ops(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.seen = set()

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.seen.add(str(func.overloadpacket))
                return func(*args, **(kwargs or {}))

        logits, bidx, qidx = make_indexed_logits(torch.float32, "contiguous")
        candidates, random = torch.rand(5, 12, 2, device=DEVICE), torch.rand(5, 3, 2, device=DEVICE)
        with Ops() as ops:
            tri.uncertain_point_coords(logits, candidates, random, 4, bidx, qidx)
        assert not any(name.startswith("aten.index") for name in ops.seen), sorted(ops.seen)
        with Ops() as ops:  # the check sees a gather where there is one
            ref.uncertain_point_coords(logits, candidates, random, 4, bidx, qidx)
        assert any(name.startswith("aten.index") for name in ops.seen), sorted(ops.seen)


# ============================================================================ reference vs loops


def loop_point_sample(inp: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """inp [N, C, H, W], coords [N, P, 2] -> [N, C, P]."""
    n_, c_, _, _ = inp.shape
    out = np.zeros((n_, c_, coords.shape[1]))
    for n, p in itertools.product(range(n_), range(coords.shape[1])):
        out[n, :, p] = bilinear(inp[n].transpose(1, 2, 0), *coords[n, p])
    return out


def loop_point_sample_transpose(grad_out: np.ndarray, shape, coords: np.ndarray) -> np.ndarray:
    """The adjoint of :func:`loop_point_sample`: scatter grad_out [N, C, P] onto [N, C, H, W]."""
    grad = np.zeros(shape)
    for n, p in itertools.product(range(shape[0]), range(coords.shape[1])):
        for row, col, w in corner_weights(shape[2], shape[3], *coords[n, p]):
            grad[n, :, row, col] += w * grad_out[n, :, p]
    return grad


def loop_uncertain(logits: np.ndarray, candidates: np.ndarray, random: np.ndarray, k: int) -> np.ndarray:
    """The k candidates with the smallest |sampled logit| (most uncertain first), then random."""
    rows = []
    for n in range(logits.shape[0]):
        certainty = [abs(float(bilinear(logits[n], *xy))) for xy in candidates[n]]
        order = sorted(range(len(certainty)), key=certainty.__getitem__)[:k]
        rows.append(np.concatenate([candidates[n, order], random[n]], axis=0))
    return np.stack(rows)


def loop_point_losses(pred: np.ndarray, target: np.ndarray, coords: np.ndarray, num_masks: float):
    """pred [N, Hp, Wp], target [N, Ht, Wt], coords [N, P, 2] -> (loss_bce, loss_dice)."""
    total_bce = total_dice = 0.0
    for n in range(pred.shape[0]):
        xs = [float(bilinear(pred[n], *xy)) for xy in coords[n]]
        ts = [float(bilinear(target[n], *xy)) for xy in coords[n]]
        total_bce += sum(bce(x, t) for x, t in zip(xs, ts)) / len(xs)
        total_dice += dice([sigmoid(x) for x in xs], ts)
    return total_bce / num_masks, total_dice / num_masks


def loop_pairwise_costs(pred: np.ndarray, target: np.ndarray, coords: np.ndarray):
    """pred [Q, Hp, Wp], target [T, Ht, Wt], coords [P, 2] -> (cost_bce, cost_dice) [Q, T]."""
    xs = [[float(bilinear(m, *xy)) for xy in coords] for m in pred]
    ts = [[float(bilinear(m, *xy)) for xy in coords] for m in target]
    cost_bce = np.zeros((len(xs), len(ts)))
    cost_dice = np.zeros((len(xs), len(ts)))
    for i, j in itertools.product(range(len(xs)), range(len(ts))):
        cost_bce[i, j] = sum(bce(x, t) for x, t in zip(xs[i], ts[j])) / len(coords)
        cost_dice[i, j] = dice([sigmoid(x) for x in xs[i]], ts[j])
    return cost_bce, cost_dice


def fresh_generator_seed() -> int:
    return int(torch.randint(0, 2**62, ()))


LOSS_CASES = {  # N, P, (Hp, Wp), (Ht, Wt)
    "general": (3, 7, (3, 4), (5, 6)),
    "same_resolution": (2, 6, (4, 3), (4, 3)),
    "one_point": (3, 1, (3, 4), (2, 5)),
    "one_mask": (1, 6, (3, 4), (6, 5)),
}
LOOP_TARGET_KINDS = ["float32", "bool", "uint8"]


class TestReferenceMatchesLoops:
    """The reference backend (through the public ops and their autograd) against float64
    loops written from the op contracts; gradients against central differences of the loops
    (point_sample's against its hand-written transpose)."""

    def test_oracle_bilinear(self):
        """The hand-written sampler itself: centres, borders, midpoints, outside."""
        img = np.arange(1.0, 7.0).reshape(2, 3)
        assert bilinear(img, 2.5 / 3, 0.25) == img[0, 2]
        assert bilinear(img, 0.0, 0.75) == 0.5 * img[1, 0]
        assert bilinear(img, 1.0, 1.0) == 0.25 * img[1, 2]
        assert math.isclose(bilinear(img, 1.0 / 3, 0.5), img.mean(axis=0)[:2].mean())
        assert bilinear(img, -0.2, 0.5) == 0.0 and bilinear(img, 0.5, 1.3) == 0.0

    # --- point_sample

    @pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
    def test_point_sample(self, contiguous):
        n, c, hh, ww = 2, 3, 3, 4
        inp = torch.randn(n, c, hh, ww, dtype=torch.float64)
        if not contiguous:
            inp = torch.randn(n, hh, ww, c, dtype=torch.float64).permute(0, 3, 1, 2)
        inp.requires_grad_()
        coords, outside = sample_coords(n, hh, ww)
        out = mk.point_sample(inp, coords, backend="reference")
        assert_close(out, torch.from_numpy(loop_point_sample(np64(inp), np64(coords))), EXACT)
        assert (out[:, :, outside] == 0).all()

        grad_out = torch.randn_like(out)
        (got,) = torch.autograd.grad(out, inp, grad_out)
        want = loop_point_sample_transpose(np64(grad_out), inp.shape, np64(coords))
        assert_close(got, torch.from_numpy(want), EXACT, "grad input")

    @pytest.mark.parametrize("dtype", LOW_PRECISION, ids=_dtype_id)
    def test_point_sample_dtypes(self, dtype):
        inp = torch.randn(2, 3, 3, 4, dtype=dtype)
        coords, _ = sample_coords(2, 3, 4, dtype=torch.float32)
        out = mk.point_sample(inp, coords, backend="reference")
        assert out.dtype == dtype
        assert_close(out, torch.from_numpy(loop_point_sample(np64(inp), np64(coords))), TOLERANCE[dtype])

    # --- uncertain_point_coords

    @pytest.mark.parametrize("indexed", [False, True], ids=["plain", "indexed"])
    @pytest.mark.parametrize("num_uncertain", [1, 5, 12])
    def test_uncertain_point_coords_op(self, num_uncertain, indexed):
        """indexed: logits [B, Q, H, W] with (batch, query) indices, repeated and out of order;
        the loop reads the same masks out of the numpy array."""
        candidates = torch.rand(3, 12, 2, dtype=torch.float64)
        random = torch.rand(3, 4, 2, dtype=torch.float64)
        if indexed:
            logits = torch.randn(2, 4, 5, 6, dtype=torch.float64)
            bi, qi = torch.tensor([1, 0, 1]), torch.tensor([3, 2, 3])
            out = torch.ops.m2f_kernels.uncertain_point_coords(logits, candidates, random, num_uncertain, bi, qi,
                                                               "reference")
            masks = np64(logits)[bi.numpy(), qi.numpy()]
        else:
            logits = torch.randn(3, 5, 6, dtype=torch.float64)
            out = torch.ops.m2f_kernels.uncertain_point_coords(logits, candidates, random, num_uncertain, None, None,
                                                               "reference")
            masks = np64(logits)
        want = loop_uncertain(masks, np64(candidates), np64(random), num_uncertain)
        assert out.shape == (3, num_uncertain + 4, 2)
        assert torch.equal(out, torch.from_numpy(want))

    def test_uncertain_point_coords_reproducible(self):
        logits = torch.randn(3, 8, 8)
        seed = fresh_generator_seed()
        draw = lambda s: mk.uncertain_point_coords(  # noqa: E731
            logits, 10, generator=torch.Generator().manual_seed(s), backend="reference")
        first = draw(seed)
        assert first.shape == (3, 10, 2) and first.dtype == torch.float32
        assert ((first >= 0) & (first <= 1)).all()
        assert torch.equal(first, draw(seed))
        assert not torch.equal(first, draw(seed + 1))

    @pytest.mark.parametrize(
        "num_points, oversample, ratio, num_candidates, num_uncertain",
        [(10, 3.0, 0.75, 30, 7), (7, 3.0, 0.75, 21, 5), (3, 1.5, 0.5, 4, 1), (10, 2.5, 0.0, 25, 0),
         (10, 3.0, 1.0, 30, 10)],
    )
    def test_uncertain_point_coords_counts(self, num_points, oversample, ratio, num_candidates, num_uncertain):
        """int() rounding of the candidate and uncertain counts; the public API draws the
        candidates, then the random points, from ``generator`` in logits' float dtype."""
        logits = torch.randn(2, 5, 6, dtype=torch.float64)
        seed = fresh_generator_seed()
        out = mk.uncertain_point_coords(logits, num_points, oversample, ratio,
                                        generator=torch.Generator().manual_seed(seed), backend="reference")
        g = torch.Generator().manual_seed(seed)
        candidates = torch.rand(2, num_candidates, 2, generator=g, dtype=torch.float64)
        random = torch.rand(2, num_points - num_uncertain, 2, generator=g, dtype=torch.float64)
        want = loop_uncertain(np64(logits), np64(candidates), np64(random), num_uncertain)
        assert out.shape == (2, num_points, 2)
        assert torch.equal(out, torch.from_numpy(want))

    # --- point_mask_loss

    @pytest.mark.parametrize("num_masks", [1, 2.5])
    @pytest.mark.parametrize("target_kind", LOOP_TARGET_KINDS)
    @pytest.mark.parametrize("case", LOSS_CASES.values(), ids=LOSS_CASES.keys())
    def test_point_mask_loss(self, case, target_kind, num_masks):
        n, npt, (hp, wp), (ht, wt) = case
        pred = torch.randn(n, hp, wp, dtype=torch.float64).mul_(2).requires_grad_()
        target = make_target(target_kind, n, ht, wt, device="cpu")
        coords = loss_coords(n, npt, hp, wp)
        loss_bce, loss_dice = mk.point_mask_loss(pred, target, coords, num_masks, backend="reference")
        assert loss_bce.shape == () and loss_bce.dtype == torch.float64
        pn, tn, cn = np64(pred), np64(target), np64(coords)
        want_bce, want_dice = loop_point_losses(pn, tn, cn, num_masks)
        assert_close(loss_bce, torch.tensor(want_bce, dtype=torch.float64), EXACT, "loss_bce")
        assert_close(loss_dice, torch.tensor(want_dice, dtype=torch.float64), EXACT, "loss_dice")

        a, b = torch.rand(2, dtype=torch.float64) + 0.5
        (got,) = torch.autograd.grad(a * loss_bce + b * loss_dice, pred)

        def loss():
            lb, ld = loop_point_losses(pn, tn, cn, num_masks)
            return float(a) * lb + float(b) * ld

        (want,) = fd_grads(loss, [pn])
        assert_close(got, torch.from_numpy(want), FD_TOL, "grad pred")

    def test_point_mask_loss_num_masks_normalisation(self):
        pred = torch.randn(3, 4, 4, dtype=torch.float64)
        target, coords = make_target("float32", 3, 5, 5, device="cpu"), loss_coords(3, 6, 4, 4)
        one = mk.point_mask_loss(pred, target, coords, 1, backend="reference")
        for num_masks in (0.5, 3, 7.25):
            scaled = mk.point_mask_loss(pred, target, coords, num_masks, backend="reference")
            for name, s, o in zip(("bce", "dice"), scaled, one):
                assert_close(s * num_masks, o, EXACT, f"loss_{name} * num_masks")

    @pytest.mark.parametrize("dtype", LOW_PRECISION, ids=_dtype_id)
    def test_point_mask_loss_dtypes(self, dtype):
        pred = torch.randn(3, 3, 4, dtype=dtype)
        target, coords = make_target("float32", 3, 5, 6, device="cpu"), loss_coords(3, 7, 3, 4).float()
        losses = mk.point_mask_loss(pred, target, coords, 2.0, backend="reference")
        want = loop_point_losses(np64(pred), np64(target), np64(coords), 2.0)
        for name, got, w in zip(("bce", "dice"), losses, want):
            assert got.dtype == torch.float32, "float32 losses whatever pred's dtype"
            assert_close(got, torch.tensor(w, dtype=torch.float64), TOLERANCE[dtype], f"loss_{name}")

    def test_point_mask_loss_indexed(self):
        """pred [B, Q, Hp, Wp] + pred_index equals the gathered form; a mask matched twice
        gets both gradients; unmatched masks get zero."""
        nb, nq, hp, wp = 2, 3, 3, 4
        batch_index = torch.tensor([0, 1, 1, 0])
        query_index = torch.tensor([2, 0, 2, 2])  # (0, 2) twice
        n, npt = len(batch_index), 5
        pred = torch.randn(nb, nq, hp, wp, dtype=torch.float64).requires_grad_()
        target, coords = make_target("bool", n, 5, 6, device="cpu"), loss_coords(n, npt, hp, wp)
        num_masks = 3.0
        indexed = mk.point_mask_loss(pred, target, coords, num_masks, pred_index=(batch_index, query_index),
                                     backend="reference")
        gathered = mk.point_mask_loss(pred[batch_index, query_index], target, coords, num_masks, backend="reference")
        gn, tn, cn = np64(pred[batch_index, query_index]), np64(target), np64(coords)
        want = loop_point_losses(gn, tn, cn, num_masks)
        for name, i, g, w in zip(("bce", "dice"), indexed, gathered, want):
            assert_close(i, torch.tensor(w, dtype=torch.float64), EXACT, f"loss_{name}")
            assert_close(i, g, EXACT, f"indexed vs gathered loss_{name}")

        (got,) = torch.autograd.grad(indexed[0] + 2 * indexed[1], pred)

        def loss():
            lb, ld = loop_point_losses(gn, tn, cn, num_masks)
            return lb + 2 * ld

        (want_sel,) = fd_grads(loss, [gn])
        want_grad = np.zeros(pred.shape)
        for row, (bi, qi) in enumerate(zip(batch_index.tolist(), query_index.tolist())):
            want_grad[bi, qi] += want_sel[row]
        assert_close(got, torch.from_numpy(want_grad), FD_TOL, "grad pred")
        assert not got[0, :2].any() and not got[1, 1:2].any()

    def test_point_mask_loss_no_masks(self):
        """N = 0 matched masks: both losses are 0, the gradient is zero, no error."""
        target, coords = torch.zeros(0, 5, 6, dtype=torch.bool), torch.rand(0, 4, 2)
        flat = torch.randn(0, 3, 4).requires_grad_()
        stacked = torch.randn(2, 3, 3, 4).requires_grad_()
        empty_index = (torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))
        for pred, pred_index in ((flat, None), (stacked, empty_index)):
            losses = mk.point_mask_loss(pred, target, coords, 1.0, pred_index=pred_index, backend="reference")
            assert all(loss.shape == () and loss.item() == 0 for loss in losses)
            (grad,) = torch.autograd.grad(losses[0] + losses[1], pred)
            assert grad.shape == pred.shape and not grad.any()

    # --- pairwise_mask_cost

    @pytest.mark.parametrize("target_hw", [(3, 5), (6, 4)], ids=["same_resolution", "other_resolution"])
    @pytest.mark.parametrize("target_kind", LOOP_TARGET_KINDS)
    @pytest.mark.parametrize("dtype", (torch.float64,) + LOW_PRECISION, ids=_dtype_id)
    def test_pairwise_mask_cost(self, dtype, target_kind, target_hw):
        nq, nt, (hp, wp) = 4, 3, (3, 5)
        pred = (torch.randn(nq, hp, wp) * 2).to(dtype)
        target = make_target(target_kind, nt, *target_hw, device="cpu")
        coords = loss_coords(1, 9, hp, wp)[0].to(torch.float64 if dtype == torch.float64 else torch.float32)
        cost_bce, cost_dice = mk.pairwise_mask_cost(pred, target, coords, backend="reference")
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        want_bce, want_dice = loop_pairwise_costs(np64(pred), np64(target), np64(coords))
        for name, got, want in (("cost_bce", cost_bce, want_bce), ("cost_dice", cost_dice, want_dice)):
            assert got.shape == (nq, nt) and got.dtype == out_dtype and got.is_contiguous()
            assert_close(got, torch.from_numpy(want), TOLERANCE[dtype], name)

    @pytest.mark.parametrize("nq, nt", [(0, 3), (4, 0), (0, 0)])
    def test_pairwise_mask_cost_empty(self, nq, nt):
        pred, target = torch.randn(nq, 3, 4, dtype=torch.float16), make_target("uint8", nt, 5, 5, device="cpu")
        for cost in mk.pairwise_mask_cost(pred, target, torch.rand(6, 2), backend="reference"):
            assert cost.shape == (nq, nt) and cost.dtype == torch.float32
