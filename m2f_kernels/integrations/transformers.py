"""Hugging Face transformers' Mask2Former and EoMT on m2f_kernels (the Liger-Kernel convention).

    from m2f_kernels.integrations.transformers import apply_m2f_kernels_to_mask2former

    apply_m2f_kernels_to_mask2former()          # before building: patches the HF classes
    model = Mask2FormerForUniversalSegmentation.from_pretrained(...)
    # or, for a model that exists already:
    apply_m2f_kernels_to_mask2former(model=model)
    # EoMT (EomtForUniversalSegmentation): its matcher and mask losses, the same way
    apply_m2f_kernels_to_eomt(model=eomt_model)

Mask2Former: three switches, each independent:

- ``ms_deform_attn``: the pixel decoder's
  ``Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention`` runs
  :func:`m2f_kernels.ms_deform_attn` with the attention softmax fused into the op (the
  official module's forward, :class:`m2f_kernels.nn.MSDeformAttn`); the module function
  ``multi_scale_deformable_attention`` is swapped too (class-level patch only).
- ``masked_attention``: the decoder's cross-attention (an ``nn.MultiheadAttention``) runs
  :func:`m2f_kernels.masked_attention` on the same parameters, and
  ``Mask2FormerMaskPredictor`` returns the blocked-key mask once per image, [B, Q, N],
  instead of repeated per head, [B*heads, Q, N]. The fully-masked-row rule holds: HF's
  decoder applies it to the mask and the op applies it again.
- ``point_loss``: ``Mask2FormerHungarianMatcher`` takes its mask costs from
  :func:`m2f_kernels.pairwise_mask_cost` and solves them with
  :func:`m2f_kernels.linear_sum_assignment` on the device (one call per prediction, as HF
  calls the matcher; no scipy, no host sync unless an image has more targets than queries),
  and ``Mask2FormerLoss.loss_masks`` from
  :func:`m2f_kernels.uncertain_point_coords` + :func:`m2f_kernels.point_mask_loss`, which
  both take the [B, Q, H, W] logits with the matched indices (``pred_index``). ``sample_point``,
  ``pair_wise_*`` and ``sample_points_using_uncertainty`` are then no longer called.

EoMT (``apply_m2f_kernels_to_eomt`` / ``revert_m2f_kernels_to_eomt``, same arguments and
rules): one switch, ``point_loss``. transformers' ``EomtHungarianMatcher`` and ``EomtLoss``
are Mask2Former's matcher and criterion under another name (same methods, same code), so
the same fused classes serve them; the model computes this loss for each of its
``num_blocks`` intermediate predictions and the final one. EoMT has no deformable attention
and no decoder cross-attention. Its masked attention (the last ``num_blocks`` ViT layers) is
not patched, as it is no clean fit for :func:`m2f_kernels.masked_attention`: it is
self-attention over all tokens (queries, prefix and patch tokens) where only the
query-to-patch block is masked, and ``EomtForUniversalSegmentation.forward`` builds the mask
itself as an additive float [B, heads, L, L] tensor for the config's attention function
(SDPA by default, already one fused kernel with that mask). Using the op would need either
a second copy of that forward (to hand over a [B, Q, N] bool mask) or turning HF's float
mask back into a bool one after it has been built, for attention that already runs fused.

Patched modules are instances of fused subclasses of the HF classes: parameters,
buffers, state_dict keys and ``isinstance`` checks are unchanged. Random points are
drawn as HF draws them (same calls, same order), so a seeded step samples the same
points with and without the patch. Differences: with ``output_attentions=True`` the
deformable attention runs HF's own path (it returns the attention weights, which the
fused op never forms) and the cross-attention weights are None. With ``config.dropout > 0``
the cross-attention runs ``nn.MultiheadAttention``'s own forward in training (the op has no
attention dropout; same dropout draws as HF) and the fused op in eval (HF also takes
``config.dropout`` as the decoder's layer drop, and a dropped layer other than the last
leaves the next one the previous level's mask: HF's model raises then, patched or not). Under
``torch.autocast`` the matcher's mask costs are float32 where HF's matmuls run in the
autocast dtype (a seeded step can match differently from HF's: as HF matches in float32).

Only modules whose class is exactly the HF class are patched (a user subclass is left
alone). Tested with transformers 5.17.0 and 5.24.0; another version whose Mask2Former
(or EoMT) differs where the patch relies on it gets :class:`UnsupportedTransformersError`.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import ms_deform_attn_core_pytorch
from ..nn.masked_attention import MaskedMultiheadAttention
from ..nn.ms_deform_attn import MSDeformAttn, level_index
from ..ops.assignment import linear_sum_assignment
from ..ops.point_loss import pairwise_mask_cost, point_mask_loss, uncertain_point_coords

__all__ = [
    "apply_m2f_kernels_to_mask2former", "revert_m2f_kernels_to_mask2former", "apply_m2f_kernels_to_eomt",
    "revert_m2f_kernels_to_eomt", "UnsupportedTransformersError", "TESTED_VERSIONS",
]

TESTED_VERSIONS = ("5.17.0", "5.24.0")


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers' Mask2Former (or EoMT) is not the one this patch was written for."""


