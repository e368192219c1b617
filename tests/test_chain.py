"""Runs chain into one another (llmx.models.runs): what an llmx run directory yields as a model, the values refused
before work, the report's stages, and the README's four-command chain run end to end."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from conftest import REPO, run_llmx
from llmx.config.checks import model_problems
from llmx.models.runs import find_output
from llmx.utils import LlmxError


def fake_run(path: Path, name: str = "x", kind: str = "sparsify", status: str = "ok", outputs=()) -> Path:
    """A run directory with the files every run writes and empty stand-ins for its outputs."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(f"name: {name}\nkind: {kind}\nmodel:\n  name: m\n  source: hf\n  path: null\n")
    (path / "run_info.json").write_text("{}")
    (path / "status.json").write_text(json.dumps({"status": status}))
    marker = {"artifacts": "rsparse.json", "compact": "sharp.json"}
    for out in outputs:
        (path / out).mkdir(parents=True)
        (path / out / marker.get(out.split("/")[0], "config.json")).write_text("{}")
    return path


def test_a_run_yields_its_most_derived_output(tmp_path):
    pre = fake_run(tmp_path / "pre", "galore2_tiny", "pretrain", outputs=["hf"])
    assert (find_output(pre).kind, find_output(pre).path) == ("hf", pre / "hf")
    sharp = fake_run(tmp_path / "sharp", "sharp_tiny", outputs=["compact"])
    found = find_output(sharp)
    assert (found.kind, found.path, found.what) == ("sharp", sharp / "compact", "run sharp_tiny (sparsify): compact/")
    merged = fake_run(tmp_path / "merge", "paramdelta_tiny", "merge", outputs=["merged/hf", "base/hf"])
    assert find_output(merged).path == merged / "merged" / "hf"
    rs = fake_run(tmp_path / "rs", "rsparse_tiny", outputs=["artifacts/s0.4", "artifacts/s0.5", "artifacts/s0.7"])
    assert find_output(rs, 0.5).path == rs / "artifacts" / "s0.5"
    # An output named directly: its run is found above it.
    direct = find_output(rs / "artifacts" / "s0.7")
    assert (direct.kind, direct.run_dir) == ("rsparse", rs)
    assert find_output(tmp_path / "not_a_run") is None and find_output(pre / "hf") is None  # a plain HF directory


@pytest.mark.parametrize("outputs, level, message", [
    (["artifacts/s0.4", "artifacts/s0.5"], None, "artifacts at sparsity 0.4, 0.5: choose one with model.level"),
    (["artifacts/s0.5"], 0.7, "model.level=0.7: .* has artifacts at sparsity 0.5 only"),
    (["hf"], 0.5, "model.level=0.5 is set, but .* holds no R-Sparse/TEAL artifacts"),
    ([], None, r"without a model to load: looked for artifacts/s<level>/, compact/, merged/ and hf/"),
])
def test_what_a_run_cannot_give_is_one_clear_error(tmp_path, outputs, level, message):
    run = fake_run(tmp_path / "r", outputs=outputs)
    with pytest.raises(LlmxError, match=message):
        find_output(run, level)


def test_model_values_refused_when_composed(tmp_path):
    from omegaconf import OmegaConf

    failed = fake_run(tmp_path / "failed", status="failed")
    sharp = fake_run(tmp_path / "sharp", outputs=["compact"])

    def model(**kw):
        base = {"name": "run", "source": "hf", "path": str(sharp), "level": None, "token_mode": None}
        return OmegaConf.create({**base, **kw})

    assert model_problems(model()) == []
    cases = {
        "status failed": model(path=str(failed)),
        "does not exist": model(path=str(tmp_path / "nowhere")),
        "model.level=1.5: must be a sparsity in (0, 1)": model(level=1.5),
        "model.token_mode='sometimes': must be one of": model(token_mode="sometimes"),
        "model.token_mode='decode' applies to an R-Sparse/TEAL artifact": model(token_mode="decode"),
        "model.source=preset builds a new model": model(source="preset"),
    }
    for expected, cfg in cases.items():
        found = model_problems(cfg)
        assert len(found) == 1 and expected in found[0], (expected, found)


