"""Compose, validate, list and expand llmx configs from one place.

The CLI, the tests and `llmx validate` all go through `compose()` so that there is a single config
directory, a single schema registration and a single way errors are worded. Hydra's own messages
are accurate but noisy (search paths, "use +key to append" hints that are wrong for typed configs,
`$VALUE` templates), so `format_compose_error()` rewrites them into one line that names the bad key
and what would be valid.

Hydra and OmegaConf are imported inside the functions that need them: `llmx list` only reads recipe
YAML files and must answer in well under half a second, interpreter start included.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import os
import re
import typing
from pathlib import Path
from typing import Optional, Sequence

import yaml

import llmx
from llmx.config.checks import problems as value_problems
from llmx.utils import LlmxError

DEFAULT_CONF_DIR = Path(llmx.__file__).resolve().parents[1] / "conf"
CONF_DIR: Path = Path(os.environ.get("LLMX_CONF_DIR") or DEFAULT_CONF_DIR)

# Groups whose every option validate_all() composes on top of the default recipe. The recipe group is
# handled separately because its options replace the default recipe instead of layering on it.
OPTION_GROUPS = ("model", "data", "optim", "trainer", "logger", "launcher", "bench", "evaluator", "sparsify", "merge",
                 "eval")

# LlmxConfig's defaults for the fields `llmx list` shows, repeated here because importing the
# schema would pull in OmegaConf and list_recipes() must stay import-light.
_RECIPE_DEFAULTS = {"kind": "pretrain", "paper": "", "description": "", "fits_cpu": True, "cpu_time": ""}


class ConfigError(LlmxError):
    """A config that does not compose or does not type-check, with a one-line explanation."""


def conf_dir() -> Path:
    """The config directory in effect now: $LLMX_CONF_DIR is read at call time so tests can point
    it at a copy without reloading this module."""
    env = os.environ.get("LLMX_CONF_DIR")
    return Path(env).resolve() if env else Path(CONF_DIR).resolve()


class _HydraContext:
    """initialize_config_dir with GlobalHydra cleared on entry and exit, so compose can run any
    number of times in one process (tests, validate_all) even after an earlier failure."""

    def __init__(self, directory: Path):
        self.directory = directory

    def __enter__(self):
        from hydra import initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra

        from llmx.config import schema

        if not (self.directory / "config.yaml").is_file():
            raise ConfigError(f"no config.yaml in config directory {self.directory}")
        schema.register()
        GlobalHydra.instance().clear()
        self._init = initialize_config_dir(config_dir=str(self.directory), version_base="1.3")
        self._init.__enter__()
        return GlobalHydra.instance()

    def __exit__(self, *exc):
        from hydra.core.global_hydra import GlobalHydra

        try:
            self._init.__exit__(*exc)
        finally:
            GlobalHydra.instance().clear()
        return False


def compose(overrides: Sequence[str] = (), return_hydra_config: bool = False, check_values: bool = True):
    """The composed DictConfig for `overrides`, or ConfigError with a one-line reason (check_values: also the
    ranges and combinations of llmx.config.checks)."""
    from hydra import compose as hydra_compose

    overrides = list(overrides)
    with _HydraContext(conf_dir()):
        try:
            cfg = hydra_compose(
                config_name="config", overrides=overrides, return_hydra_config=return_hydra_config
            )
        except Exception as exc:
            raise ConfigError(format_compose_error(exc, overrides)) from exc
    _check_added_keys(cfg, overrides)
    found = value_problems(cfg) if check_values else []
    if found:
        raise ConfigError(found[0] if len(found) == 1 else "bad values:\n  " + "\n  ".join(found))
    return cfg


def _check_added_keys(cfg, overrides: Sequence[str]) -> None:
    # Hydra applies `+key=value` and `++key=value` inside open_dict, which lets them add a field the
    # typed schema does not have; the code reading the dataclass would then silently ignore it.
    from omegaconf import DictConfig, OmegaConf

    for ov in overrides:
        if not ov.startswith("+") or "=" not in ov:
            continue
        key = ov.lstrip("+").split("=", 1)[0].strip()
        if key.startswith("hydra.") or "/" in key or "@" in key:
            continue
        parent_path, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent_path) if parent_path else cfg
        if not isinstance(node, DictConfig):
            continue
        obj_type = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(obj_type):
            names = [f.name for f in dataclasses.fields(obj_type)]
            if leaf not in names:
                raise ConfigError(_unknown_key_message(key, obj_type, names))


# --------------------------------------------------------------------------------------------------
# Error messages


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _strip_omegaconf_context(msg: str) -> str:
    # OmegaConf appends "    full_key: ... / reference_type=... / object_type=..." lines; the key is
    # named by us instead.
    lines = [
        ln
        for ln in msg.splitlines()
        if not re.match(r"\s+(full_key:|reference_type=|object_type=)", ln)
    ]
    return "\n".join(lines).strip()


def _schema_root():
    from llmx.config.schema import LlmxConfig

    return LlmxConfig


def _dataclass_at(path: str):
    """The schema dataclass at a dotted path ('' is the root), or None."""
    cls = _schema_root()
    for part in [p for p in path.split(".") if p]:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return cls if dataclasses.is_dataclass(cls) else None


def _schema_key_paths(cls=None, prefix: str = "") -> list[str]:
    cls = cls or _schema_root()
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out.append(path)
        if dataclasses.is_dataclass(hints.get(f.name)):
            out.extend(_schema_key_paths(hints[f.name], path + "."))
    return out


def _unknown_key_message(full_key: str, obj_type=None, valid: Optional[Sequence[str]] = None) -> str:
    parent, _, leaf = full_key.rpartition(".")
    if valid is None:
        cls = obj_type if dataclasses.is_dataclass(obj_type) else _dataclass_at(parent)
        valid = [f.name for f in dataclasses.fields(cls)] if cls is not None else []
    where = f"'{parent}'" if parent else "the top level"
    msg = f"unknown key '{full_key}'; valid keys of {where}: {', '.join(sorted(valid))}"
    hint = difflib.get_close_matches(leaf, list(valid), n=1)
    if hint:
        msg += f" (did you mean '{parent + '.' if parent else ''}{hint[0]}'?)"
    elif not full_key.startswith("hydra."):
        # A key put in the wrong group, e.g. trainer.grad_clip for optim.grad_clip.
        elsewhere = [p for p in _schema_key_paths() if p.rsplit(".", 1)[-1] == leaf]
        if elsewhere:
            msg += f" (did you mean '{elsewhere[0]}'?)"
    return msg


def _dict_field_of(full_key: str) -> Optional[str]:
    """The Dict-typed schema field (e.g. 'optim.lr_scales') that full_key is an entry of, or None."""
    parts = full_key.split(".")
    for i in range(1, len(parts)):
        cls = _dataclass_at(".".join(parts[: i - 1]))
        if cls is None:
            return None
        if typing.get_origin(typing.get_type_hints(cls).get(parts[i - 1])) is dict:
            return ".".join(parts[:i])
    return None


def _override_for(full_key: Optional[str], overrides: Sequence[str]) -> Optional[str]:
    if not full_key:
        return None
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        if key == full_key:
            return ov
    return None


def _source_file(exc: BaseException) -> Optional[str]:
    # Hydra names the config being merged as "In 'optim/adamw': ..." when the error is in a file.
    m = re.match(r"In '([^']+)':", str(exc))
    if m and m.group(1) != "config":
        return f"conf/{m.group(1)}.yaml"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def format_compose_error(exc: BaseException, overrides: Sequence[str] = ()) -> str:
    """One line for a Hydra/OmegaConf composition failure, naming the key and what is valid."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import (
        ConfigAttributeError,
        ConfigKeyError,
        InterpolationResolutionError,
        OmegaConfBaseException,
        ValidationError,
    )

    chain = _chain(exc)
    where = next((s for s in map(_source_file, chain) if s), None)
    prefix = f"{where}: " if where else ""

    for e in chain:
        if isinstance(e, yaml.YAMLError):
            mark = getattr(e, "problem_mark", None)
            loc = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or _first_line(str(e))
            path = mark.name if mark and mark.name else "a config file"
            return f"YAML syntax error in {path}{loc}: {problem}"

    top = chain[0]
    if isinstance(top, MissingConfigException):
        missing = top.missing_cfg_file or ""
        m = re.search(r"Could not find '([^']+)'", str(top))
        missing = m.group(1) if m else missing
        inside = re.match(r"In '([^']+)':", str(top))
        ctx = f" (requested by conf/{inside.group(1)}.yaml)" if inside and inside.group(1) != "config" else ""
        if "/" in missing:
            group, name = missing.rsplit("/", 1)
            options = ", ".join(top.options) if top.options else "none"
            return f"no config '{name}' in group '{group}'{ctx}; available: {options}"
        return f"config '{missing}' not found{ctx}"
    if isinstance(top, OverrideParseException):
        bad = getattr(top, "override", None)
        detail = _first_line(str(top))
        return f"cannot parse override{f' {bad!r}' if bad else ''}: {detail} (see `llmx run --help` for the syntax)"
    m = re.match(r"Ambiguous value for argument '([^']+)'", str(top))
    if m:
        return (
            f"{m.group(1)}: a comma-separated value is a sweep; add -m/--multirun to sweep it, "
            "or write key=[a,b] for a list or key='a,b' for a string"
        )
    m = re.match(r"Could not append to config. An item is already at '([^']+)'", str(top))
    if m:
        key = m.group(1)
        return f"'{key}' already exists, so '+' cannot add it; write {key}=... (or ++{key}=... to add or override)"

    for e in chain:
        if not isinstance(e, OmegaConfBaseException):
            continue
        full_key = getattr(e, "full_key", None)
        if not full_key:
            continue
        if isinstance(e, (ConfigAttributeError, ConfigKeyError)) and "not in" in str(e):
            field = _dict_field_of(full_key)
            if field:
                # Struct mode: a plain override may change a dict's entries but not add one.
                ov = next((o for o in overrides if o.split("=", 1)[0] in (field, full_key)), None)
                fix = f"'++{ov}'" if ov else f"'++{field}={{key:value}}'"
                return f"{ov or full_key}: '{field}' is a dict; add entries to it with {fix}"
            return prefix + _unknown_key_message(full_key, getattr(e, "object_type", None))
        text = _strip_omegaconf_context(str(e))
        ov = _override_for(full_key, overrides)
        if isinstance(e, ValidationError):
            m = re.match(r"Invalid value '(.*)', expected one of \[(.*)\]", text)
            if m:
                detail = f"invalid value '{m.group(1)}'; valid values: {m.group(2)}"
            else:
                detail = re.sub(r" of type '[^']*'", "", text)
            return f"{ov}: {detail}" if ov else f"{prefix}{full_key}: {detail}"
        if isinstance(e, InterpolationResolutionError):
            return f"{prefix}{full_key}: {_first_line(text)}"
        return f"{ov or prefix + full_key}: {_first_line(text)}"

    # Hydra's own composition messages (ambiguous sweep value, '+' on an existing key, ...) are
    # already specific; drop the search-path listing that follows them.
    text = str(top).split("Config search path:")[0].strip()
    return " ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or type(top).__name__


