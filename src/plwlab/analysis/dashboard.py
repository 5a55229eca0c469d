"""``plwlab dashboard``: the study in W&B, built from code with W&B's view and report API (``wandb-workspaces``).

From a study or sweep directory (or its results table) it builds

- a **workspace view** of the sweep's W&B group, every run coloured by its PLW: the training-loss curves
  (weighted, completion and prompt loss against step), loss RSD and the distance from the pretrained weights
  against PLW (the paper's Fig. 1), generation length and memorization BLEU against PLW (Fig. 2) and each
  benchmark's primary score against PLW (Fig. 3);
- a **report** with the same panels in a section per dataset (a W&B view's sections share one run set, a report's
  panel grids each have their own, so the per-dataset sections live here), then the analysis: the GLMM table with
  its clean / not-clean flags and a sentence on each fit that is not, the GAM's optimal PLW by Rg (Table 4 style)
  and the study's figures from the analysis run (:mod:`plwlab.analysis.tracking`).

Every panel names a key the study's runs log: the training runs' per-step metrics (:class:`PLWModule`), their
summary (``metrics.json``, :func:`plwlab.training.trackers.log_summary`), the eval runs' ``<benchmark>/<metric>``
(:func:`plwlab.results.metric_key`) and the analysis run's figures. ``--dry-run`` writes both as JSON (the
models ``wandb-workspaces`` saves) and saves nothing; saving needs ``WANDB_API_KEY``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from plwlab.analysis.analyze import RESULT_RUN_METRICS
from plwlab.analysis.figures import RUN_METRICS
from plwlab.analysis.report import fit_notes
from plwlab.analysis.tracking import FIGURES, figure_key
from plwlab.evaluation.scoreboard import PRIMARY_METRICS
from plwlab.results import FILE_NAME, metric_key, read_table, sweep_names
from plwlab.rundir import find_runs

TRAIN_CURVES = {"train/loss": "weighted training loss", "train/completion_loss": "completion loss (NLL)",
                "train/prompt_loss": "prompt loss (NLL)", "val/loss": "validation completion loss"}  # fmt: skip
TRAIN_SUMMARY = ("loss_rsd", "param_distance")  # metrics.json keys, in each training run's summary (Fig. 1)


@dataclass
class RunValues:
    """One run's values as its W&B runs hold them, read from its folder: PLW, dataset, per-step history
    (``metrics.csv``) and summary (``metrics.json`` + its ``<benchmark>/<metric>`` scores)."""

    plw: float
    dataset: str
    history: pd.DataFrame
    summary: dict[str, Any]


@dataclass
class StudyFacts:
    """What the dashboard is built from: the sweep's W&B group, its datasets (with Rg), PLW values and
    benchmarks, the W&B id and PLW of each run, and the analysis (``summary.json``) if there is one."""

    source: Path
    group: str
    datasets: dict[str, float]  # name -> Rg, by Rg
    plws: list[float]
    models: list[str]
    benchmarks: dict[str, str]  # benchmark -> its primary metric's key
    generation_keys: dict[str, str]  # key -> label (Fig. 2)
    n_runs: int
    run_plw: dict[str, float] = field(default_factory=dict)  # W&B run id -> PLW (training and eval runs)
    train_keys: set[str] = field(default_factory=set)  # what the training runs logged (metrics.csv, metrics.json)
    analysis: dict[str, Any] | None = None
    analysis_tables: dict[str, str] = field(default_factory=dict)  # name -> markdown
    runs: list[RunValues] = field(default_factory=list)  # for --preview

    def plw_colors(self) -> dict[float, str]:
        """A colour per PLW value of the study (viridis, dark = low)."""
        from matplotlib import colormaps
        from matplotlib.colors import to_hex

        cmap = colormaps["viridis"]
        return {p: to_hex(cmap(0.9 * i / max(len(self.plws) - 1, 1))) for i, p in enumerate(self.plws)}

    def colors(self) -> dict[str, str]:
        """A colour per W&B run id, by its PLW (:meth:`plw_colors`)."""
        steps = self.plw_colors()
        return {run_id: steps[plw] for run_id, plw in self.run_plw.items()}


def locate(path: str | Path) -> tuple[Path, Path, Path | None]:
    """The results table, the folder of its runs and the analysis folder (if any) of a study directory, a sweep
    directory or a results table."""
    path = Path(path)
    if path.is_file():
        table, runs = path, path.parent
    elif (path / "runs" / FILE_NAME).exists():
        table, runs = path / "runs" / FILE_NAME, path / "runs"
    elif (path / FILE_NAME).exists():
        table, runs = path / FILE_NAME, path
    else:
        raise FileNotFoundError(f"no results table ({FILE_NAME}) in {path} or {path / 'runs'}: evaluate the sweep "
                                f"first (python evaluate.py run_dir='{path}/*')")  # fmt: skip
    analysis = next((a for a in (runs.parent / "analysis", runs / "analysis") if (a / "summary.json").exists()), None)
    return table, runs, analysis


def study_facts(path: str | Path, group: str | None = None, analysis_dir: str | Path | None = None) -> StudyFacts:
    """Read the facts of the study at ``path`` (:func:`locate`). The W&B group is the training ``name`` of its runs
    (``--group`` when the table holds several)."""
    table_path, runs_dir, analysis = locate(path)
    analysis = Path(analysis_dir) if analysis_dir else analysis
    table = read_table(table_path)
    if table.empty:
        raise ValueError(f"{table_path} has no result rows")
    names = sweep_names(table)
    if group is None and len(names) > 1:
        raise ValueError(f"{table_path} holds runs of {len(names)} sweeps ({', '.join(names)}); choose one with --group")
    group = group or names[0]
    datasets = table.drop_duplicates("dataset").sort_values("rg").set_index("dataset")["rg"].to_dict()
    present = set(zip(table["benchmark"], table["metric"]))
    benchmarks = {b: metric_key(b, m) for b, m in PRIMARY_METRICS.items() if (b, m) in present}
    generation = {metric_key(b, m): RUN_METRICS[name] for name, (b, m) in RESULT_RUN_METRICS.items() if (b, m) in present}
    facts = StudyFacts(table_path, group, datasets, sorted(table["plw"].unique()), sorted(table["model"].unique()),
                       benchmarks, generation, table["run_id"].nunique())  # fmt: skip
    for run in find_runs(runs_dir, "metrics.json"):
        if run.name != group:
            continue
        metrics, wandb_id = run.metrics(), run.status().get("wandb_id")
        plw = float(metrics["plw"])
        history = pd.read_csv(run.metrics_csv) if run.metrics_csv.exists() else pd.DataFrame()
        # what the run's W&B run holds: its metrics.csv columns, and the metrics.json values it has (None: none)
        facts.train_keys |= set(history.columns) | {k for k, v in metrics.items() if v is not None}
        if wandb_id:
            facts.run_plw[wandb_id] = plw
        facts.run_plw[run.wandb_eval_id] = plw
        scores = {metric_key(b, m): v for b, m, v in
                  table.loc[table["run_id"] == run.run_id, ["benchmark", "metric", "score"]].itertuples(index=False)}  # fmt: skip
        facts.runs.append(RunValues(plw, metrics.get("dataset", "?"), history, {**metrics, **scores}))
    if analysis is not None:
        facts.analysis = json.loads((analysis / "summary.json").read_text())
        for name in ("glmm", "optimal_plw"):
            if (analysis / f"{name}.md").exists():
                facts.analysis_tables[name] = (analysis / f"{name}.md").read_text()
    return facts


def _panels(facts: StudyFacts, wr: Any) -> dict[str, list[Any]]:
    """The panel groups (title -> panels) of a view section or a report's dataset section."""
    plw = wr.Config("plw")
    return {
        "Training loss": [wr.LinePlot(title=label, x="Step", y=[key], title_y=label)
                          for key, label in TRAIN_CURVES.items() if key in facts.train_keys],
        "Loss stability and weight drift against PLW (Fig. 1)": [
            wr.ScatterPlot(title=RUN_METRICS[key], x=plw, y=wr.SummaryMetric(key)) for key in TRAIN_SUMMARY
            if key in facts.train_keys],
        "Generations against PLW (Fig. 2)": [
            wr.ScatterPlot(title=label, x=plw, y=wr.SummaryMetric(key)) for key, label in facts.generation_keys.items()],
        "Benchmarks against PLW (Fig. 3)": [
            wr.ScatterPlot(title=key, x=plw, y=wr.SummaryMetric(key)) for key in facts.benchmarks.values()],
    }  # fmt: skip