# ----------------------------------------------------------------------------- fused classes
class _Fused:
    """Mixin of every fused subclass; ``_m2f_base`` is the HF class it stands in for."""

    _m2f_base: type

    def _m2f_swap_children(self, fused: bool) -> None:
        """Patch (``fused``) or restore the child modules this module's patch owns."""


class _FusedDeformableAttention(_Fused):
    """``Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention`` with the fused op."""

    _attend = MSDeformAttn._attend  # the core that MSDeformAttn.forward calls

    def forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                position_embeddings=None, reference_points=None, spatial_shapes_list=None, level_start_index=None,
                output_attentions=False):
        if output_attentions:  # HF returns the softmaxed weights, which the fused op never forms
            return super().forward(hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                   position_embeddings, reference_points, spatial_shapes_list, level_start_index,
                                   output_attentions)
        query = hidden_states if position_embeddings is None else hidden_states + position_embeddings
        # HF builds a new level_start_index each forward: one pair per layout is checked once
        shapes, starts = level_index(spatial_shapes_list, hidden_states.device,
                                     self.__dict__.setdefault("_m2f_levels", {}))
        # HF's module has the official parameter and attribute names, so the official forward applies
        out = MSDeformAttn.forward(self, query, reference_points, encoder_hidden_states, shapes, starts,
                                   attention_mask)
        return out, None


class FusedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose forward is :func:`m2f_kernels.masked_attention`.

    Set on an existing instance by swapping its class (parameters stay where they are).
    Masks as :class:`m2f_kernels.nn.masked_attention.MaskedMultiheadAttention` takes them
    (bool True = blocked; [B*heads, Q, N], [B, Q, N] or [B, heads, Q, N]). Returns
    (out [Q, B, C], None): the attention weights are never formed.
    """

    backend: Optional[str] = None  # the current default backend

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if is_causal:
            raise NotImplementedError("the fused masked attention takes an explicit attn_mask, not is_causal")
        if self.training and self.dropout > 0:  # the op has no attention dropout: nn.MultiheadAttention's own
            return super().forward(query, key, value, key_padding_mask, need_weights,
                                   self._per_head_mask(attn_mask, query.shape[1]), average_attn_weights)
        return MaskedMultiheadAttention.forward(self, query, key, value, attn_mask=attn_mask,
                                                key_padding_mask=key_padding_mask)

    def _per_head_mask(self, attn_mask: Optional[torch.Tensor], batch: int) -> Optional[torch.Tensor]:
        """``attn_mask`` (any form this class takes) as nn.MultiheadAttention takes a bool mask
        ([Q, N] or [B*heads, Q, N], True = blocked), with the op's rule: a row that blocks
        every key blocks none."""
        if attn_mask is None:
            return None
        blocked = attn_mask < 0 if attn_mask.is_floating_point() else attn_mask.bool()
        if blocked.dim() == 4:
            blocked = blocked.flatten(0, 1)
        elif blocked.dim() == 3 and blocked.shape[0] != batch * self.num_heads:
            blocked = blocked.repeat_interleave(self.num_heads, dim=0)
        return blocked & ~blocked.all(-1, keepdim=True)

    @staticmethod
    def unsupported(mha: nn.MultiheadAttention) -> Optional[str]:
        """Why ``mha``'s configuration cannot run fused, or None."""
        if mha.batch_first:
            return "batch_first=True"
        if not mha._qkv_same_embed_dim:
            return "kdim/vdim different from embed_dim"
        if mha.in_proj_bias is None:
            return "bias=False"
        if mha.bias_k is not None or mha.add_zero_attn:
            return "add_bias_kv or add_zero_attn"
        return None


