"""Experiment configs: a YAML file that may extend a base, plus ``key=value`` overrides.

An experiment is a small YAML file naming its ``base`` (a path relative to itself) and the keys it changes;
bases chain. Overrides use dotted keys (``train.epochs=3``, ``model.params.encoder_name=resnet18``) and YAML
values (``null``, ``[1, 2]``). Overriding a key that no config defines is an error, which catches typos;
prefix it with ``+`` to add a new key on purpose (``+model.params.decoder_attention_type=scse``).

Experiment files are checked the same way: a key that the file's base does not define is an error naming the file,
the key and the nearest keys the base has, unless the file writes it as ``+key`` (``+demo:`` in configs/demo.yaml).
Three kinds of subtree are free-form in files, because something else checks them or the file replaces them whole:
the ``params`` of a ``{name, params}`` block (the registry checks them against the component when it is built),
the ``ensemble`` section (checked member by member), and anything below a key whose base value is not a mapping
(``null``, a list such as ``augment.transforms``, a scalar): the file's value replaces it.

Every stage saves the resolved config (bases merged, overrides applied, interpolations resolved) beside
its outputs, so a result can always be traced to the exact settings that made it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pneumoseg.errors import ConfigError, plain_reason
from pneumoseg.io import write_text

BASE_KEY = "base"
DEFAULT_CONFIG = Path("configs/demo.yaml")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
"""An experiment name: it names a folder under ``paths.output_root``, so no separators and no ``..``."""
# The ensemble files being loaded, outermost first: a member that leads back to one of them is a cycle.
_ENSEMBLES_LOADING: ContextVar[tuple[Path, ...]] = ContextVar("ensembles_loading", default=())


def load_config(path: str | os.PathLike = DEFAULT_CONFIG, overrides: Sequence[str] = ()) -> DictConfig:
    """Load ``path`` with its chain of bases, apply ``overrides`` and resolve interpolations.

    Args:
        path: the experiment's YAML file.
        overrides: ``key=value`` strings; ``+key=value`` adds a key no config defines.

    Returns:
        A resolved, read-only DictConfig.

    Raises:
        ConfigError: a missing or malformed file, a cycle of bases or of ensembles, an unknown key, an
            interpolation that does not resolve, or an experiment name that is not a plain name.
    """
    cfg = _load_chain(Path(path), chain=())
    cfg = apply_overrides(cfg, overrides)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config {path}: {plain_reason(exc)}") from None
    OmegaConf.set_readonly(cfg, True)
    _check_experiment_name(cfg, path)
    if is_ensemble(cfg):
        _check_members_of(cfg, Path(path))
    return cfg


def _check_experiment_name(cfg: DictConfig, path: str | os.PathLike) -> None:
    """Refuse an ``experiment`` that is not a plain name (it names the experiment's folder under ``output/``)."""
    name = cfg.get("experiment")
    if name is not None and (not _PLAIN_NAME.match(str(name)) or ".." in str(name)):
        raise ConfigError(
            f"config {path}: experiment {name!r} is not a plain name; use letters, digits, '_', '-' "
            f"and '.' only (no '/', no '..'): it names the experiment's folder under "
            f"paths.output_root"
        )


def _check_members_of(cfg: DictConfig, path: Path) -> None:
    """Load the members of the ensemble ``cfg`` (a bad member fails now, naming ``path``), refusing at once a
    member that leads back to an ensemble being loaded."""
    chain, here = _ENSEMBLES_LOADING.get(), path.resolve()
    if here in chain:
        cycle = " -> ".join(str(step) for step in (*chain[chain.index(here) :], here))
        raise ConfigError(f"ensemble configs form a cycle: {cycle}; an ensemble's members must be single experiments")
    token = _ENSEMBLES_LOADING.set((*chain, here))
    try:
        ensemble_members(cfg, origin=str(path))
    finally:
        _ENSEMBLES_LOADING.reset(token)


def _load_chain(path: Path, chain: tuple[Path, ...]) -> DictConfig:
    resolved = path.resolve()
    if resolved in chain:
        names = " -> ".join(str(p) for p in (*chain, resolved))
        raise ConfigError(f"config bases form a cycle: {names}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (run from the project root, or give the full path)")
    try:
        cfg = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in several exception types
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config {path} must be a mapping of keys to values at the top level")
    base = cfg.pop(BASE_KEY, None)
    if base is None:
        return cfg
    parent = _load_chain(path.parent / str(base), (*chain, resolved))
    cfg = _checked_keys(parent, cfg, path)
    _drop_params_of_renamed_blocks(parent, cfg)
    try:
        return cast(DictConfig, OmegaConf.merge(parent, cfg))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config {path} does not fit its base {base}: {plain_reason(exc)}") from None


FREE_FORM_KEYS = ("params", "ensemble")


def _checked_keys(parent: DictConfig, child: DictConfig, path: Path) -> DictConfig:
    """``child`` with its ``+key`` names made plain, after checking that ``parent`` defines each of its other keys.

    Args:
        parent: the merged chain of bases ``child`` extends.
        child: the experiment file's own keys (its ``base`` removed).
        path: the experiment file, for the message.

    Raises:
        ConfigError: a key ``parent`` does not define, outside the free-form subtrees (module docstring); the
            message names the file and the nearest keys.
    """
    base_tree = _tree(parent)

    def walk(base: dict | None, new: dict, prefix: str) -> dict:
        out = {}
        for key, value in new.items():
            adding = isinstance(key, str) and key.startswith("+")
            name = key[1:] if adding else key
            dotted = f"{prefix}{name}"
            if base is not None and name not in base and not adding:
                raise ConfigError(
                    f"config {path}: unknown key {dotted}{_suggestion(dotted, base_tree)}. Fix the "
                    f"spelling, or write +{name}: in the file to add a new key on purpose."
                )
            below = base.get(name) if base is not None and name not in FREE_FORM_KEYS else None
            if isinstance(value, dict):
                value = walk(below if isinstance(below, dict) else None, value, f"{dotted}.")
            out[name] = value
        return out

    return OmegaConf.create(walk(base_tree, _tree(child), ""))


def _tree(cfg: DictConfig) -> dict:
    """A config mapping as a plain dict of its unresolved values."""
    return cast(dict, OmegaConf.to_container(cfg, resolve=False))


def _suggestion(key: str, tree: dict) -> str:
    """`` (did you mean train.epochs?)``: the keys of ``tree`` nearest to the dotted ``key``, or ``""``."""

    def dotted(node: dict, prefix: str):
        for name, value in node.items():
            yield f"{prefix}{name}"
            if isinstance(value, dict):
                yield from dotted(value, f"{prefix}{name}.")

    near = difflib.get_close_matches(key, list(dotted(tree, "")), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(near)}?)" if near else ""