def build_view(facts: StudyFacts, entity: str, project: str) -> Any:
    """The workspace view of the sweep's group: a section per panel group, each run coloured by its PLW."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    sections = [ws.Section(name=name, panels=panels, is_open=True)
                for name, panels in _panels(facts, wr).items() if panels]  # fmt: skip
    colors = facts.colors()
    settings = ws.RunsetSettings(filters=[ws.Metric("Group") == facts.group],
                                 run_settings={run: ws.RunSettings(color=c) for run, c in colors.items()})  # fmt: skip
    return ws.Workspace(entity=entity, project=project, name=f"PLW study {facts.group}", sections=sections,
                        runset_settings=settings, settings=ws.WorkspaceSettings(max_runs=max(len(colors), 10)))  # fmt: skip


def build_report(facts: StudyFacts, entity: str, project: str, offline: bool = False) -> Any:
    """The report: the study in a paragraph, a section per dataset (its runs only), then the analysis. ``offline``:
    its run sets name no project (wandb-workspaces looks a named project up on the server when it serializes a
    report); saved, each run set is the report's project."""
    import wandb_workspaces.expr as ex
    import wandb_workspaces.reports.v2 as wr

    colors = facts.colors()
    in_group = ex.Metric("Group") == facts.group
    where = {"entity": "", "project": ""} if offline else {"entity": entity, "project": project}
    blocks: list[Any] = [
        wr.P(f"{facts.n_runs} runs of the sweep {facts.group}: PLW "
             f"{', '.join(f'{p:g}' for p in facts.plws)} x {len(facts.datasets)} datasets, model "
             f"{', '.join(facts.models)}. Built by plwlab dashboard from {facts.source}; every run is coloured by "
             "its PLW (viridis: dark = low)."),
        wr.MarkdownBlock("| dataset | Rg |\n|---|---|\n" + "\n".join(f"| {d} | {rg:.3g} |" for d, rg in facts.datasets.items())),
    ]  # fmt: skip
    for dataset, rg in facts.datasets.items():
        runset = wr.Runset(**where, name=dataset, custom_run_colors=colors,
                           filters=[in_group, ex.Config("dataset") == dataset])  # fmt: skip
        blocks.append(wr.H2(f"{dataset} (Rg {rg:.3g})"))
        for name, panels in _panels(facts, wr).items():
            if panels:
                blocks += [wr.H3(name), wr.PanelGrid(runsets=[runset], panels=panels)]
    if facts.analysis is not None:
        blocks.append(wr.H2("Analysis"))
        blocks.append(wr.H3("Beta GLMM per dataset (score ~ wp + wp^2, random benchmark slopes)"))
        blocks.append(wr.MarkdownBlock(facts.analysis_tables.get("glmm", "No dataset could be fitted.")))
        notes = fit_notes(facts.analysis)
        if notes:
            blocks.append(wr.UnorderedList(items=notes))
        blocks.append(wr.H3("Optimal PLW by Rg (GAM te(PLW, Rg), Table 4 style)"))
        blocks.append(wr.MarkdownBlock(facts.analysis_tables.get("optimal_plw",
                                                                 f"GAM skipped: {facts.analysis.get('gam_skipped')}")))  # fmt: skip
        figures = [f for f in FIGURES if f in facts.analysis.get("figures", [])]
        runset = wr.Runset(**where, name="analysis",
                           filters=[in_group, ex.Metric("JobType") == "analysis"])  # fmt: skip
        blocks += [wr.H3("Figures"), wr.PanelGrid(runsets=[runset], panels=[
            wr.MediaBrowser(title=f, media_keys=[figure_key(f)], num_columns=1) for f in figures])]  # fmt: skip
    return wr.Report(entity=entity, project=project, title=f"PLW study: {facts.group}",
                     description="Does prompt loss matter? Training, evaluation and analysis of one PLW sweep.",
                     blocks=blocks)  # fmt: skip


