"""``LossDict``: a model's named scalar losses, with their sum made cheaply when they come stacked.

The official criterion returns ``{"loss_ce", "loss_mask", "loss_dice"}`` for the final
prediction and ``"<name>_<i>"`` for each auxiliary prediction i; the trainer weights each
entry and adds them up. The static criterion computes every term for all L predictions at
once, [L] vectors. Weighting and adding 3 L scalars one at a time costs a multiply and an add
per entry, and in the backward a multiply, a scatter of the entry's gradient into its
vector (two kernels) and an accumulation: ~180 kernel launches a step for 30 numbers.
A ``LossDict`` made by :meth:`LossDict.from_terms` keeps the [terms, L] stack beside its
entries (views of it): :meth:`weighted` scales it with one multiply per term and
:func:`total_loss` sums it in one op whose backward touches no entry alone.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.utils._pytree


class LossDict(dict):
    """A dict of scalar losses. ``terms`` = (names, [L] vectors) and ``stacked`` = their
    [terms, L] stack when every entry is a view of it (:meth:`from_terms`); else both None and
    it is a plain dict."""

    terms: Optional[Tuple[Tuple[str, ...], Tuple[torch.Tensor, ...]]] = None
    stacked: Optional[torch.Tensor] = None

    @classmethod
    def from_terms(cls, names: Sequence[str], vectors: Sequence[torch.Tensor]) -> "LossDict":
        """Entries ``<name>`` = ``vector[0]`` (the final prediction) and ``<name>_<i>`` =
        ``vector[i + 1]`` (auxiliary prediction i), for each name and [L] vector."""
        stacked = torch.stack(list(vectors))
        out = cls({_entry(name, i): stacked[j, i] for i in range(stacked.shape[1]) for j, name in enumerate(names)})
        out.terms, out.stacked = (tuple(names), tuple(vectors)), stacked
        return out

    def weighted(self, weights: Dict[str, float]) -> "LossDict":
        """Each entry times ``weights[entry name]``; entries without a weight are left out (the
        official trainer's rule). From terms with one weight each across their predictions,
        the result is made from terms too."""
        if self.terms is not None:
            names, vectors = self.terms
            per_term = [{weights.get(_entry(name, i)) for i in range(len(vector))} for name, vector in zip(names, vectors)]
            if all(len(w) == 1 for w in per_term):
                kept = [(name, vector * w) for name, vector, (w,) in zip(names, vectors, per_term) if w is not None]
                if kept:
                    return LossDict.from_terms(*zip(*kept))
        return LossDict({k: v * weights[k] for k, v in self.items() if k in weights})


# A dict to pytree (DDP's output pass-through, torch.utils._pytree.tree_map, ...): its entries
# are the leaves; what comes back is a LossDict without terms (summed entry by entry).
torch.utils._pytree.register_pytree_node(
    LossDict, lambda d: (list(d.values()), list(d.keys())), lambda values, keys: LossDict(zip(keys, values)),
    serialized_type_name="m2f.loss_dict.LossDict")


def _entry(name: str, prediction: int) -> str:
    """The official key of a term of prediction 0 (the final one) or 1 + i (auxiliary i)."""
    return name if prediction == 0 else f"{name}_{prediction - 1}"


def total_loss(losses: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum(losses.values())``; of a :class:`LossDict` made from terms, its stack's sum (one op)."""
    stacked = getattr(losses, "stacked", None)
    return stacked.sum() if stacked is not None else sum(losses.values())
