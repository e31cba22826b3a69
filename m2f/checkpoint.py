"""Weights from local files: backbone state dicts and the official Mask2Former checkpoints;
the optimiser state of training checkpoints (``load_optimizer_state``); the files of a
training run's checkpoints (``CheckpointWriter``, ``load_checkpoint``, ``latest_checkpoint``).

Official checkpoints are detectron2 ``.pkl`` files: a pickled dict whose "model" maps
official key names (``backbone.res2.0.conv1.weight``, ``sem_seg_head.pixel_decoder...``,
``sem_seg_head.predictor...``) to numpy arrays. m2f models use the official names
everywhere except the ResNet backbone, which uses torchvision's names; the mapping between
the two is here. Pickle files can run code when loaded: only load files you trust.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from .backbone import ResNet, SwinTransformer

# keys of official checkpoints that are not model weights here
_OFFICIAL_EXTRA = {"criterion.empty_weight"}


class CheckpointMismatchError(ValueError):
    """A state dict does not match the model: the message lists every offending key."""

    def __init__(self, what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                 shapes: Iterable[str] = ()):
        self.missing, self.unexpected, self.shapes = sorted(missing), sorted(unexpected), sorted(shapes)
        parts = [f"{what} does not match the model"]
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        if self.shapes:
            parts.append(f"shape mismatches ({len(self.shapes)}): " + ", ".join(self.shapes))
        super().__init__("\n".join(parts))

    def one_line(self, limit: int = 3) -> str:
        """The message on one line, naming at most ``limit`` keys of each kind."""
        parts = [str(self).splitlines()[0]]
        for name, keys in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                           ("shape mismatches", self.shapes)):
            if keys:
                more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
                parts.append(f"{name} ({len(keys)}): " + ", ".join(keys[:limit]) + more)
        return "; ".join(parts)


def read_weights(path: str) -> Dict[str, torch.Tensor]:
    """A flat {name: tensor} from a local file: a detectron2 ``.pkl`` (numpy arrays) or a
    ``torch.save`` file; a "model" or "state_dict" wrapper is removed."""
    if str(path).endswith(".pkl"):
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(data, Mapping) and wrapper in data and isinstance(data[wrapper], Mapping):
            data = data[wrapper]
    return {k: torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for k, v in data.items()}


# --- ResNet names: detectron2 <-> torchvision --------------------------------------------------

_D2_TO_TV = [
    (re.compile(r"^stem\.conv1\.weight$"), r"conv1.weight"),
    (re.compile(r"^stem\.conv1\.norm\.(\w+)$"), r"bn1.\1"),
    (re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.weight$"), lambda m: f"layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(r"^res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)$"), lambda m: f"layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
    (re.compile(r"^res(\d)\.(\d+)\.shortcut\.weight$"), lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
    (re.compile(r"^res(\d)\.(\d+)\.shortcut\.norm\.(\w+)$"), lambda m: f"layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
]
_TV_TO_D2 = [
    (re.compile(r"^conv1\.weight$"), r"stem.conv1.weight"),
    (re.compile(r"^bn1\.(\w+)$"), r"stem.conv1.norm.\1"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv(\d)\.weight$"), lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.bn(\d)\.(\w+)$"), lambda m: f"res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.{m[4]}"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.0\.weight$"), lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.weight"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.1\.(\w+)$"), lambda m: f"res{int(m[1]) + 1}.{m[2]}.shortcut.norm.{m[3]}"),
]


def _rename(key: str, rules) -> str:
    for pattern, repl in rules:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key  # not a ResNet key: reported as unexpected by the caller


def resnet_key_from_detectron2(key: str) -> str:
    """``res2.0.conv1.norm.weight`` -> ``layer1.0.bn1.weight`` (unknown keys unchanged)."""
    return _rename(key, _D2_TO_TV)


def resnet_key_to_detectron2(key: str) -> str:
    """``layer1.0.bn1.weight`` -> ``res2.0.conv1.norm.weight`` (unknown keys unchanged)."""
    return _rename(key, _TV_TO_D2)


# --- official Mask2Former checkpoints ----------------------------------------------------------


def _backbone_key_map(model: nn.Module):
    """(official -> m2f, m2f -> official) renaming of the part after ``backbone.``."""
    if isinstance(model.backbone, ResNet):
        return resnet_key_from_detectron2, resnet_key_to_detectron2
    return (lambda k: k), (lambda k: k)


def convert_official_state_dict(official: Mapping[str, object], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Official key names -> ``model``'s state dict; raises CheckpointMismatchError listing
    every missing, unexpected or mis-shaped key."""
    from_official, _ = _backbone_key_map(model)
    converted = {}
    for key, value in official.items():
        if key in _OFFICIAL_EXTRA:
            continue
        if key.startswith("backbone."):
            key = "backbone." + from_official(key[len("backbone."):])
        converted[key] = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    _check_keys("official checkpoint", converted, model.state_dict())
    return converted


