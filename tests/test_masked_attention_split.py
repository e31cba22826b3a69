"""masked_attention, triton backend: the key-split forward, whose last program to arrive per
row block merges the splits (one launch; see m2f_kernels/triton/_masked_attention_kernels.py).

Split counts are forced through ``MaskedAttentionConfig.kb_per_split``; out and lse are
compared with backend='reference'. On the CPU (TRITON_INTERPRET=1) programs run one after
another, so the last arrival is always the last split: these tests check the merge, the
counters' reuse and the launch count, not the memory ordering (bench/notes/masked_attention.md,
"Checking on a GPU", says what a GPU run must confirm).
"""
from __future__ import annotations

import pytest
import torch

from ._inputs import assert_close_floored, make_mask, make_qkv, reference_attention, standard_mask
from .conftest import DEVICE, TOLERANCE, poisoned_empty, requires_gpu, requires_triton
from .test_op_masked_attention import count_launches

try:
    from m2f_kernels.triton import masked_attention as tri
except ImportError:  # no triton: everything skips (requires_triton)
    tri = None

pytestmark = [
    requires_triton,
    pytest.mark.usefixtures("seed"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]


def _splits(n_keys: int, cfg) -> int:
    return -(-(-(-n_keys // cfg.block_n)) // cfg.kb_per_split)


def _fwd(q, k, v, mask, scale, cfg):
    with poisoned_empty():  # out, lse and the partials start as NaN: nothing is left unwritten
        return tri.masked_attention_fwd(q.detach(), k.detach(), v.detach(), mask, scale, config=cfg)


def _check(got, q, k, v, mask, scale, dtype):
    B, H, Q, _ = q.shape
    want = reference_attention(q, k, v, mask, scale, torch.zeros(B, H, Q, v.shape[3], device=DEVICE))
    assert_close_floored(got[0], want[0], TOLERANCE[dtype], "out")
    assert_close_floored(got[1], want[1], TOLERANCE[dtype], "lse")


def _counters_zero() -> bool:
    return all(bool((buf == 0).all()) for buf in tri._FWD_COUNTERS.values())


# (block_q, block_n, kb_per_split) with N=83 keys: 2, 3 and 6 splits; Q=37 gives 3 / 1 query
# blocks, so several row blocks (several counters) merge independently.
SPLIT_CONFIGS = {
    "2splits": (16, 16, 3),
    "3splits": (64, 16, 2),
    "6splits": (16, 16, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("kind", ["bool", "logits"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("name", list(SPLIT_CONFIGS))
def test_split_forward_matches_reference(name, per_head, kind, dtype):
    """out and lse equal the reference for several split counts, bool and logits masks, masks
    shared by the heads or per head (make_mask adds empty rows, one-visible-key rows and
    all-visible rows); the counters are zero afterwards."""
    block_q, block_n, kb = SPLIT_CONFIGS[name]
    cfg = tri.MaskedAttentionConfig(block_q=block_q, block_n=block_n, kb_per_split=kb)
    B, H, Q, N, D = 2, 2, 37, 83, 16
    assert _splits(N, cfg) == int(name[0])
    q, k, v = make_qkv(B, H, Q, N, D, dtype)
    mask = make_mask(B, H, Q, N, kind, per_head, dtype)
    _check(_fwd(q, k, v, mask, D ** -0.5, cfg), q, k, v, mask, D ** -0.5, dtype)
    assert _counters_zero()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_visible_keys_in_one_split_only(dtype):
    """Rows whose visible keys all lie in one split (the first, a middle one, the last one)
    or in two take those splits alone: the all-keys partials merged before the first such
    split are dropped, those after it ignored. Empty rows merge every split's all-keys
    partial. 19 splits; the merge takes the 64-row block in 8-row steps (D=128)."""
    cfg = tri.MaskedAttentionConfig(block_q=64, block_n=16, kb_per_split=1, num_warps=2)
    B, H, Q, N, D = 1, 2, 12, 300, 128
    assert _splits(N, cfg) == 19
    assert tri._combine_step_rows(cfg.block_q, D, cfg.num_warps) == 8
    q, k, v = make_qkv(B, H, Q, N, D, dtype)
    mask = torch.ones(B, Q, N, dtype=torch.bool, device=DEVICE)
    for row, split in enumerate((0, 7, 15, 16, 18)):  # split 18: keys 288-299
        mask[0, row, split * 16 + 3] = False
        mask[0, row, split * 16 + 11 if split < 18 else 299] = False
    mask[0, 5, [3, 290]] = False  # first and last split
    mask[0, 6, [17 * 16 + 5, 8 * 16]] = False  # two middle splits
    # rows 7, 8: empty; rows 9-11: random
    mask[0, 9:] = torch.rand(3, N, device=DEVICE) < 0.7
    _check(_fwd(q, k, v, mask, 0.3, cfg), q, k, v, mask, 0.3, dtype)


def test_repeated_calls_reuse_the_counters(monkeypatch):
    """The counters are zeroed by the programs that merge, so calls reuse them without a
    launch: equal results call after call (bit for bit), across split counts and grids, and
    a grid larger than the buffer replaces it once (zeroed)."""
    B, H, Q, N, D = 1, 2, 20, 100, 16
    q, k, v = make_qkv(B, H, Q, N, D, torch.float32)
    mask = make_mask(B, H, Q, N, "bool", False)
    cfgs = [tri.MaskedAttentionConfig(block_q=16, block_n=16, kb_per_split=s) for s in (1, 3, 1)]
    first = [_fwd(q, k, v, mask, 0.25, cfg) for cfg in cfgs]
    assert _counters_zero()
    again = [_fwd(q, k, v, mask, 0.25, cfg) for cfg in cfgs]
    for (o1, l1), (o2, l2) in zip(first, again):
        assert torch.equal(o1, o2) and torch.equal(l1, l2)
    _check(again[-1], q, k, v, mask, 0.25, torch.float32)

    key = (torch.device(DEVICE).type, None)
    if DEVICE == "cpu":  # the interpreter's buffer: force a regrowth on the next call
        monkeypatch.setattr(tri, "_MIN_COUNTERS", 1)
        tri._FWD_COUNTERS[key] = torch.zeros(1, dtype=torch.int32)
        out, lse = _fwd(q, k, v, mask, 0.25, cfgs[0])
        assert tri._FWD_COUNTERS[key].numel() == B * H * 2  # B * H * query blocks
        assert torch.equal(out, first[0][0]) and torch.equal(lse, first[0][1])
        assert _counters_zero()


def test_forward_is_one_launch(monkeypatch):
    """Split or not, the forward is one launch (the merge is fused); the counters need none."""
    B, H, Q, N, D = 1, 2, 10, 50, 16
    q, k, v = make_qkv(B, H, Q, N, D, torch.float32)
    mask = make_mask(B, H, Q, N, "bool", False)
    for kb in (1, 100):
        cfg = tri.MaskedAttentionConfig(block_q=16, block_n=16, kb_per_split=kb)
        _fwd(q, k, v, mask, 0.25, cfg)  # buffers exist
        launched = count_launches(monkeypatch)
        _fwd(q, k, v, mask, 0.25, cfg)
        assert launched == ["_fwd_kernel"]
        monkeypatch.undo()


def test_split_forward_register_cap():
    """The chosen config caps the registers of a split forward launch at what the rules'
    programs per SM leave (the fused merge would raise them: bench/notes/masked_attention.md),
    never below 128; unsplit forwards and the backward keep ptxas's choice."""
    def cfg(backward, nq, nk, d, fp32, sms=132):
        return tri._config_for_shape(backward, 16, nq, nk, d, d, fp32, sms, tri.rules_for(backward, fp32))

    assert cfg(False, 100, 16384, 32, True).maxnreg == 168  # 3 programs of 4 warps per SM
    assert cfg(False, 100, 16384, 32, False).maxnreg == 128  # 2 programs of 8 warps
    assert cfg(False, 100, 16384, 128, True).maxnreg == 0  # 2 programs of 4 warps: no cap
    assert cfg(False, 100, 16384, 32, False, sms=4).kb_per_split == 512  # one split
    assert cfg(False, 100, 16384, 32, False, sms=4).maxnreg == 0
    assert cfg(True, 100, 16384, 32, False).maxnreg == 0
    four = tri.MaskedAttentionRules(block_q_max=128, block_n=32, num_stages=3, programs_per_sm=4)
    assert tri._config_for_shape(False, 16, 100, 16384, 32, 32, False, 132, four).maxnreg == 0  # 64: none


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_many_splits_stress_gpu(dtype):
    """GPU stress of the arrival counters' memory ordering: 512 splits per row block (one
    16-key tile each) at the standard shape, 64 row blocks merging at once, 50 calls in a row
    without a sync. A merge that read a partial before its release would differ from call to
    call (the merge order is fixed, so correct calls agree bit for bit) and from the
    reference; the counters are zero afterwards."""
    B, H, Q, N, D = 2, 8, 100, 8192, 32
    cfg = tri.MaskedAttentionConfig(block_q=64, block_n=16, kb_per_split=1, num_warps=4, num_stages=3)
    q, k, v = (t.detach() for t in make_qkv(B, H, Q, N, D, dtype))
    mask = standard_mask(B, Q, N, "bool", dtype, DEVICE)
    runs = [tri.masked_attention_fwd(q, k, v, mask, D ** -0.5, config=cfg) for _ in range(50)]
    torch.cuda.synchronize()
    for out, lse in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])
    _check(runs[0], q, k, v, mask, D ** -0.5, dtype)
    assert _counters_zero()