# --------------------------------------------------------------------------------------------------
# Validation


def _required_keys(node, prefix: str = "") -> list[str]:
    """Dotted keys whose value is `???` or interpolates one."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    out = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            out.append(path)
            continue
        try:
            child = node[key]
        except (MissingMandatoryValue, InterpolationToMissingValueError):
            out.append(path)
            continue
        except Exception:
            continue  # a real error: to_object reports it
        if isinstance(child, DictConfig) and not OmegaConf.is_interpolation(node, key):
            out.extend(_required_keys(child, path + "."))
    return out


def _to_object_check(cfg) -> None:
    """Instantiate the schema dataclasses from the resolved config, so interpolation errors and
    type mismatches raise. A `???` value is required at run time, not an error: such keys, and keys
    interpolating them, are dropped from a copy first (their dataclass defaults stand in)."""
    from omegaconf import OmegaConf, open_dict

    cfg = cfg.copy()
    for path in _required_keys(cfg):
        parent_path, _, leaf = path.rpartition(".")
        parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
        with open_dict(parent):
            del parent[leaf]
    OmegaConf.to_object(cfg)


def _job_part(cfg):
    """What a run sees: the config without the `hydra` node (return_hydra_config=True adds it, and
    parts of it, such as hydra.job.num, are only set inside a real launch)."""
    from omegaconf import open_dict

    job = cfg.copy()
    with open_dict(job):
        job.pop("hydra", None)
    return job


def _check_hydra_launcher(cfg) -> None:
    # The slurm option copies launcher.* into hydra.launcher by interpolation; a typo there only
    # surfaces at submit time otherwise.
    from omegaconf import OmegaConf

    if "hydra" in cfg and "launcher" in cfg.hydra:
        OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def _options(directory: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (directory / group).glob("*.yaml"))


def validate_all() -> list[tuple[str, str]]:
    """Every config problem in the config directory as (what, error); [] when all is well."""
    directory = conf_dir()
    problems: list[tuple[str, str]] = []
    unparsable: set[Path] = set()

    for path in sorted(directory.rglob("*.yaml")):
        rel = path.relative_to(directory)
        try:
            with open(path) as f:  # a stream, so YAML errors carry the file name
                data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            unparsable.add(path)
            problems.append((f"conf/{rel}", format_compose_error(exc)))
            continue
        if rel.parts[0] == "recipe" and len(rel.parts) == 2:
            if not isinstance(data, dict):
                problems.append((f"conf/{rel}", "recipe file is not a mapping"))
                continue
            if data.get("name") != path.stem:
                problems.append(
                    (f"conf/{rel}", f"name is {data.get('name')!r} but must equal the file name {path.stem!r}")
                )
            if "kind" not in data:
                problems.append((f"conf/{rel}", "recipe has no 'kind'"))

    jobs = [f"recipe={r}" for r in _options(directory, "recipe")]
    jobs += [f"{g}={o}" for g in OPTION_GROUPS for o in _options(directory, g)]
    compose_problems: dict[str, list[str]] = {}
    for job in jobs:
        group, name = job.split("=", 1)
        if directory / group / f"{name}.yaml" in unparsable:
            continue
        try:
            cfg = compose([job], return_hydra_config=True, check_values=False)
            # An option with the default recipe: its ranges count, not how its batch splits over a launcher's
            # processes (a recipe that is launched so is composed with its own batch sizes).
            # model=run (and the recipes built on it) asks the user for model.path: composed alone it has none.
            found = value_problems(cfg, batch_split=group == "recipe", model_path=False)
            if found:
                raise ConfigError("; ".join(found))
            _check_hydra_launcher(cfg)
            _to_object_check(_job_part(cfg))
        except ConfigError as exc:
            compose_problems.setdefault(str(exc), []).append(job)
        except Exception as exc:  # resolution / instantiation errors from to_object
            compose_problems.setdefault(format_compose_error(exc, [job]), []).append(job)

    # One broken file that every composition includes (a group default) would otherwise produce one
    # identical line per recipe and option.
    for msg, what in compose_problems.items():
        problems.append((", ".join(what), msg))
    return problems


# --------------------------------------------------------------------------------------------------
# Listing and sweeps


def list_recipes() -> list[dict]:
    """name, kind, paper, description, fits_cpu, cpu_time (and path) of every recipe, read straight from the
    YAML files: no Hydra, no composition, so `llmx list` stays instant."""
    out = []
    for path in sorted((conf_dir() / "recipe").glob("*.yaml")):
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as exc:
            # Listed, not fatal: the other recipes still show, and `llmx validate` gives details.
            data = {"kind": "?", "description": f"unreadable: {format_compose_error(exc)}"}
        if not isinstance(data, dict):
            data = {}
        row = {"name": data.get("name", path.stem)}
        for key, default in _RECIPE_DEFAULTS.items():
            value = data.get(key, default)
            row[key] = default if value is None else value
        row["path"] = str(path)
        out.append(row)
    return out


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Hydra sweep syntax (a,b / range() / glob() / choice()) -> the cartesian product of concrete
    override lists, in the order Hydra's BasicSweeper launches them (last override varies fastest)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = list(overrides)
    with _HydraContext(conf_dir()) as gh:
        try:
            # glob(*) lists a group's options, which needs the config loader.
            parser = OverridesParser.create(config_loader=gh.config_loader())
            parsed = parser.parse_overrides(overrides)
            axes = []
            for o in parsed:
                if o.is_sweep_override():
                    key = o.get_key_element()
                    axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
                else:
                    axes.append([o.input_line])
        except Exception as exc:
            raise ConfigError(format_compose_error(exc, overrides)) from exc
    return [list(combo) for combo in itertools.product(*axes)]