def preview(facts: StudyFacts, out: Path) -> list[Path]:
    """A PNG per panel group of the view (``<out>/<group>.png``), drawn with matplotlib from the study's own files
    (``metrics.csv``, ``metrics.json``, the results table): what each W&B section shows, without W&B."""
    import wandb_workspaces.reports.v2 as wr

    from plwlab.analysis.figures import plt, save

    colors = facts.plw_colors()  # as the view colours the runs
    written = []
    for name, panels in _panels(facts, wr).items():
        if not panels:
            continue
        columns = min(len(panels), 4)
        rows = -(-len(panels) // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False, layout="constrained")
        for ax, panel in zip(axes.flat, panels):
            if type(panel).__name__ == "LinePlot":
                key = panel.y[0]
                for run in facts.runs:
                    if key in run.history.columns:
                        part = run.history[["step", key]].dropna()
                        ax.plot(part["step"], part[key], color=colors[run.plw], lw=0.8)
                ax.set(xlabel="Step", ylabel=key)
            else:
                key = panel.y.name
                points = [(run.plw, run.summary.get(key)) for run in facts.runs if run.summary.get(key) is not None]
                ax.scatter([p for p, _ in points], [v for _, v in points], c=[colors[p] for p, _ in points], s=18)
                ax.set(xlabel="plw (config)", ylabel=key)
            ax.set_title(panel.title, fontsize=9)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        handles = [plt.Line2D([], [], color=c, marker="o", lw=1, label=f"PLW {p:g}") for p, c in colors.items()]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(handles), frameon=False)
        fig.suptitle(f"{name} ({facts.group})")
        written += save(fig, out / re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_"), formats=("png",))
    return written


def to_json(obj: Any) -> dict[str, Any]:
    """A view's or a report's model, as W&B saves it."""
    return obj._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)