def _swap_attention(mha: nn.MultiheadAttention, fused: bool) -> None:
    if not fused:
        if type(mha) is FusedMultiheadAttention:
            mha.__class__ = nn.MultiheadAttention
        return
    if type(mha) is nn.MultiheadAttention:
        reason = FusedMultiheadAttention.unsupported(mha)
        if reason is not None:
            raise ValueError(f"the decoder's cross-attention cannot run fused: {reason}")
        mha.__class__ = FusedMultiheadAttention


class _FusedDecoderLayer(_Fused):
    """``Mask2FormerMaskedAttentionDecoderLayer`` whose ``cross_attn`` is fused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._m2f_swap_children(True)

    def _m2f_swap_children(self, fused: bool) -> None:
        _swap_attention(self.cross_attn, fused)


class _FusedMaskPredictor(_Fused):
    """``Mask2FormerMaskPredictor`` returning the blocked-key mask [B, Q, h*w], not repeated per head."""

    def forward(self, outputs, pixel_embeddings, attention_mask_target_size=None):
        mask_embeddings = self.mask_embedder(outputs.transpose(0, 1))
        outputs_mask = torch.einsum("bqc, bchw -> bqhw", mask_embeddings, pixel_embeddings)
        attention_mask = F.interpolate(outputs_mask, size=attention_mask_target_size, mode="bilinear",
                                       align_corners=False)
        blocked = (attention_mask.sigmoid().flatten(2) < 0.5).detach()
        return outputs_mask, blocked


class _FusedHungarianMatcher(_Fused):
    """``Mask2FormerHungarianMatcher`` (and ``EomtHungarianMatcher``, the same code) with the mask
    costs from :func:`m2f_kernels.pairwise_mask_cost` and the assignment from
    :func:`m2f_kernels.linear_sum_assignment`, on the device."""

    @torch.no_grad()
    def forward(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels):
        batch, num_queries = masks_queries_logits.shape[:2]
        counts = [int(labels.shape[0]) for labels in class_labels]
        device = masks_queries_logits.device
        cost = torch.zeros((batch, num_queries, max(counts, default=0)), dtype=torch.float32, device=device)
        for i in range(batch):
            pred_mask = masks_queries_logits[i]
            cost_class = -class_queries_logits[i].softmax(-1)[:, class_labels[i]]
            # HF's draw: one set of points per image, shared by every prediction and target
            coords = torch.rand(1, self.num_points, 2, device=pred_mask.device)[0]
            cost_mask, cost_dice = pairwise_mask_cost(pred_mask, mask_labels[i].to(pred_mask), coords)
            cost_i = self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice
            # as HF: bound the costs (HF keeps scipy from an infeasible matrix; here it keeps NaN out)
            cost[i, :, : counts[i]] = torch.nan_to_num(cost_i.clamp(-1e10, 1e10), 0)
        num_targets = torch.tensor(counts, dtype=torch.int64).to(device, non_blocking=True)
        query = linear_sum_assignment(cost, num_targets)  # [B, T]: each target's query
        indices = []
        for i, count in enumerate(counts):
            if count > num_queries:  # more targets than queries: which ones matched is data (a host sync)
                matched = query[i, :count] >= 0
                targets = torch.arange(count, device=device)[matched]
                queries = query[i, :count][matched]
            else:  # every target matched: static shapes
                targets, queries = torch.arange(count, device=device), query[i, :count]
            order = torch.argsort(queries)  # scipy's order (by query), so HF's point draws line up
            indices.append((queries[order], targets[order]))
        return indices


class _FusedLoss(_Fused):
    """``Mask2FormerLoss`` (and ``EomtLoss``, the same code) with the mask losses from the fused
    point-loss ops."""

    def loss_masks(self, masks_queries_logits, mask_labels, indices, num_masks):
        device = masks_queries_logits.device
        src_idx = tuple(i.to(device) for i in self._get_predictions_permutation_indices(indices))
        target_masks, _ = self._pad_images_to_max_in_batch(mask_labels)
        target_masks = target_masks[self._get_targets_permutation_indices(indices)]
        with torch.no_grad():
            coords = uncertain_point_coords(masks_queries_logits, self.num_points, self.oversample_ratio,
                                            self.importance_sample_ratio, pred_index=src_idx)
        if isinstance(num_masks, torch.Tensor):  # HF's 0-dim tensor stays on the device; a number stays one
            num_masks = num_masks.to(device=device, dtype=torch.float32).reshape(())
        loss_mask, loss_dice = point_mask_loss(masks_queries_logits, target_masks, coords, num_masks,
                                               pred_index=src_idx)
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}


# ----------------------------------------------------------------------------- model families
class _Family:
    """A transformers model family the patch knows: its modeling module and, per switch, what
    is patched there and which HF signatures the fused code relies on."""

    def __init__(self, name: str, module: str, classes: Dict[str, Dict[str, type]],
                 required: Dict[str, Dict[str, Tuple[str, ...]]],
                 functions: Optional[Dict[str, Dict[str, Callable]]] = None):
        self.name = name
        self.module = module
        self.classes = classes  # switch -> {HF class name: the mixin of its fused subclass}
        self.required = required  # switch -> {HF callable: its parameter names (self excluded)}
        self.functions = functions or {}  # switch -> {HF module function: replacement}; module patch only
        self.switches = tuple(classes)

    def modeling(self):
        """The family's transformers modeling module."""
        try:
            return importlib.import_module(self.module)
        except ImportError as exc:
            raise UnsupportedTransformersError(
                f"m2f_kernels.integrations.transformers needs transformers with {self.name} "
                f"(tested with {', '.join(TESTED_VERSIONS)}): {exc}"
            ) from exc


