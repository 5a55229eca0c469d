"""``plwlab dashboard`` on a real (small) study logged to W&B offline: the view and the report read back through
wandb-workspaces' own models, and every panel names a key that the study's runs logged, read from their offline
W&B records (a panel naming a metric no run logs is the bug of hand-made dashboards). The analysis run and the
generation tables are read back the same way."""

import json
import subprocess
import sys

import pandas as pd
import pytest
from test_train import cli_env
from wandb_records import offline_runs

from plwlab.analysis.dashboard import read_report, read_view

DATASETS = ("sample_short", "sample_medium", "alpaca_sample")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """``plwlab study`` made small (3 Alpaca-format datasets x PLW 0, 0.1, 1, six steps each (loss RSD needs five), quick evaluation
    on few items), logged to W&B offline (the study's default)."""
    root = tmp_path_factory.mktemp("dashboard")
    out = root / "study"
    few = ["eval.memorization.n=2", "eval.memorization.max_new_tokens=4", "eval.generations.alpaca_eval.limit=3",
           "eval.generations.pandalm.limit=3", "eval.lm_eval.limit=3", "eval.lm_eval.max_gen_toks=4",
           "eval.generations.alpaca_eval.max_new_tokens=8", "eval.generations.pandalm.max_new_tokens=8"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "plwlab.cli", "study", "--out", str(out), "trainer.max_steps=6",
                           "data.limit=60", f"paths.data_dir={root / 'data'}",
                           f"data={','.join(DATASETS)}",
                           *(a for o in few for a in ("--eval", o))],
                          capture_output=True, text=True, env=cli_env(), timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "plwlab dashboard" in done.stdout  # the study says how to see it
    dash = subprocess.run([sys.executable, "-m", "plwlab.cli", "dashboard", str(out), "--dry-run", "--preview"],
                          capture_output=True,
                          text=True, env=cli_env(), timeout=300)  # fmt: skip
    assert dash.returncode == 0, dash.stderr[-3000:]
    return out


def panel_keys(panel) -> list[tuple[str, str]]:
    """(kind, key) of every metric a panel names: history (a LinePlot's y, a Metric, a media key), summary or
    config."""
    keys = []
    for field in ("x", "y", "z"):
        values = getattr(panel, field, None)
        for value in values if isinstance(values, list) else [values]:
            kind, name = type(value).__name__, getattr(value, "name", value)
            if value is None or name == "Step":  # W&B's own x-axis, not a logged key
                continue
            if isinstance(value, str) or kind == "Metric":
                keys.append(("history", value if isinstance(value, str) else value.name))
            elif kind == "SummaryMetric":
                keys.append(("summary", value.name))
            elif kind == "Config":
                keys.append(("config", value.name))
    keys += [("history", k) for k in getattr(panel, "media_keys", None) or []]
    return keys


def all_panels(view, report) -> list:
    panels = [p for section in view.sections for p in section.panels]
    return panels + [p for block in report.blocks if type(block).__name__ == "PanelGrid" for p in block.panels]


def logged_keys(runs) -> dict[str, set[str]]:
    return {"history": set().union(*(r.history_keys for r in runs)), "summary": set().union(*(r.summary_keys for r in runs)),
            "config": set().union(*(set(r.config) for r in runs))}  # fmt: skip


def test_every_panel_names_a_key_the_study_logged(study):
    view, report = read_view(study / "dashboard" / "view.json"), read_report(study / "dashboard" / "report.json")
    runs = offline_runs(study)
    assert {r.job_type for r in runs} == {"train", "eval", "analysis"} and {r.group for r in runs} == {"study"}
    logged = logged_keys(runs)
    named = [(type(p).__name__, kind, key) for p in all_panels(view, report) for kind, key in panel_keys(p)]
    assert len(named) > 40
    missing = [n for n in named if n[2] not in logged[n[1]]]
    assert missing == []
    kinds = {kind for _, kind, _ in named}
    assert kinds == {"history", "summary", "config"}
    # what the issue asks each group to show is there
    keys = {key for _, _, key in named}
    assert {"train/loss", "train/completion_loss", "train/prompt_loss", "loss_rsd", "param_distance", "plw",
            "memorization/bleu", "alpaca_eval/generation_length", "arc_challenge/acc_norm", "pandalm/win_rate",
            "figures/performance_by_wp", "figures/plw_rg_contour", "figures/run_metrics"} <= keys