def test_the_report_shows_a_chain_by_stage(tmp_path):
    from llmx.report import collect_runs, report_text

    a = fake_run(tmp_path / "c" / "1", "galore2_tiny", "pretrain", outputs=["hf"])
    (a / "final.json").write_text(json.dumps({"step": 20, "val_loss": 6.9}))
    b = fake_run(tmp_path / "c" / "2", "sharp_tiny", outputs=["compact"])
    (b / "final.json").write_text(json.dumps({"ppl_text": 1430.0, "text_ratio": 0.994, "mlp_reduction": 0.461}))
    c = fake_run(tmp_path / "c" / "3", "rsparse_tiny", outputs=["artifacts/s0.5"])
    (c / "final.json").write_text(json.dumps({"ppl@0.5": 1431.0, "ppl_ratio@0.5": 1.001}))
    for run, source in ((b, a), (c, b / "compact")):
        text = (run / "config.yaml").read_text().replace("path: null", f"path: {source}")
        (run / "config.yaml").write_text(text)
        (run / ".hydra").mkdir()
        (run / ".hydra" / "overrides.yaml").write_text(f"- model.path={source}\n- sparsify.eval_sequences=8\n")
    text = report_text(collect_runs([tmp_path / "c"]), width=None)
    rows = {line.split()[0]: line for line in text.splitlines()[3:6]}
    # One run of each recipe: its name alone, not its overrides; the source by the compared run's label.
    assert set(rows) == {"galore2_tiny", "sharp_tiny", "rsparse_tiny"}
    assert re.search(r"sharp_tiny\s+ok\s+-\s+galore2_tiny\s+ppl 1,430 \(0.994x original\), MLP weights -46.1%", text)
    assert re.search(r"rsparse_tiny\s+ok\s+-\s+sharp_tiny\s+ppl 1,431 at 50% \(1.001x dense\)", text)


def _readme_chain():
    section = (REPO / "README.md").read_text().split("## Chaining runs", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_readmes_chain_runs_end_to_end(tmp_path):
    """The README's four commands as written (the pretrain shortened and on the small pydoc corpus), then checks that
    each stage really loaded the one before: SHARP's layers in the R-Sparse run's model, R-Sparse's dense
    perplexity equal to SHARP's final one, the benchmark graded by the sparse shared model."""
    import hashlib

    from omegaconf import OmegaConf

    from llmx.models import load_pretrained
    from llmx.sharing import shared_layers
    from llmx.sparse.rsparse import RSparseLinear

    commands = _readme_chain()
    assert [c[:2] for c in commands] == [["llmx", "run"]] * 4 + [["llmx", "report"]]
    short = ["data=pydoc", "data.tokenizer.vocab_size=1024", "trainer.max_steps=20", "trainer.eval_every=10"]
    for i, command in enumerate(commands):
        run_llmx(command[1:] + (short if i == 0 else []), cwd=tmp_path, check=True, timeout=600)
    chain = tmp_path / "chain"
    sharp, rsparse = (json.loads((chain / d / "final.json").read_text()) for d in ("2_sharp", "3_rsparse"))
    assert rsparse["dense_ppl"] == pytest.approx(sharp["ppl_text"], rel=1e-5)

    cfg = OmegaConf.load(chain / "4_gsm_infinite" / "config.yaml")
    model, _ = load_pretrained(cfg.model)
    assert sorted(shared_layers(model)) == [1, 3]
    sparse = {n for n, m in model.named_modules() if isinstance(m, RSparseLinear)}
    planned = json.loads((chain / "3_rsparse" / "artifacts" / "s0.5" / "rsparse.json").read_text())["layers"]
    assert sparse == set(planned) and len(sparse) > 11  # of 22: attention everywhere, MLPs of the kept layers
    assert not any(re.match(r"model\.layers\.[13]\.mlp", n) for n in sparse)
    scores = json.loads((chain / "4_gsm_infinite" / "scores.json").read_text())
    assert scores["fingerprint"]["modules"] == hashlib.sha256(repr(model).encode()).hexdigest()[:16]
    assert [c["op"] for c in scores["cells"]] == [2, 3, 4, 5]

    # An artifact is checked against its model's shapes before any weight is read.
    from llmx.models.runs import check_fits

    check_fits(cfg.model)
    bad = tmp_path / "bad_rsparse"
    shutil.copytree(chain / "3_rsparse", bad)
    doc_path = bad / "artifacts" / "s0.5" / "rsparse.json"
    doc = json.loads(doc_path.read_text())
    doc["layers"]["model.layers.0.self_attn.q_proj"]["in"] = 96
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(LlmxError, match=r"layer model.layers.0.self_attn.q_proj is \(in, out\) = \(96, 128\) in the "
                                        r"artifact, the model has \(128, 128\)"):
        check_fits(OmegaConf.merge(cfg.model, {"path": str(bad)}))

    report = run_llmx(commands[4][1:], cwd=tmp_path, check=True, env={"COLUMNS": "200"}).stdout
    for stage, source in (("sharp_tiny", "galore2_tiny"), ("rsparse_tiny", "sharp_tiny"),
                          ("gsm_infinite_tiny", "rsparse_tiny")):
        assert re.search(rf"^{stage}\s+ok\s+-\s+{source}\s", report, flags=re.M), report
