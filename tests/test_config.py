"""Every shipped config composes and type-checks; broken configs and bad overrides are named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmx.config import compose as C
from llmx.config.compose import ConfigError, compose, expand_sweep, list_recipes, validate_all

CONF = C.DEFAULT_CONF_DIR
RECIPES = sorted(p.stem for p in (CONF / "recipe").glob("*.yaml"))
GROUP_OPTIONS = [(g, p.stem) for g in C.OPTION_GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.fixture(autouse=True)
def _real_conf(monkeypatch):
    monkeypatch.delenv("LLMX_CONF_DIR", raising=False)


def test_layout_found_configs():
    assert "pretrain_tiny" in RECIPES
    assert {g for g, _ in GROUP_OPTIONS} == set(C.OPTION_GROUPS)


# Every recipe and every group option is composed, resolved and type-checked by validate_all, once each
# (test_validate_all_real_conf_is_clean); separate per-option tests would compose them all a second time.


def test_cli_group_choice_beats_recipe_default():
    # pretrain_tiny pins model=llama_tiny through `override /model`; a command-line choice must win.
    assert compose(["recipe=pretrain_tiny", "model=llama_60m"]).model.name == "llama_60m"


def test_validate_all_real_conf_is_clean():
    assert validate_all() == []


# ---------------------------------------------------------------------------------------------------
# Broken copies of conf/


def _edit(conf: Path, rel: str, old: str, new: str) -> None:
    path = conf / rel
    text = path.read_text()
    assert old in text, (rel, old)
    path.write_text(text.replace(old, new, 1))


@pytest.fixture
def conf_copy(tmp_path, monkeypatch):
    from conftest import small_conf_copy

    dst = small_conf_copy(tmp_path / "conf")
    monkeypatch.setenv("LLMX_CONF_DIR", str(dst))
    return dst


def _problems_text(problems):
    return "\n".join(f"{what} :: {err}" for what, err in problems)


@pytest.mark.slow  # each composes every config of a small copy (~4 s); make test runs it, test-fast does not
def test_validate_detects_unknown_key(conf_copy):
    _edit(conf_copy, "model/llama_7b.yaml", "hidden_size: 4096", "hidden_size: 4096\nhiden_dim: 3")
    problems = validate_all()
    assert len(problems) == 1, _problems_text(problems)
    what, err = problems[0]
    # One problem, naming the option and every recipe that selects it.
    assert "model=llama_7b" in what and "recipe=galore2_llama7b" in what
    assert "conf/model/llama_7b.yaml" in err and "model.hiden_dim" in err and "hidden_size" in err


@pytest.mark.slow  # each composes every config of a small copy (~4 s); make test runs it, test-fast does not
def test_validate_detects_unknown_key_in_a_default_once(conf_copy):
    # trainer/default is in every composition: one problem naming all of them, not one per config.
    _edit(conf_copy, "trainer/default.yaml", "max_steps: 100", "max_steps: 100\nfoo: 1")
    problems = validate_all()
    assert len(problems) == 1, _problems_text(problems)
    what, err = problems[0]
    assert "recipe=pretrain_tiny" in what and "trainer=default" in what
    assert "unknown key 'trainer.foo'" in err and "conf/trainer/default.yaml" in err


@pytest.mark.slow  # each composes every config of a small copy (~4 s); make test runs it, test-fast does not
def test_validate_detects_wrong_type(conf_copy):
    _edit(conf_copy, "recipe/pretrain_llama60m.yaml", "max_steps: 10000", "max_steps: ten")
    problems = validate_all()
    assert len(problems) == 1, _problems_text(problems)
    what, err = problems[0]
    assert what == "recipe=pretrain_llama60m"
    assert "trainer.max_steps" in err and "Integer" in err and "'ten'" in err


@pytest.mark.slow  # each composes every config of a small copy (~4 s); make test runs it, test-fast does not
def test_validate_detects_name_not_stem_and_missing_kind(conf_copy):
    _edit(conf_copy, "recipe/pretrain_llama60m.yaml", "name: pretrain_llama60m", "name: llama60m")
    _edit(conf_copy, "recipe/pretrain_llama60m.yaml", "kind: pretrain\n", "")
    problems = validate_all()
    text = _problems_text(problems)
    assert len(problems) == 2, text
    assert all(what == "conf/recipe/pretrain_llama60m.yaml" for what, _ in problems)
    assert "'llama60m'" in text and "'pretrain_llama60m'" in text and "kind" in text


@pytest.mark.slow  # each composes every config of a small copy (~4 s); make test runs it, test-fast does not
def test_validate_detects_yaml_syntax_error(conf_copy):
    _edit(conf_copy, "model/llama_60m.yaml", "hidden_size: 512", "hidden_size: [512")
    problems = validate_all()
    text = _problems_text(problems)
    assert ("conf/model/llama_60m.yaml", problems[0][1]) in problems, text
    assert "YAML syntax error" in problems[0][1] and "llama_60m.yaml line" in problems[0][1]
    # The recipe that selects this model fails to compose for the same reason and says so.
    assert any("recipe=pretrain_llama60m" in what and "llama_60m.yaml" in err for what, err in problems), text


@pytest.mark.slow  # each composes every config of a small copy (~4 s); make test runs it, test-fast does not
def test_validate_detects_bad_interpolation_and_enum(conf_copy):
    _edit(conf_copy, "logger/wandb.yaml", "project: llmx", "project: ${nope}")
    _edit(conf_copy, "data/c4.yaml", "source: hub", "source: web")
    problems = validate_all()
    text = _problems_text(problems)
    wandb_err = next(err for what, err in problems if what == "logger=wandb")
    assert "logger.project" in wandb_err and "nope" in wandb_err
    # data/c4 is also pulled in by the C4 recipe: one entry names both.
    what, c4_err = next((w, e) for w, e in problems if "data=c4" in w)
    assert "recipe=pretrain_llama60m" in what, text
    assert "data.source" in c4_err and "hub" in c4_err and "'web'" in c4_err


@pytest.mark.slow  # each composes every config of a small copy (~4 s); make test runs it, test-fast does not
def test_validate_detects_recipe_selecting_missing_option(conf_copy):
    _edit(conf_copy, "recipe/pretrain_tiny.yaml", "override /model: llama_tiny", "override /model: llama_tinyy")
    problems = validate_all()
    text = _problems_text(problems)
    assert any("no config 'llama_tinyy' in group 'model'" in err and "llama_tiny" in err for _, err in problems), text


@pytest.mark.slow  # each composes every config of a small copy (~4 s); make test runs it, test-fast does not
def test_validate_allows_required_values(conf_copy):
    # `???` means "set at run time" (e.g. the data paths of data=files): not a config error, and
    # neither is a key that interpolates such a value.
    _edit(conf_copy, "data/files.yaml", "name: files\n", "")
    _edit(conf_copy, "data/files.yaml", "text_field: text", "text_field: ${data.name}")
    assert OmegaConf.is_missing(compose(["data=files"]).data, "name")
    assert validate_all() == []


def test_missing_conf_dir_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMX_CONF_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="no config.yaml"):
        compose([])


# ---------------------------------------------------------------------------------------------------
# Error messages for bad overrides


@pytest.mark.parametrize(
    "override,expected",
    [
        ("trainer.foo=1", ["unknown key 'trainer.foo'", "valid keys of 'trainer'", "batch_size", "compile"]),
        ("+trainer.foo=1", ["unknown key 'trainer.foo'", "max_steps"]),
        ("++optim.foo=1", ["unknown key 'optim.foo'", "weight_decay"]),
        ("trainer.max_step=3", ["did you mean 'trainer.max_steps'"]),
        ("trainer.grad_clip=1", ["did you mean 'optim.grad_clip'"]),
        ("foo=1", ["unknown key 'foo'", "top level", "trainer"]),
        ("trainer.max_steps=abc", ["trainer.max_steps=abc: Value 'abc' could not be converted to Integer"]),
        ("trainer.precision=fp8", ["trainer.precision=fp8", "'fp8'", "auto, fp32, bf16"]),
        ("data.tokenizer.source=bogus", ["data.tokenizer.source=bogus", "trained, pretrained, model"]),
        ("optim=sgd", ["no config 'sgd' in group 'optim'; available: adamw"]),
        ("recipe=nope", ["no config 'nope' in group 'recipe'", "pretrain_tiny", "pretrain_llama60m"]),
        ("trainer.max_steps=[", ["cannot parse override 'trainer.max_steps=['"]),
        ("model=llama_60m,llama_7b", ["--multirun"]),
        ("+seed=1", ["'seed' already exists", "++seed"]),
        ("optim.lr_scales={*mlp.*:0.5}", ["'optim.lr_scales' is a dict", "'++optim.lr_scales={*mlp.*:0.5}'"]),
    ],
)
def test_compose_error_messages(override, expected):
    with pytest.raises(ConfigError) as info:
        compose([override])
    msg = str(info.value)
    for part in expected:
        assert part in msg, msg
    assert "\n" not in msg and "search path" not in msg.lower() and "$VALUE" not in msg
    assert info.value.__cause__ is not None or override.startswith("+")


def test_plus_on_dict_field_is_allowed():
    cfg = compose(["+data.generator_args.n=3", "++seed=4", "++trainer.max_steps=7",
                   "++optim.lr_scales={*self_attn.*_proj.weight:0.25,*mlp.*_proj.weight:0.5}"])
    assert cfg.data.generator_args.n == 3 and cfg.seed == 4 and cfg.trainer.max_steps == 7
    # fnmatch patterns with dots stay whole keys, in the order given (the first match wins)
    assert list(cfg.optim.lr_scales.items()) == [("*self_attn.*_proj.weight", 0.25), ("*mlp.*_proj.weight", 0.5)]


def test_format_compose_error_direct():
    from hydra.errors import MissingConfigException

    exc = MissingConfigException(
        "In 'config': Could not find 'optim/sgd'\n\nAvailable options in 'optim':\n\tadamw\nConfig search path:\n\t...",
        missing_cfg_file="optim/sgd",
        options=["adamw"],
    )
    assert C.format_compose_error(exc, ["optim=sgd"]) == "no config 'sgd' in group 'optim'; available: adamw"


# ---------------------------------------------------------------------------------------------------
# Sweeps and listing


def test_expand_sweep_comma_and_range():
    jobs = expand_sweep(["recipe=pretrain_tiny", "optim.lr=1e-3,3e-3", "seed=range(3)"])
    assert len(jobs) == 6
    assert jobs[0] == ["recipe=pretrain_tiny", "optim.lr=0.001", "seed=0"]
    assert jobs[-1] == ["recipe=pretrain_tiny", "optim.lr=0.003", "seed=2"]
    assert {tuple(j[1:]) for j in jobs} == {(f"optim.lr={lr}", f"seed={s}") for lr in ("0.001", "0.003") for s in range(3)}


def test_expand_sweep_glob_and_choice():
    jobs = expand_sweep(["recipe=glob(*)", "trainer.max_steps=choice(5,10)"])
    assert jobs == [[f"recipe={r}", f"trainer.max_steps={s}"] for r in RECIPES for s in (5, 10)]
    # Each job is plain override strings; that every recipe composes is test_compose_every_recipe's
    # check, so composing all 2 x 29 jobs again would only repeat it.
    for job in jobs[:2]:
        assert compose(job).trainer.max_steps == int(job[1].split("=")[1])


def test_expand_sweep_without_sweeps_and_errors():
    assert expand_sweep(["seed=1"]) == [["seed=1"]]
    assert expand_sweep([]) == [[]]
    with pytest.raises(ConfigError):
        expand_sweep(["seed=range("])


def test_list_recipes_fields():
    rows = {r["name"]: r for r in list_recipes()}
    assert set(rows) == set(RECIPES)
    tiny = rows["pretrain_tiny"]
    assert tiny["kind"] == "pretrain" and tiny["fits_cpu"] is True and tiny["description"]
    assert rows["pretrain_llama60m"]["fits_cpu"] is False and "GaLore" in rows["pretrain_llama60m"]["paper"]
    for r in rows.values():
        assert set(r) >= {"name", "kind", "paper", "description", "fits_cpu"}


def test_import_and_list_stay_light():
    code = (
        "import sys, llmx.config.compose as c; c.list_recipes(); "
        "heavy = [m for m in ('torch', 'transformers', 'hydra', 'wandb', 'matplotlib') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_list_recipes_survives_a_broken_recipe(conf_copy):
    _edit(conf_copy, "recipe/pretrain_llama60m.yaml", "max_steps: 10000", "max_steps: [10000")
    rows = {r["name"]: r for r in list_recipes()}
    assert rows["pretrain_tiny"]["kind"] == "pretrain"
    assert "YAML syntax error" in rows["pretrain_llama60m"]["description"]


def test_schema_defaults_match_list_defaults():
    from llmx.config.schema import LlmxConfig

    defaults = LlmxConfig()
    for key, value in C._RECIPE_DEFAULTS.items():
        assert getattr(defaults, key) == value, key