def _point_loss(prefix: str) -> Tuple[Dict[str, type], Dict[str, Tuple[str, ...]]]:
    """The ``point_loss`` classes and required signatures of a family whose matcher and
    criterion are Mask2Former's (``{prefix}HungarianMatcher``, ``{prefix}Loss``)."""
    classes = {f"{prefix}HungarianMatcher": _FusedHungarianMatcher, f"{prefix}Loss": _FusedLoss}
    required = {
        f"{prefix}HungarianMatcher.forward": (
            "masks_queries_logits", "class_queries_logits", "mask_labels", "class_labels"),
        f"{prefix}Loss.loss_masks": ("masks_queries_logits", "mask_labels", "indices", "num_masks"),
        f"{prefix}Loss._get_predictions_permutation_indices": ("indices",),
        f"{prefix}Loss._get_targets_permutation_indices": ("indices",),
        f"{prefix}Loss._pad_images_to_max_in_batch": ("tensors",),
    }
    return classes, required


_M2F_POINT_CLASSES, _M2F_POINT_REQUIRED = _point_loss("Mask2Former")
_CLASSES: Dict[str, Dict[str, type]] = {
    "ms_deform_attn": {"Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention": _FusedDeformableAttention},
    "masked_attention": {"Mask2FormerMaskedAttentionDecoderLayer": _FusedDecoderLayer,
                         "Mask2FormerMaskPredictor": _FusedMaskPredictor},
    "point_loss": _M2F_POINT_CLASSES,
}
_FUNCTIONS: Dict[str, Dict[str, Callable]] = {
    "ms_deform_attn": {"multi_scale_deformable_attention": ms_deform_attn_core_pytorch},
}
_REQUIRED: Dict[str, Dict[str, Tuple[str, ...]]] = {
    "ms_deform_attn": {
        "Mask2FormerPixelDecoderEncoderMultiscaleDeformableAttention.forward": (
            "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
            "position_embeddings", "reference_points", "spatial_shapes_list", "level_start_index",
            "output_attentions"),
        "multi_scale_deformable_attention": (
            "value", "value_spatial_shapes", "sampling_locations", "attention_weights"),
    },
    "masked_attention": {
        "Mask2FormerMaskedAttentionDecoderLayer.__init__": ("config",),
        "Mask2FormerMaskPredictor.forward": ("outputs", "pixel_embeddings", "attention_mask_target_size"),
    },
    "point_loss": _M2F_POINT_REQUIRED,
}
MASK2FORMER = _Family("Mask2Former", "transformers.models.mask2former.modeling_mask2former",
                      _CLASSES, _REQUIRED, _FUNCTIONS)