def dashboard(path: str | Path, entity: str, project: str, out: str | Path | None = None, dry_run: bool = False,
              group: str | None = None, with_preview: bool = False) -> dict[str, Any]:  # fmt: skip
    """Build the view and the report of the study at ``path``; write both as JSON into ``out`` (default:
    ``<study>/dashboard``) and, unless ``dry_run``, save them to W&B. Returns what was written (and the URLs)."""
    if not dry_run and not os.environ.get("WANDB_API_KEY"):
        raise ValueError("saving a view and a report needs WANDB_API_KEY in the environment (or --dry-run)")
    facts = study_facts(path, group)
    view, report = build_view(facts, entity, project), build_report(facts, entity, project, offline=dry_run)
    out = Path(out) if out else (Path(path) if Path(path).is_dir() else Path(path).parent) / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    written = {"view": out / "view.json", "report": out / "report.json"}
    written["view"].write_text(json.dumps(to_json(view), indent=1) + "\n")
    written["report"].write_text(json.dumps(to_json(report), indent=1) + "\n")
    result: dict[str, Any] = {k: str(v) for k, v in written.items()}
    result["sections"] = [s.name for s in view.sections]
    if with_preview:
        result["preview"] = [str(p) for p in preview(facts, out / "preview")]
    if not dry_run:
        result["view_url"] = view.save().url
        result["report_url"] = report.save().url
    return result


def read_view(path: str | Path) -> Any:
    """A view written by :func:`dashboard` (``view.json``), as a ``wandb_workspaces`` Workspace."""
    from wandb_workspaces.workspaces import Workspace, internal

    return Workspace._from_model(internal.View.model_validate(json.loads(Path(path).read_text())))


def read_report(path: str | Path) -> Any:
    """A report written by :func:`dashboard` (``report.json``), as a ``wandb_workspaces`` Report."""
    from wandb_workspaces.reports.v2 import Report, internal

    return Report._from_model(internal.ReportViewspec.model_validate(json.loads(Path(path).read_text())))