def test_the_preview_draws_each_panel_group(study):
    view = read_view(study / "dashboard" / "view.json")
    previews = sorted((study / "dashboard" / "preview").glob("*.png"))
    assert len(previews) == len(view.sections) == 4 and all(p.read_bytes()[:4] == b"\x89PNG" for p in previews)


def test_a_panel_naming_a_metric_no_run_logged_is_caught(study):
    """The check above can fail: a misspelt metric in a panel is found."""
    import wandb_workspaces.reports.v2 as wr

    view = read_view(study / "dashboard" / "view.json")
    view.sections[0].panels.append(wr.LinePlot(y=["train/los"]))
    logged = logged_keys(offline_runs(study))
    assert [k for p in view.sections[0].panels for kind, k in panel_keys(p) if k not in logged[kind]] == ["train/los"]


def test_the_view_colours_every_run_by_plw_and_the_report_has_a_section_per_dataset(study):
    view, report = read_view(study / "dashboard" / "view.json"), read_report(study / "dashboard" / "report.json")
    runs = offline_runs(study)
    run_ids = {r.run_id: r for r in runs if r.job_type in ("train", "eval")}
    colors = {run: s.color for run, s in view.runset_settings.run_settings.items()}
    assert set(colors) == set(run_ids) and len(colors) == 18  # 9 training runs, 9 evaluations
    by_plw = {}
    for run_id, run in run_ids.items():
        by_plw.setdefault(run.config["plw"], set()).add(colors[run_id])
    assert len(by_plw) == 3 and all(len(c) == 1 for c in by_plw.values()) and len(set().union(*by_plw.values())) == 3
    headings = [b.text for b in report.blocks if type(b).__name__ == "H2"]
    assert [h.split(" (")[0] for h in headings] == [*DATASETS, "Analysis"]  # by Rg
    grids = [b for b in report.blocks if type(b).__name__ == "PanelGrid"]
    filters = {str(g.runsets[0].filters) for g in grids}
    assert all(any(f"Config(\"dataset\") == '{d}'" in f for f in filters) for d in DATASETS)
    text = json.dumps([getattr(b, "text", "") for b in report.blocks], default=str)
    assert "NOT clean" in text or "clean fit" in text or "critical_plw" in text  # the GLMM table and its notes


def test_the_analysis_run_and_the_generation_tables_read_back(study):
    runs = offline_runs(study)
    (analysis,) = [r for r in runs if r.job_type == "analysis"]
    glmm = pd.read_csv(study / "analysis" / "glmm.csv")
    table = analysis.table("analysis/glmm")
    assert table["columns"] == list(glmm.columns) and [row[0] for row in table["data"]] == list(glmm["dataset"])
    for name in ("performance_by_wp", "plw_rg_contour", "run_metrics"):
        assert analysis.image(f"figures/{name}").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((study / "analysis" / "summary.json").read_text())
    for dataset, fit in summary["glmm"].items():
        assert analysis.summary[f"glmm/{dataset}/clean"] == fit["clean"]
    evals = [r for r in runs if r.job_type == "eval"]
    assert len(evals) == 9
    for run in evals:
        rows = run.table("generations/alpaca_eval")["data"]
        assert len(rows) == 3 and all(row[4] == run.config["plw"] for row in rows)


def test_saving_needs_an_entity_and_a_key(study, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    env = {k: v for k, v in cli_env().items() if k not in ("WANDB_API_KEY", "WANDB_ENTITY")}
    no_entity = subprocess.run([sys.executable, "-m", "plwlab.cli", "dashboard", str(study)], capture_output=True,
                               text=True, env=env)  # fmt: skip
    assert no_entity.returncode == 1 and no_entity.stderr.strip() == (
        "error: saving needs a W&B entity: --entity E (or WANDB_ENTITY), or --dry-run")
    no_key = subprocess.run([sys.executable, "-m", "plwlab.cli", "dashboard", str(study), "--entity", "me"],
                            capture_output=True, text=True, env=env)  # fmt: skip
    assert no_key.returncode == 1 and "needs WANDB_API_KEY" in no_key.stderr.strip().splitlines()[-1]