def load_official_checkpoint(model: nn.Module, path_or_state: object) -> nn.Module:
    """Load an official Mask2Former checkpoint (a ``.pkl`` path, or its "model" dict) into ``model``."""
    state = read_weights(path_or_state) if isinstance(path_or_state, str) else path_or_state
    model.load_state_dict(convert_official_state_dict(state, model), strict=True)
    return model


def to_official_state_dict(model: nn.Module) -> Dict[str, np.ndarray]:
    """``model``'s weights under the official key names, as numpy arrays (detectron2 style)."""
    _, to_official = _backbone_key_map(model)
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone."):
            key = "backbone." + to_official(key[len("backbone."):])
        out[key] = value.detach().cpu().numpy()
    return out


def save_official_checkpoint(model: nn.Module, path: str) -> None:
    """Write ``model`` as a detectron2-style ``.pkl`` with official key names."""
    with open(path, "wb") as f:
        pickle.dump({"model": to_official_state_dict(model), "__author__": "m2f"}, f)


# --- backbone weights --------------------------------------------------------------------------

# classification-only entries of pretrained backbone files
_RESNET_IGNORED = re.compile(r"^fc\.|num_batches_tracked$")
_SWIN_IGNORED = re.compile(r"^head\.|^norm\.(weight|bias)$|attn_mask$")
# present in the segmentation backbone, absent from classification checkpoints
_SWIN_NEW = re.compile(r"^norm[0-3]\.(weight|bias)$|relative_position_index$")


def load_backbone_weights(backbone: nn.Module, path_or_state: object) -> Dict[str, list]:
    """Load pretrained backbone weights from a local file (or a state dict).

    ResNet: a torchvision state dict (``fc.*`` and ``num_batches_tracked`` ignored) or the
    detectron2 names. Swin: the official Swin classification / Mask2Former key names
    (``head.*``, the final ``norm.*`` and ``attn_mask`` buffers ignored; the per-output
    ``norm0..3`` may be absent and keep their init). A ``backbone.`` prefix is stripped.
    Any other missing or unexpected key raises CheckpointMismatchError.
    Returns {"ignored": [...], "not_loaded": [...]}.
    """
    state = read_weights(path_or_state) if isinstance(path_or_state, str) else dict(path_or_state)
    state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
    if isinstance(backbone, ResNet):
        ignored_re, optional_re = _RESNET_IGNORED, None
        state = {resnet_key_from_detectron2(k): v for k, v in state.items()}
    elif isinstance(backbone, SwinTransformer):
        ignored_re, optional_re = _SWIN_IGNORED, _SWIN_NEW
    else:
        raise TypeError(f"unsupported backbone {type(backbone).__name__}")
    ignored = sorted(k for k in state if ignored_re.search(k))
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    expected = backbone.state_dict()
    not_loaded = sorted(k for k in expected if k not in state and optional_re is not None and optional_re.search(k))
    _check_keys("backbone weights", state, {k: v for k, v in expected.items() if k not in set(not_loaded)})
    backbone.load_state_dict(state, strict=False)
    return {"ignored": ignored, "not_loaded": not_loaded}