def _drop_params_of_renamed_blocks(parent: DictConfig, child: DictConfig) -> list[str]:
    """Delete from ``parent`` the ``params`` of every ``{name, params}`` block whose ``name`` ``child`` changes.

    A merge would otherwise hand the parameters of the base's component to the child's other component (a
    ``plateau`` scheduler's ``patience`` to a ``cosine`` one); a renamed block takes its params from the child,
    and the registry's defaults stand for the rest.

    Args:
        parent: the config merged into (a base, or the config before an override); changed in place.
        child: what is merged on top (the experiment file, or one override).

    Returns:
        The dotted paths of the renamed blocks (``"scheduler"``, ``"model"``).
    """

    def renamed(base: dict, new: dict, path: tuple) -> list[tuple]:
        found = []
        for key, value in new.items():
            old = base.get(key)
            if not isinstance(value, dict) or not isinstance(old, dict):
                continue
            if "name" in value and "params" in old and value["name"] != old.get("name"):
                found.append((*path, key))
            found += renamed(old, value, (*path, key))
        return found

    paths = renamed(
        cast(dict, OmegaConf.to_container(parent, resolve=False)),
        cast(dict, OmegaConf.to_container(child, resolve=False)),
        (),
    )
    for path in paths:
        node = parent
        for key in path:
            node = node[key]
        del node["params"]
    return [".".join(map(str, path)) for path in paths]