SWITCHES = MASK2FORMER.switches  # ("ms_deform_attn", "masked_attention", "point_loss")

_EOMT_POINT_CLASSES, _EOMT_POINT_REQUIRED = _point_loss("Eomt")
EOMT = _Family("EoMT", "transformers.models.eomt.modeling_eomt",
               {"point_loss": _EOMT_POINT_CLASSES}, {"point_loss": _EOMT_POINT_REQUIRED})
EOMT_SWITCHES = EOMT.switches

_FUSED_CLASSES: Dict[type, type] = {}
_ORIGINAL_FUNCTIONS: Dict[Tuple[str, str], Callable] = {}  # (module, function name) -> HF's function


def _base_of(cls):
    return getattr(cls, "_m2f_base", cls)


def _fused_class(base: type, mixin: type) -> type:
    """The one fused subclass of HF class ``base``."""
    cls = _FUSED_CLASSES.get(base)
    if cls is None:
        cls = type(f"M2FKernels{base.__name__}", (mixin, base),
                   {"_m2f_base": base, "__module__": __name__, "__doc__": mixin.__doc__})
        _FUSED_CLASSES[base] = cls
    return cls


def __getattr__(name: str):
    """The fused classes by name (``M2FKernels<HF class>``), made on first use: pickle finds
    a patched module's class here, in this process or in a fresh one."""
    for family in (MASK2FORMER, EOMT):
        for classes in family.classes.values():
            for base_name, mixin in classes.items():
                if name == f"M2FKernels{base_name}":
                    return _fused_class(_base_of(getattr(family.modeling(), base_name)), mixin)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- version check
def _problems(family: _Family, mod, switch: str) -> List[str]:
    """What the installed ``family`` lacks for ``switch``, or []."""
    problems = []
    for path, params in family.required[switch].items():
        owner, _, attr = path.rpartition(".")
        obj = _base_of(getattr(mod, owner, None)) if owner else mod
        fn = getattr(obj, attr, None)
        if fn is None:
            problems.append(f"{path} is missing")
            continue
        got = tuple(p for p in inspect.signature(fn).parameters if p != "self")
        if got != params:
            problems.append(f"{path} takes {got}, the patch expects {params}")
    return problems


def _check_supported(family: _Family, mod, switches) -> None:
    problems = [p for s in switches for p in _problems(family, mod, s)]
    if problems:
        import transformers

        raise UnsupportedTransformersError(
            f"m2f_kernels cannot patch the {family.name} of transformers {transformers.__version__} "
            f"(tested with {', '.join(TESTED_VERSIONS)}): " + "; ".join(problems)
        )


# ----------------------------------------------------------------------------- patching
def _selected(family: _Family, **flags: bool) -> Tuple[str, ...]:
    return tuple(s for s in family.switches if flags[s])


def _patch_module(family: _Family, mod, switch: str, fused: bool) -> None:
    for name, mixin in family.classes[switch].items():
        base = _base_of(getattr(mod, name))
        setattr(mod, name, _fused_class(base, mixin) if fused else base)
    for name, replacement in family.functions.get(switch, {}).items():
        current, key = getattr(mod, name), (mod.__name__, name)
        if fused and current is not replacement:
            _ORIGINAL_FUNCTIONS[key] = current
            setattr(mod, name, replacement)
        elif not fused and current is replacement:
            setattr(mod, name, _ORIGINAL_FUNCTIONS.pop(key))