def check_state_dict(what: str, state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise CheckpointMismatchError unless ``state`` has exactly ``model``'s keys and shapes."""
    _check_keys(what, state, model.state_dict())


def _check_keys(what: str, given: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    shapes = [f"{k}: file {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in set(given) & set(expected) if tuple(given[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(what, missing, unexpected, shapes)


# --- optimiser state -----------------------------------------------------------------------------

# how a group is updated, not what it computes: always this optimizer's own choice
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


class OptimizerStateMismatchError(ValueError):
    """A saved optimizer state does not fit the optimizer (a one-line message)."""


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping, model: Optional[nn.Module] = None,
                         scheduler=None, scheduler_state: Optional[Mapping] = None) -> None:
    """Load a training checkpoint's optimizer (and LambdaLR scheduler) state.

    Only hyperparameters and moments come from the file: the optimizer keeps its own
    implementation (foreach / fused / capturable) and the form of its lrs (a float, or a
    device tensor the loaded value is written into). A state saved with one group per
    parameter (the official layout, and this repository's before parameters were grouped)
    is regrouped when ``model`` is given: its parameters are in ``m2f.solver.parameter_rules``
    order. Any other mismatch raises OptimizerStateMismatchError.
    """
    state = {"state": dict(state["state"]), "param_groups": [dict(g) for g in state["param_groups"]]}
    scheduler_state = dict(scheduler_state) if scheduler_state is not None else None
    groups = optimizer.param_groups
    if [len(g["params"]) for g in state["param_groups"]] != [len(g["params"]) for g in groups]:
        if model is None or not _is_per_parameter(state, model):
            raise OptimizerStateMismatchError(
                f"the saved optimizer state has {len(state['param_groups'])} parameter groups of "
                f"{sum(len(g['params']) for g in state['param_groups'])} parameters, this optimizer "
                f"{len(groups)} groups of {sum(len(g['params']) for g in groups)}")
        state, scheduler_state = _regroup(state, scheduler_state, optimizer, model)
    lrs, own_lrs = [], [g["lr"] for g in groups]
    for saved, own in zip(state["param_groups"], groups):
        saved.update({k: own[k] for k in _IMPLEMENTATION_KEYS if k in own})
        lrs.append(float(saved["lr"]))
        if "initial_lr" in saved:
            saved["initial_lr"] = float(saved["initial_lr"])
    optimizer.load_state_dict(state)
    for group, own, lr in zip(optimizer.param_groups, own_lrs, lrs):
        if isinstance(own, torch.Tensor):  # the same tensor: a captured step reads it
            own.fill_(lr)
        group["lr"] = own if isinstance(own, torch.Tensor) else lr
    if scheduler is not None and scheduler_state is not None:
        if len(scheduler_state["base_lrs"]) != len(groups):
            raise OptimizerStateMismatchError(f"the saved schedule has {len(scheduler_state['base_lrs'])} "
                                              f"learning rates, the optimizer {len(groups)} groups")
        scheduler.load_state_dict(scheduler_state)


def _per_parameter_order(model: nn.Module) -> list:
    from .solver import parameter_rules

    return [(name, p) for name, p, _, _ in parameter_rules(model)]


def _is_per_parameter(state: Mapping, model: nn.Module) -> bool:
    groups = state["param_groups"]
    return (len(groups) == len(_per_parameter_order(model))
            and all(list(g["params"]) == [i] for i, g in enumerate(groups)))


def _regroup(state: Dict, scheduler_state: Optional[Dict], optimizer: torch.optim.Optimizer, model: nn.Module):
    """A per-parameter optimizer state (and its per-group scheduler lists) in the layout of
    ``optimizer``'s groups; every member of a group must carry that group's hyperparameters."""
    order = _per_parameter_order(model)
    old_index = {id(p): i for i, (_, p) in enumerate(order)}
    flat = [p for g in optimizer.param_groups for p in g["params"]]
    if sorted(old_index) != sorted(id(p) for p in flat):
        raise OptimizerStateMismatchError("the saved per-parameter optimizer state is not over this model's "
                                          "trainable parameters")
    new_index = {id(p): i for i, p in enumerate(flat)}
    saved = state["param_groups"]
    firsts, groups = [], []
    for group in optimizer.param_groups:
        first = old_index[id(group["params"][0])]
        settings = {k: v for k, v in saved[first].items() if k != "params"}
        for p in group["params"]:
            member = {k: v for k, v in saved[old_index[id(p)]].items() if k != "params"}
            for key in ("initial_lr", "weight_decay"):
                if key in member and key in group and float(member[key]) != float(group[key]):
                    raise OptimizerStateMismatchError(
                        f"the saved optimizer state gives {order[old_index[id(p)]][0]} {key} {member[key]}, "
                        f"this run {float(group[key])}")
            if member != settings:
                raise OptimizerStateMismatchError(
                    f"the saved optimizer state gives {order[old_index[id(p)]][0]} other settings than "
                    f"{order[first][0]}, which this run groups with it")
        firsts.append(first)
        groups.append({**settings, "params": [new_index[id(p)] for p in group["params"]]})
    moments = {new_index[id(order[i][1])]: s for i, s in state["state"].items()}
    if scheduler_state is not None:
        scheduler_state = dict(scheduler_state)
        for key in ("base_lrs", "_last_lr", "lr_lambdas"):
            if key in scheduler_state and len(scheduler_state[key]) == len(saved):
                scheduler_state[key] = [scheduler_state[key][i] for i in firsts]
    return {"state": moments, "param_groups": groups}, scheduler_state


# --- training checkpoint files --------------------------------------------------------------------

CHECKPOINT = "checkpoint.pt"
TRAINING_KEYS = ("config", "step", "model", "optimizer", "scheduler", "scaler", "rng")
_OLDER = re.compile(r"^checkpoint_(\d+)\.pt$")
_TEMPORARY = re.compile(r"^checkpoint(_\d+)?\.pt(\.sha256)?\.tmp\d+$")


class InvalidCheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message (one line) says why."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (where the platform can open a folder)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def write_temporary(obj, path: str) -> Tuple[str, str]:
    """``torch.save`` to a temporary file beside ``path``, flushed to the disk -> (temporary
    path, sha256). On any failure (a full disk, an interrupt) the temporary file is removed."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        return tmp, sha256_file(tmp)
    except BaseException:
        _remove(tmp)
        raise


def atomic_save(obj, path: str) -> str:
    """torch.save to a temporary file in the same folder, fsync, then os.replace -> sha256:
    ``path`` is the old file or the new one, never a torn one (a kill or a full disk at any
    point leaves the old file)."""
    tmp, digest = write_temporary(obj, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(os.path.dirname(path))
    return digest


def _record_path(path: str) -> str:
    return path + ".sha256"


def _write_record(path: str, digest: str) -> None:
    """``<path>.sha256`` in ``sha256sum`` format (``sha256sum -c`` checks it in the run folder).
    Best effort: without a record the checkpoint is checked by loading it."""
    record = _record_path(path)
    tmp = f"{record}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(f"{digest}  {os.path.basename(path)}\n")
        os.replace(tmp, record)
    except OSError:
        _remove(tmp)


def recorded_sha256(path: str) -> Optional[str]:
    """The sha256 recorded when ``path`` was written, or None: no record, or the file was
    replaced after it (newer than its record: then it is checked by loading only)."""
    try:
        record_time = os.stat(_record_path(path)).st_mtime_ns
        if os.stat(path).st_mtime_ns > record_time:
            return None
        with open(_record_path(path)) as f:
            digest, _, name = f.readline().strip().partition("  ")
    except (OSError, UnicodeDecodeError):
        return None
    if name != os.path.basename(path) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        return None
    return digest


# what unpickling a numpy array needs (the function ndarray.__reduce__ names, the array and dtype classes)
_NUMPY_ARRAY_GLOBALS = [np.zeros(1, np.uint32).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str, required: Iterable[str] = TRAINING_KEYS) -> Dict:
    """A training checkpoint, checked: its recorded sha256 (where the record describes the
    file), ``torch.load(weights_only=True)`` (tensors, numbers, strings and containers: a
    file that would run code is refused), and the ``required`` entries. Raises InvalidCheckpointError (one
    line, without the path) otherwise."""
    if not os.path.exists(path):
        raise InvalidCheckpointError("no such file")
    if os.path.isdir(path):
        raise InvalidCheckpointError("a folder, not a checkpoint file")
    recorded = recorded_sha256(path)
    if recorded is not None:
        actual = sha256_file(path)
        if actual != recorded:
            raise InvalidCheckpointError(f"damaged: its sha256 {actual[:12]}... differs from the one recorded when "
                                         f"it was written ({recorded[:12]}...)")
    try:
        # weights only: a checkpoint cannot run code when loaded (numpy arrays allowed: the RNG
        # state of checkpoints from before it was stored as tensors)
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a pickle error, a foreign file, code in the pickle
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # torch's first sentence
        raise InvalidCheckpointError(f"cannot be read ({reason}): truncated, damaged or not a checkpoint") from None
    if not isinstance(ckpt, Mapping):
        raise InvalidCheckpointError(f"not an m2f.train checkpoint (it holds a {type(ckpt).__name__})")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise InvalidCheckpointError(f"not an m2f.train checkpoint: it has no {', '.join(map(repr, missing))}")
    return dict(ckpt)


def _older_checkpoints(folder: str) -> List[Tuple[int, str]]:
    """(step, path) of the ``checkpoint_<step>.pt`` files in ``folder``, newest first."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    found = [(int(m[1]), os.path.join(folder, name)) for name in names for m in [_OLDER.match(name)] if m]
    return sorted(found, reverse=True)


def checkpoint_files(folder: str) -> List[str]:
    """A run folder's checkpoints, newest first: ``checkpoint.pt``, then ``checkpoint_<step>.pt``."""
    newest = os.path.join(folder, CHECKPOINT)
    return ([newest] if os.path.exists(newest) else []) + [p for _, p in _older_checkpoints(folder)]


def latest_checkpoint(folder: str, required: Iterable[str] = TRAINING_KEYS) -> Tuple[str, Dict, List[Tuple[str, str]]]:
    """The newest valid checkpoint of a run folder -> (path, checkpoint, skipped), where
    ``skipped`` lists (path, reason) of the newer ones that are not valid. Raises
    InvalidCheckpointError when there is none."""
    required = tuple(required)
    skipped = []
    for path in checkpoint_files(folder):
        try:
            return path, load_checkpoint(path, required), skipped
        except InvalidCheckpointError as e:
            skipped.append((path, str(e)))
    if not skipped:
        raise InvalidCheckpointError(f"no checkpoint in {folder} ({CHECKPOINT} or checkpoint_<step>.pt)")
    raise InvalidCheckpointError(f"no valid checkpoint in {folder}: "
                                 + "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped))


class CheckpointWriter:
    """Writes a run's checkpoints into ``folder``: the newest as ``checkpoint.pt``, the
    ``keep - 1`` before it as ``checkpoint_<step>.pt``, each with a ``<file>.sha256`` record.

    A checkpoint goes to a temporary file (fsync'ed) first; only then does the previous
    ``checkpoint.pt`` move to ``checkpoint_<step>.pt`` and the new one take its name, so a
    kill or a full disk at any point leaves the previous checkpoints intact (a stray
    temporary file is removed by the next writer). ``resumed``: (path, step) of the
    checkpoint the run continues; the folder's older checkpoints up to that step are the
    run's, any others (a replaced run's, or past the resumed step) are removed at the first
    save.
    """

    def __init__(self, folder: str, keep: int = 3, resumed: Optional[Tuple[str, int]] = None):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.folder, self.keep = folder, keep
        self.step: Optional[int] = None  # the step that checkpoint.pt holds, once this run wrote or resumed it
        self.latest: Optional[Tuple[str, int]] = resumed  # (path, step) of this run's newest checkpoint
        self._ours = set()  # older checkpoints that belong to this run
        here = resumed is not None and os.path.dirname(os.path.abspath(resumed[0])) == os.path.abspath(folder)
        if here:
            if os.path.basename(resumed[0]) == CHECKPOINT:
                self.step = resumed[1]
            self._ours = {p for s, p in _older_checkpoints(folder) if s <= resumed[1]}
        for name in os.listdir(folder):
            if _TEMPORARY.match(name):
                _remove(os.path.join(folder, name))

    @property
    def path(self) -> str:
        return os.path.join(self.folder, CHECKPOINT)

    def save(self, obj, step: int) -> str:
        """Write ``obj`` as the checkpoint of ``step`` -> its path. An OSError (a full disk)
        leaves the previous checkpoints as they were."""
        newest = self.path
        tmp, digest = write_temporary(obj, newest)
        try:
            if self.keep > 1 and self.step is not None and self.step != step and os.path.exists(newest):
                older = os.path.join(self.folder, f"checkpoint_{self.step:07d}.pt")
                recorded = recorded_sha256(newest)
                _remove(_record_path(older))
                os.replace(newest, older)
                self._ours.add(older)
                if recorded is not None:
                    _write_record(older, recorded)
            _remove(_record_path(newest))
            os.replace(tmp, newest)
        except BaseException:
            _remove(tmp)
            raise
        _fsync_dir(self.folder)
        _write_record(newest, digest)
        self.step, self.latest = step, (newest, step)
        self._prune()
        return newest

    def _prune(self) -> None:
        kept = 0
        for step, path in _older_checkpoints(self.folder):
            if path in self._ours and step < self.step and kept < self.keep - 1:
                kept += 1
                continue
            self._ours.discard(path)
            _remove(path)
            _remove(_record_path(path))
