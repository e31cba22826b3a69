"""Reference batched linear sum assignment (the Hungarian matcher's solver). It is the spec.

Contract
--------
``linear_sum_assignment(cost, num_targets) -> assignment``

- ``cost``: ``[B, Q, T]`` floating tensor, one cost matrix per item (queries x targets).
  fp32 and fp64 are solved in fp64; fp16 and bf16 are accepted and solved as their exact
  fp32/fp64 values.
- ``num_targets``: ``[B]`` int64 on cost's device: the valid target columns of each matrix.
  Columns ``t >= num_targets[b]`` are padding: their entries are never read for the result.
  Values are clamped to ``[0, T]``.
- ``assignment``: ``[B, T]`` int64 on cost's device. ``assignment[b, t]`` is the query
  (row) matched to target ``t``, or -1 when target ``t`` is padding or unmatched. Matched
  queries are distinct within a matrix.

With ``T_b = num_targets[b]``:

- ``T_b <= Q``: every valid target gets a distinct query, and the total cost is minimal
  (the optimum of ``scipy.optimize.linear_sum_assignment(cost[b, :, :T_b])``).
- ``T_b > Q``: ``Q`` valid targets get distinct queries, the other ``T_b - Q`` get -1, and
  the total cost is minimal (scipy's optimum on the rectangular matrix).
- Ties: any optimal assignment may come back (it need not be scipy's).
- ``+inf``: a pair that must not be matched unless unavoidable. Each matrix's ``+inf``
  entries are replaced by ``+P`` and ``-inf`` entries by ``-P``, with
  ``P = (2 n + 1) F`` (``F`` the largest finite ``|cost|`` of the matrix's valid entries,
  ``n = min(T_b, Q)`` the number of matched pairs; ``P = 1`` when ``F = 0``). ``P`` exceeds
  any difference between the finite parts of two assignments, so the solver minimises
  ``(number of +inf pairs) - (number of -inf pairs)`` first and the finite total cost
  second. Consequences: when an assignment without ``+inf`` pairs exists (scipy finds one),
  the result is scipy's optimum; when none exists (scipy raises "cost matrix is
  infeasible"), the result is still a full valid assignment, with as few ``+inf`` pairs as
  possible and, among those, the smallest finite cost; a ``-inf`` pair is taken whenever
  the others allow it (scipy rejects ``-inf``).
- ``NaN``: the result is unspecified, but it is always a valid index set (distinct queries,
  -1 exactly where the rules above put it, no hang). This implementation, and the cuda
  backend, treat NaN as ``+inf``. Callers that want an error check ``isnan`` themselves
  (the public op offers an opt-in check: it costs a host sync).
- Finite fp64 entries must stay below ~1e300 in magnitude (``P`` must stay finite).
- No autograd: the result is an integer index tensor.

Algorithm
---------
Shortest augmenting paths with dual variables (Jonker-Volgenant as in Crouse 2016, the
algorithm of ``scipy.optimize.linear_sum_assignment``), on the orientation with no more
rows than columns: rows = targets when ``T_b <= Q``, rows = queries when ``T_b > Q``. One
augmentation per row; each augmentation is a Dijkstra search over reduced costs
``cost[i, j] - u[i] - v[j]`` that ends at the first free column, then updates the duals and
flips the matches along the path. The arithmetic is fp64 (fp32 costs are exact there), as
scipy's, so the total cost matches scipy's to rounding.

The batch and the columns are vectorised with torch ops; Python loops over the rows
(``min(Q, T)``) and over the steps of each search and each path flip (at most ``row + 1``
each). On a CPU tensor the loops stop as soon as every matrix has finished (reading a CPU
bool costs no device sync); on any other device they run their full bound with masks, so a
call makes no host sync at all (about ``min(Q, T)^2`` masked steps of ~25 small ops each).
The state is ``[B, min(Q, T), max(Q, T)]`` fp64 (the oriented cost matrix) plus
``O(B max(Q, T))`` vectors. Needs fp64 support on the device (not MPS).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["linear_sum_assignment"]


def linear_sum_assignment(cost: torch.Tensor, num_targets: torch.Tensor,
                          early_exit: Optional[bool] = None) -> torch.Tensor:
    """The query matched to each target: ``[B, T]`` int64, -1 for padded / unmatched targets.

    ``early_exit``: stop the loops once every matrix is done (host reads of loop flags);
    default: on CPU tensors only. The result does not depend on it.
    """
    if cost.dim() != 3:
        raise ValueError(f"linear_sum_assignment: cost must be [B, Q, T], got shape {tuple(cost.shape)}")
    if not cost.is_floating_point():
        raise TypeError(f"linear_sum_assignment: cost must be floating, got {cost.dtype}")
    B, Q, T = cost.shape
    if num_targets.shape != (B,):
        raise ValueError(f"linear_sum_assignment: num_targets must be [B] = [{B}], got {tuple(num_targets.shape)}")
    device = cost.device
    if early_exit is None:
        early_exit = device.type == "cpu"
    if B == 0 or Q == 0 or T == 0:
        return torch.full((B, T), -1, dtype=torch.int64, device=device)

    nt = num_targets.to(device=device, dtype=torch.int64).clamp(0, T)
    flip = nt > Q                      # rows = queries, columns = targets
    n_rows = nt.clamp(max=Q)           # min(T_b, Q): rows augmented = pairs matched
    n_cols = nt.clamp(min=Q)           # max(T_b, Q)
    c = _sanitized(cost.to(torch.float64), nt, n_rows)

    # The oriented matrix [B, R, C], R = min(Q, T) rows, C = max(Q, T) columns.
    ct = c.transpose(1, 2)  # [B, T, Q]: rows = targets
    if T <= Q:  # T_b <= T <= Q: never flipped
        m = ct.contiguous()
    else:       # R = Q, C = T; unflipped matrices use their first Q targets (T_b <= Q)
        m = torch.where(flip[:, None, None], c, F.pad(ct[:, :Q, :], (0, T - Q)))
    col4row, row4col = _solve(m, n_rows, n_cols, early_exit)

    if T <= Q:
        return col4row
    unflipped = torch.cat([col4row, col4row.new_full((B, T - Q), -1)], dim=1)
    return torch.where(flip[:, None], row4col, unflipped)


def _sanitized(c: torch.Tensor, nt: torch.Tensor, n_rows: torch.Tensor) -> torch.Tensor:
    """fp64 costs with +inf / NaN -> +P and -inf -> -P per matrix (see the module docstring)."""
    T = c.shape[2]
    valid = (torch.arange(T, device=c.device) < nt[:, None])[:, None, :]  # [B, 1, T]
    finite = torch.isfinite(c)
    f = torch.where(finite & valid, c.abs(), 0.0).amax(dim=(1, 2))  # [B]
    p = torch.where(f > 0, (2 * n_rows + 1).to(c.dtype) * f, torch.ones_like(f))[:, None, None]
    return torch.where(finite, c, torch.where(c == float("-inf"), -p, p))


def _solve(m: torch.Tensor, n_rows: torch.Tensor, n_cols: torch.Tensor,
           early_exit: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rectangular LSA of each ``m[b, :n_rows[b], :n_cols[b]]`` (n_rows <= n_cols).

    Returns (col4row [B, R], row4col [B, C]) int64, -1 where unmatched. With ``early_exit``
    the loops stop when every matrix is done and the search state shrinks to the matrices
    still searching (host reads of CPU flags); without it every loop runs its bound with
    masks and nothing is read on the host. The hot loop uses only elementwise ops,
    ``amin`` and small gathers (no ``where`` / ``min(dim)`` over [B, C]: slow on CPUs).
    """
    B, R, C = m.shape
    device, dt = m.device, m.dtype
    inf = float("inf")
    m_rows = m.reshape(B * R, C)
    col_idx = torch.arange(C, device=device)
    blocked0 = torch.zeros(B, C, dtype=dt, device=device).masked_fill_(col_idx >= n_cols[:, None], inf)
    u = m.new_zeros(B, R)
    v = m.new_zeros(B, C)
    col4row = torch.full((B, R), -1, dtype=torch.int64, device=device)
    row4col = torch.full((B, C), -1, dtype=torch.int64, device=device)

    for cur in range(R):
        # The matrices that augment row `cur`: the active ones, or all of them with a mask.
        if early_exit:
            g = (n_rows > cur).nonzero()[:, 0]
            if g.numel() == 0:
                break
            searching = torch.ones(g.numel(), dtype=torch.bool, device=device)
        else:
            g = torch.arange(B, device=device)
            searching = n_rows > cur
        A = g.numel()
        a_idx = torch.arange(A, device=device)
        owner = row4col.index_select(0, g)  # [A, C]: the row matched to each column, -1 if free

        # Dijkstra from row `cur` over reduced costs; ends at the first free column (sink).
        # The search state of the matrices at positions `pos` of 0..A-1 (all of them, or
        # fewer once shrunk): shortest path costs, the step that last improved each, +inf
        # on scanned and padded columns, the search's current minimum, its sink, its row.
        # code: the column index, + C for matched columns (the lowest code prefers a free one).
        pos = a_idx
        s_g, s_v = g, v.index_select(0, g)
        s_code = col_idx + C * (owner >= 0)
        s_spc = torch.full((A, C), inf, dtype=dt, device=device)
        s_step = torch.zeros(A, C, dtype=torch.int64, device=device)
        s_blocked = blocked0.index_select(0, g)
        s_min = m.new_zeros(A)
        s_sink = torch.full((A,), -1, dtype=torch.int64, device=device)
        i = torch.full((A,), cur, dtype=torch.int64, device=device)
        rows_seq = torch.full((A, cur + 1), cur, dtype=torch.int64, device=device)  # row scanned per step
        result = None  # (spc, step_of, min_val, sink) over all A, once shrunk
        # Each non-final step reaches a matched row (at most `cur` of them): cur + 1 steps.
        for step in range(cur + 1):
            if early_exit:
                n_searching = int(searching.sum())
                if n_searching == 0:
                    break
                if 2 * n_searching <= searching.numel():  # shrink to the searching matrices
                    result = _merged(result, pos, (s_spc, s_step, s_min, s_sink))
                    keep = searching.nonzero()[:, 0]
                    pos, s_g, s_v, s_code, s_spc, s_step, s_blocked, s_min, s_sink, i = (
                        t.index_select(0, keep) for t in
                        (pos, s_g, s_v, s_code, s_spc, s_step, s_blocked, s_min, s_sink, i))
                    searching = searching.index_select(0, keep)
            rows_seq[pos, step] = i
            # Reduced costs of row i; +inf on scanned / padded columns and finished matrices.
            offset = torch.where(searching, s_min - u[s_g, i], inf)
            r = (m_rows.index_select(0, s_g * R + i) - s_v) + (s_blocked + offset[:, None])
            s_step = torch.maximum(s_step, (r < s_spc) * step)
            s_spc = torch.minimum(s_spc, r)
            key = s_spc + s_blocked
            lowest = key.amin(dim=1)
            # The lowest column, a free one first (it ends the search), then the lowest index.
            j = (s_code + (key > lowest[:, None]) * (2 * C)).amin(dim=1) % C
            row = owner[pos, j]
            free = row < 0
            s_min = torch.where(searching, lowest, s_min)
            n = torch.arange(j.numel(), device=device)
            s_blocked[n, j] = torch.where(searching, inf, s_blocked[n, j])
            s_sink = torch.where(searching & free, j, s_sink)
            i = torch.where(searching & ~free, row, i)
            searching = searching & ~free
        spc, step_of, min_val, sink = _merged(result, pos, (s_spc, s_step, s_min, s_sink))

        # Duals: u[cur] += min_val; for each scanned column j, delta = min_val - spc[j] >= 0:
        # v[j] -= delta, and its row u += delta. Unscanned columns have spc >= min_val (inf
        # where never reached), so the clamp gives them 0, as the sink (spc = min_val); the
        # scatter may add those zeros to row 0.
        delta = (min_val[:, None] - spc).clamp_(min=0.0)
        if A == B:
            v -= delta
            u.scatter_add_(1, owner.clamp(min=0), delta)
            u[:, cur] += min_val  # 0 where inactive
        else:
            v[g] = v.index_select(0, g) - delta
            ug = u.index_select(0, g)
            ug.scatter_add_(1, owner.clamp(min=0), delta)
            ug[:, cur] += min_val
            u[g] = ug

        # Flip the matches along the path sink -> ... -> cur (at most cur + 1 columns).
        j = sink
        going = sink >= 0
        for _ in range(cur + 1):
            if early_exit and not bool(going.any()):
                break
            jj = j.clamp(min=0)
            pi = rows_seq[a_idx, step_of[a_idx, jj]]
            row4col[g, jj] = torch.where(going, pi, row4col[g, jj])
            prev = col4row[g, pi]
            col4row[g, pi] = torch.where(going, jj, prev)
            j = prev
            going = going & (pi != cur)
    return col4row, row4col


def _merged(result, pos, state):
    """The search state of all matrices: ``state`` (of the matrices ``pos``) written into
    ``result``, or ``state`` itself while no matrix has been dropped yet."""
    if result is None:
        return state
    for res, t in zip(result, state):
        res[pos] = t
    return result