def _set_fused(family: _Family, model: Optional[nn.Module], switches, fused: bool) -> Optional[nn.Module]:
    """Patch (fused=True, after the version check) or restore the switches, in ``model``
    or, with model=None, in the family's modeling module. Returns ``model``."""
    mod = family.modeling()
    if fused:
        _check_supported(family, mod, switches)
    if model is None:
        for s in switches:
            _patch_module(family, mod, s, fused)
    else:
        _patch_instance(family, model, mod, switches, fused)
    return model


def _patch_instance(family: _Family, model: nn.Module, mod, switches, fused: bool) -> None:
    mixins = {_base_of(getattr(mod, name)): mixin for s in switches for name, mixin in family.classes[s].items()}
    found = False
    for m in model.modules():
        base = _base_of(type(m))
        if base not in mixins:
            continue
        found = True
        if fused and type(m) is base:
            m.__class__ = _fused_class(base, mixins[base])
            m._m2f_swap_children(True)
        elif not fused and type(m) is not base:
            m._m2f_swap_children(False)
            m.__class__ = base
    if not found:
        names = sorted(b.__name__ for b in mixins)
        raise ValueError(f"{type(model).__name__} holds none of the {family.name} modules to patch ({names})")


# ----------------------------------------------------------------------------- Mask2Former
def apply_m2f_kernels_to_mask2former(model: Optional[nn.Module] = None, ms_deform_attn: bool = True,
                                     masked_attention: bool = True, point_loss: bool = True):
    """Run transformers' Mask2Former on m2f_kernels.

    Args:
        model: None patches ``transformers.models.mask2former.modeling_mask2former``, so
            models built afterwards are fused (models built before are left alone); a
            model (e.g. ``Mask2FormerForUniversalSegmentation``) patches that instance's
            modules in place.
        ms_deform_attn: the pixel decoder's multi-scale deformable attention.
        masked_attention: the transformer decoder's masked cross-attention.
        point_loss: the Hungarian matcher's mask costs and the criterion's mask losses.
    Returns:
        ``model``.
    Raises:
        UnsupportedTransformersError: transformers is missing or its Mask2Former differs
            from the tested versions where the patch relies on it.
    """
    switches = _selected(MASK2FORMER, ms_deform_attn=ms_deform_attn, masked_attention=masked_attention,
                         point_loss=point_loss)
    return _set_fused(MASK2FORMER, model, switches, fused=True)


def revert_m2f_kernels_to_mask2former(model: Optional[nn.Module] = None, ms_deform_attn: bool = True,
                                      masked_attention: bool = True, point_loss: bool = True):
    """Undo :func:`apply_m2f_kernels_to_mask2former` for the selected switches.

    ``model=None`` restores the module's classes and functions (models built while it was
    patched stay fused: pass them as ``model`` to restore them). Returns ``model``.
    """
    switches = _selected(MASK2FORMER, ms_deform_attn=ms_deform_attn, masked_attention=masked_attention,
                         point_loss=point_loss)
    return _set_fused(MASK2FORMER, model, switches, fused=False)


# ----------------------------------------------------------------------------- EoMT
def apply_m2f_kernels_to_eomt(model: Optional[nn.Module] = None, point_loss: bool = True):
    """Run transformers' EoMT (``EomtForUniversalSegmentation``) training loss on m2f_kernels.

    Args:
        model: None patches ``transformers.models.eomt.modeling_eomt``, so models built
            afterwards are fused (models built before are left alone); a model (e.g.
            ``EomtForUniversalSegmentation``) patches that instance's modules in place.
        point_loss: ``EomtHungarianMatcher``'s mask costs and assignment and
            ``EomtLoss``'s mask losses (the fused classes of the Mask2Former patch).
    Returns:
        ``model``.
    Raises:
        UnsupportedTransformersError: transformers is missing or its EoMT differs from the
            tested versions where the patch relies on it.
    """
    return _set_fused(EOMT, model, _selected(EOMT, point_loss=point_loss), fused=True)


def revert_m2f_kernels_to_eomt(model: Optional[nn.Module] = None, point_loss: bool = True):
    """Undo :func:`apply_m2f_kernels_to_eomt`.

    ``model=None`` restores the module's classes (models built while it was patched stay
    fused: pass them as ``model`` to restore them). Returns ``model``.
    """
    return _set_fused(EOMT, model, _selected(EOMT, point_loss=point_loss), fused=False)