def apply_overrides(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """Return ``cfg`` with each ``key=value`` override applied; see the module docstring for the rules.

    A ``{name, params}`` block renamed by an override (``scheduler.name=cosine``) loses the old component's
    params, as in a config file; ``params`` keys given for it (``scheduler.params.warmup_epochs=2`` or a whole
    ``scheduler.params={...}``, in any order) then apply on top, and the registry checks them against the new component.

    Args:
        cfg: the loaded config (not changed).
        overrides: ``key=value`` strings; ``+key=value`` adds a key no config defines.

    Raises:
        ConfigError: an override not of the form ``key=value``, or naming a key no config defines.
    """
    cfg = cfg.copy()
    parsed = [_parse_override(item) for item in overrides]
    # Renames first: a params override written before the rename must not be dropped with the old params.
    parsed.sort(key=lambda override: override[1].rpartition(".")[2] != "name")
    renamed: list[str] = []
    for item, key, value, adding in parsed:
        new_params = any(key == f"{block}.params" or key.startswith(f"{block}.params.") for block in renamed)
        if not (adding or new_params) and OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            near = _suggestion(key, _tree(cfg))
            raise ConfigError(
                f"override {item!r}: no config key {key!r}{near}. Check the spelling against the resolved config, "
                f"or write +{key}={value} to add a new key on purpose."
            )
        update = OmegaConf.from_dotlist([f"{key}={value}"])
        renamed += _drop_params_of_renamed_blocks(cfg, update)
        cfg = cast(DictConfig, OmegaConf.merge(cfg, update))
    return cfg


def _parse_override(item: str) -> tuple[str, str, str, bool]:
    """``(item, key, value, adding)`` of one ``[+]key=value`` override.

    Raises:
        ConfigError: not of the form ``key=value``.
    """
    key, sep, value = item.partition("=")
    if not sep or not key.lstrip("+"):
        raise ConfigError(f"override {item!r} is not of the form key=value")
    return item, key.lstrip("+"), value, key.startswith("+")


_MISSING = object()


def save_config(cfg: DictConfig, folder: str | os.PathLike) -> Path:
    """Write the resolved config to ``folder/config.yaml`` (atomically) and return its path."""
    path = Path(folder) / "config.yaml"
    write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def fingerprint(cfg: DictConfig, sections: Iterable[str], extra: dict | None = None) -> str:
    """A short hash of the named config sections (and ``extra`` facts such as input file hashes).

    A stage is complete for a config when its stored fingerprint equals this one, so only the sections a
    stage actually reads should be named: changing the learning rate must not redo the DICOM conversion.
    """
    resolved = cast(dict, OmegaConf.to_container(cfg, resolve=True))
    content = {name: resolved.get(name) for name in sorted(sections)}
    if extra:
        content["_extra"] = extra
    blob = json.dumps(content, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def to_dict(node: Any) -> Any:
    """A plain, resolved copy of a config node: a dict for a section (for ``**params`` calls), a list for a list;
    ``{}`` for None."""
    if node is None:
        return {}
    return OmegaConf.to_container(node, resolve=True)


@dataclass(frozen=True)
class EnsembleMember:
    """One member experiment of an ensemble config.

    Attributes:
        cfg: the member's resolved config (its file, with its ``overrides``).
        weight: its weight in the blend (positive; the blend scales the weights to sum to 1).
        name: its ``experiment`` name.
    """

    cfg: DictConfig
    weight: float
    name: str


_MEMBER_KEYS = ("config", "weight", "overrides")


def is_ensemble(cfg: DictConfig) -> bool:
    """True when ``cfg`` blends other experiments: its ``ensemble`` section is set."""
    return cfg.get("ensemble") is not None


def ensemble_members(cfg: DictConfig, origin: str | None = None) -> list[EnsembleMember]:
    """The members of an ensemble config: ``ensemble.members``, a list of ``{config, weight, overrides}``.

    ``config`` is a normal experiment file (any architecture and image size), relative to the directory you run
    from (the project root), like every path of a config, or absolute; ``weight`` defaults to 1; ``overrides`` is
    a list of ``key=value`` strings applied to that member.

    Args:
        cfg: the ensemble's resolved config.
        origin: the ensemble's file, for messages (default: its experiment name).

    Raises:
        ConfigError: fewer than two members, a member entry that is not such a mapping, a member file that is
            missing or bad, a weight that is not a positive number, a member that is an ensemble itself, or two
            members (or a member and the ensemble) with one experiment folder.
    """
    where = origin or f"the ensemble config of experiment {cfg.get('experiment')!r}"
    entries = to_dict(cfg.ensemble.get("members"))
    if not isinstance(entries, list) or len(entries) < 2:
        raise ConfigError(
            f"{where}: ensemble.members must list at least two member experiments, e.g. "
            f"[{{config: configs/demo.yaml, weight: 1}}, {{config: configs/demo_b.yaml, weight: 1}}]"
        )
    members, folders = [], {str(cfg.paths.experiment_dir): f"the ensemble {cfg.experiment!r}"}
    for index, entry in enumerate(entries):
        key = f"{where}: ensemble.members[{index}]"
        member = _member(entry, key)
        folder = str(member.cfg.paths.experiment_dir)
        if folder in folders:
            raise ConfigError(
                f"{key} ({member.name}) writes to {folder}, as {folders[folder]} does; give each "
                f"member its own experiment name"
            )
        folders[folder] = f"member {member.name!r}"
        members.append(member)
    return members


def _member(entry, key: str) -> EnsembleMember:
    """One ``{config, weight, overrides}`` entry of ``ensemble.members``, loaded; see :func:`ensemble_members`."""
    if not isinstance(entry, dict) or not isinstance(entry.get("config"), str) or set(entry) - set(_MEMBER_KEYS):
        raise ConfigError(
            f"{key} must be a mapping with a config file and optionally weight and overrides "
            f"(keys {', '.join(_MEMBER_KEYS)}), got {entry!r}"
        )
    path = Path(entry["config"])
    if not path.is_file():
        raise ConfigError(
            f"{key}: member config {path} not found (member paths are relative to the project root, "
            f"like configs/demo.yaml); fix the path or create the member's experiment file"
        )
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"{key}: weight must be a positive number, got {weight!r}")
    overrides = entry.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(item, str) for item in overrides):
        raise ConfigError(f"{key}: overrides must be a list of key=value strings, got {overrides!r}")
    try:
        member_cfg = load_config(path, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if is_ensemble(member_cfg):
        raise ConfigError(f"{key}: {path} is an ensemble itself; list its members in this ensemble instead")
    return EnsembleMember(member_cfg, float(weight), str(member_cfg.experiment))
