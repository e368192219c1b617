"""metrics.jsonl / final.json / trackers, the progress display, and the loss-curve plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmx.logging.metrics import MetricsLogger, read_metrics, truncate_after
from llmx.logging.plots import plot_run
from llmx.logging.progress import Progress
from llmx.utils import LlmxError


class _Scalar:
    """Stands in for a 0-d tensor: anything with .item() is logged as its number."""

    def __init__(self, v):
        self.v = v

    def item(self):
        return self.v


@pytest.fixture(autouse=True)
def _rank0_and_quiet_wandb(monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_default"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_lines_and_final(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, {"seed": 0}) as m:
        m.log(10, {"loss": 2.5, "lr": 1e-3})
        # Each line reaches the file before the next call: a killed run keeps what it logged.
        assert _lines(run)[0]["loss"] == 2.5
        m.log(20, {"loss": _Scalar(2.0), "tokens_per_s": 1234.5})
        m.log(20, {"val_loss": 2.2, "val_ppl": 9.03})
        m.log_final({"step": 20, "loss": 2.0, "val_loss": 2.2})
    lines = _lines(run)
    assert [l["step"] for l in lines] == [10, 20, 20]
    assert all(isinstance(l["time"], float) for l in lines)
    assert lines[1]["loss"] == 2.0 and lines[1]["tokens_per_s"] == 1234.5
    assert lines[2] == {"step": 20, "time": lines[2]["time"], "val_loss": 2.2, "val_ppl": 9.03}
    assert json.loads((run / "final.json").read_text()) == {"step": 20, "loss": 2.0, "val_loss": 2.2}
    assert not list(run.glob(".final.json*"))  # atomic write left no temp file
    m.log(30, {"loss": 1.0})  # after close: ignored, not an error
    assert len(_lines(run)) == 3


def test_truncate_after_resume(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, {}) as m:
        for step in range(10, 60, 10):
            m.log(step, {"loss": 1.0 / step})
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 60, "lo')  # the job was killed mid-line
    assert truncate_after(run, 30) == 3
    assert [l["step"] for l in _lines(run)] == [10, 20, 30]
    with MetricsLogger(run, {}) as m:  # the resumed run logs 40 again
        m.log(40, {"loss": 0.5})
    assert [l["step"] for l in _lines(run)] == [10, 20, 30, 40]
    assert truncate_after(run, 100) == 0
    assert truncate_after(tmp_path / "nothing", 5) == 0


def test_append_after_cut_line_starts_fresh_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with MetricsLogger(run, {}) as m:
        m.log(3, {"loss": 0.5})
    assert [r["step"] for r in read_metrics(run)] == [1, 3]


def test_non_rank0_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    run = tmp_path / "run"
    m = MetricsLogger(run, {"a": 1}, backend="wandb", logger_cfg={"mode": "offline"})
    assert not m.enabled
    m.log(1, {"loss": 1.0})
    m.log_final({"loss": 1.0})
    m.close()
    assert not run.exists()
    p = Progress(100)
    p.update(50, loss=1.0)
    p.close()


def test_unknown_backend(tmp_path):
    with pytest.raises(LlmxError, match="valid: none, wandb, tensorboard"):
        MetricsLogger(tmp_path, {}, backend="mlflow")


def test_wandb_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    run = tmp_path / "run"
    with MetricsLogger(run, {"optim": {"lr": 1e-3}}, backend="wandb", logger_cfg={"project": "llmx"}) as m:
        m.log(1, {"loss": 1.0})
        m.log_final({"loss": 1.0})
    assert (run / "wandb_id.txt").read_text().strip()
    assert not (run / "wandb").exists()
    assert len(_lines(run)) == 1


def test_wandb_offline_writes_under_run_dir_and_resumes_same_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"name": "pretrain_tiny", "optim": {"lr": 1e-3}, "lr2": "${optim.lr}"})
    logger_cfg = {"backend": "wandb", "project": "llmx", "group": "g", "tags": ["t"], "mode": None}
    run = tmp_path / "run"
    with MetricsLogger(run, cfg, logger_cfg=logger_cfg) as m:  # backend taken from logger_cfg
        assert m.backend == "wandb"
        m.log(1, {"loss": 1.0})
    run_id = (run / "wandb_id.txt").read_text().strip()
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(run_id)
    assert not (tmp_path / "wandb_default").exists()  # dir=run_dir wins over WANDB_DIR

    with MetricsLogger(run, cfg, logger_cfg=logger_cfg) as m:  # resumed job
        m.log(2, {"loss": 0.5})
    assert (run / "wandb_id.txt").read_text().strip() == run_id
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(run_id in p.name for p in offline)


def test_wandb_explicit_mode_beats_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    with MetricsLogger(run, {}, backend="wandb", logger_cfg={"mode": "disabled"}) as m:
        m.log(1, {"loss": 1.0})
    assert not (run / "wandb").exists()


def test_close_finishes_wandb_even_on_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    import wandb

    with pytest.raises(RuntimeError):
        with MetricsLogger(tmp_path / "run", {}, backend="wandb"):
            raise RuntimeError("boom")
    assert wandb.run is None


def test_tensorboard_event_file(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, {}, backend="tensorboard") as m:
        m.log(1, {"loss": 2.0, "note": "text is skipped", "nan": float("nan")})
        m.log(2, {"loss": 1.5})
        m.log_final({"step": 2, "loss": 1.5})
    events = list((run / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
    assert "final/loss" in acc.Tags()["scalars"]


def test_progress_non_tty_prints_bounded_lines(capsys):
    with Progress(1000, start_step=0, enabled=True) as p:  # capsys: stdout is not a terminal
        for step in range(1, 1001):
            p.update(step, loss=5.0 - step / 1000, tokens_per_s=15000.0)
    lines = capsys.readouterr().out.splitlines()
    assert 3 <= len(lines) <= 12, lines
    assert "1000/1000" in lines[-1] and "loss 4.0000" in lines[-1] and "15,000 tok/s" in lines[-1]
    assert all("step" in l or "start" in l for l in lines)


def test_progress_non_tty_time_based_lines(capsys, monkeypatch):
    # A slow run still shows signs of life between percentage milestones.
    import llmx.logging.progress as prog

    now = [1000.0]
    monkeypatch.setattr(prog.time, "monotonic", lambda: now[0])
    p = Progress(1000, start_step=500, enabled=True, interval_s=30)
    for step in range(501, 521):
        now[0] += 10  # 10 s per step, 2% of the run in total
        p.update(step, loss=1.0)
    p.close()
    lines = capsys.readouterr().out.splitlines()
    assert 6 <= len(lines) <= 9, lines  # start + one per 30 s + the stop line
    assert lines[0].startswith("[train] start 500/1000")
    assert "stopped at 520/1000" in lines[-1]


def test_progress_tty_bar(capsys):
    with Progress(20, enabled=True, interactive=True) as p:
        for step in range(1, 21):
            p.update(step, loss=1.0, tokens_per_s=10.0)
        p.print("eval: val_loss 1.0")
    out = capsys.readouterr().out
    assert "20/20" in out and "eval: val_loss 1.0" in out


def test_plot_run_png(tmp_path):
    run = tmp_path / "run"
    with MetricsLogger(run, {}) as m:
        for step in range(1, 51):
            m.log(step, {"loss": 5.0 / step})
            if step % 10 == 0:
                m.log(step, {"val_loss": 5.5 / step})
    out = plot_run(run, log_y=True)
    assert out == run / "loss_curve.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    with pytest.raises(LlmxError):
        plot_run(tmp_path / "missing")


def test_plain_config_resolves_and_stringifies_enums():
    from omegaconf import OmegaConf

    from llmx.config.compose import compose
    from llmx.logging.metrics import plain_config

    cfg = compose(["logger=wandb"])
    plain = plain_config(cfg)
    json.dumps(plain)  # what W&B receives must be plain data
    assert plain["kind"] == "pretrain" and plain["trainer"]["precision"] == "auto"
    assert plain_config(OmegaConf.create({"a": 1, "b": "${a}"})) == {"a": 1, "b": 1}
    assert plain_config(OmegaConf.to_object(cfg))["logger"]["backend"] == "wandb"


def test_truncate_on_an_open_logger_and_logger_cfg_from_cfg(tmp_path):
    # The trainer's resume path: the logger already holds metrics.jsonl open for appending.
    from llmx.config.compose import compose

    run = tmp_path / "run"
    with MetricsLogger(run, {}) as m:
        for step in (10, 20, 30):
            m.log(step, {"loss": 1.0})
    cfg = compose(["logger=tensorboard"])
    with MetricsLogger(run, cfg) as m:  # logger settings come from cfg.logger
        assert m.backend == "tensorboard"
        assert m.truncate_after(20) == 1
        m.log(30, {"loss": 0.5})
    assert [(l["step"], l["loss"]) for l in _lines(run)] == [(10, 1.0), (20, 1.0), (30, 0.5)]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert MetricsLogger(tmp_path / "other", {}, enabled=False).truncate_after(0) == 0
