"""``plwlab`` command: dataset statistics and variants, PLW recommendations, the analysis of a results table, the
whole study, and judge checks.

    plwlab stats data=alpaca_data model=llama2 [data.path=...] [--out stats.csv]
    plwlab stats data=alpaca_data,alpaca_data_short model.tokenizer=/path/tokenizer.model
    plwlab build-data data=alpaca_data_medium data.path=/data/alpaca_data_cleaned.json model=llama2
    plwlab stats data=chat_sample model.chat_template=chatml       # chat data: Rg per dataset and per turn
    plwlab recommend --rg 0.8          |   plwlab recommend data=alpaca_data_short model=llama2
    plwlab recommend --rg 0.8 --model-file outputs/analysis/gam.json
    plwlab analyze results.csv --out outputs/analysis [--runs outputs/plwlab]      # --runs: a sweep dir
    plwlab study [--out outputs/study] [train.py overrides]     # train + evaluate + analyse a grid (make study)
    plwlab dashboard outputs/study --dry-run                  # the study's W&B view + report as JSON (--entity E: saved)
    plwlab generate outputs/study/runs/<run> "Name three colours." [--input ...] [-i]   # talk to a trained run
    plwlab judge-check ../shared/data/pandalm/testset-v1.json --model WeOpenML/PandaLM-7B-v1 --device cuda

Overrides are Hydra overrides of ``conf/train.yaml``: the same ``data=`` and ``model=`` as train.py.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from plwlab import CONF_DIR

WANDB_MODES = ("off", "offline", "online")  # plwlab study / analyze --wandb: wandb.init's modes, or no W&B run

OUTPUT_DIR = os.environ.get("PLWLAB_OUTPUT_DIR", "outputs")  # as paths.output_dir in conf/paths/default.yaml
# Each command imports what it needs when it runs: ``plwlab recommend --rg`` must not pay for torch or Lightning.
console = Console(width=None if sys.stdout.isatty() else 160)


def compose_config(overrides: list[str], config_dir: Path = CONF_DIR) -> Any:
    """The train config (a DictConfig) as train.py composes it, checked as train.py checks it."""
    from hydra import compose, initialize_config_dir

    from plwlab.config import ConfigError, register, validate_train
    from plwlab.training.smollm2 import RESOLVERS

    if not (config_dir / "train.yaml").exists():
        raise ConfigError(f"no train.yaml in {config_dir}; pass --config-dir")
    register(RESOLVERS)
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    validate_train(cfg)
    return cfg


def _expand_data(overrides: list[str]) -> list[list[str]]:
    """``data=a,b`` -> one override list per dataset."""
    for i, o in enumerate(overrides):
        if o.startswith("data=") and "," in o:
            return [overrides[:i] + [f"data={name}"] + overrides[i + 1 :] for name in o[5:].split(",")]
    return [overrides]


def _tokenizer(cfg: Any) -> Any:
    """The run's tokenizer, with ``model.chat_template`` applied as train.py applies it."""
    from plwlab.data.chat import set_chat_template
    from plwlab.training.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.tokenizer)
    if cfg.model.get("chat_template"):
        set_chat_template(tokenizer, cfg.model.chat_template)
    return tokenizer


def _examples(cfg: Any, tokenizer: Any) -> tuple[list[Any], str, dict[str, Any] | None]:
    """What a data config trains on (records or conversations, variant built, limit applied)."""
    from plwlab.config import to_dict
    from plwlab.data.examples import load_examples

    d = to_dict(cfg.data)
    return load_examples(d["path"], tokenizer, d["format"], d["split"], d["columns"], d["roles"], d["on_invalid"],
                         d["empty_output"], d["variant"], d["target_rg"], d["cache_dir"], d["limit"])  # fmt: skip


def cmd_stats(args: argparse.Namespace) -> None:
    from plwlab.data.rg import PAPER_RG
    from plwlab.data.stats import token_statistics

    rows = []
    for overrides in _expand_data(args.overrides):
        cfg = compose_config(overrides, args.config_dir)
        tokenizer = _tokenizer(cfg)
        examples, path, _ = _examples(cfg, tokenizer)
        think = list(cfg.data.think_tags) if cfg.data.think_tags else None
        stats = token_statistics(examples, tokenizer, cfg.data.format, cfg.data.max_length, think)
        rows.append({"dataset": cfg.data.name, "format": cfg.data.format, "path": path, "tokenizer": cfg.model.tokenizer,
                     "max_length": cfg.data.max_length, **stats, "paper_rg": PAPER_RG.get(cfg.data.name)})  # fmt: skip
    columns = list(dict.fromkeys(k for row in rows for k in row))
    title = ("Token statistics (fields tokenized alone; Rg = mean output / mean (instruction + input); chat: "
             "assistant / (system + user) content tokens, rg_turn_j: the j-th exchange)")  # fmt: skip
    table = Table(title=title)
    table.add_column("statistic")
    for row in rows:
        table.add_column(row["dataset"], justify="right")
    for key in columns:
        if key not in ("dataset", "path", "tokenizer"):
            table.add_row(key, *(_fmt(row.get(key)) for row in rows))
    console.print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    console.print(f"wrote {out}")


def _num(value: float | None, spec: str) -> str:
    """``value`` formatted by ``spec``; "n/a" where a fit could not estimate it (no standard error, no p-value)."""
    return "n/a" if value is None else format(value, spec)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def cmd_build_data(args: argparse.Namespace) -> None:
    from plwlab.config import ConfigError

    cfg = compose_config(args.overrides, args.config_dir)
    d = cfg.data
    if d.variant == "as_is":
        raise ConfigError(f"data={d.name} is used as is; nothing to build (choose a variant, e.g. data=alpaca_data_short)")
    _, path, manifest = _examples(cfg, _tokenizer(cfg))
    console.print(f"{d.name}: {path}\n  n={manifest['n']} (source {manifest['n_source']}), inverted "
                  f"{manifest['n_inverted']}, dropped {manifest['n_dropped']}, Rg {manifest['rg']:.4g} "
                  f"(source {manifest['rg_source']:.4g})")  # fmt: skip
    if manifest["n_dropped"] > 0.1 * manifest["n_source"]:
        console.print(f"  [yellow]warning: {manifest['n_dropped']} of {manifest['n_source']} examples were dropped "
                      "to reach the target; the source's Rg floor under inversion is above it[/yellow]")  # fmt: skip


def cmd_recommend(args: argparse.Namespace) -> None:
    from plwlab.analysis.recommend import FLAT, TABLE4_COLUMNS, recommend_plw, table4_rows

    rg = args.rg
    if rg is None:
        from plwlab.data.rg import dataset_rg

        cfg = compose_config(args.overrides, args.config_dir)
        tokenizer = _tokenizer(cfg)
        examples, _, _ = _examples(cfg, tokenizer)
        rg = dataset_rg(examples, tokenizer, cfg.data.format)
        console.print(f"{cfg.data.name}: Rg {rg:.4g} ({len(examples)} {cfg.data.format} examples, tokenizer "
                      f"{cfg.model.tokenizer})")  # fmt: skip
    if args.model_file:
        console.print(str(recommend_plw(rg, args.column, args.model_file)), markup=False, highlight=False, soft_wrap=True)
        return
    chosen = recommend_plw(rg, args.column)
    console.print(str(chosen), markup=False, highlight=False)
    others = [recommend_plw(rg, c) for c in TABLE4_COLUMNS if c != args.column]
    console.print("  other columns: " + "; ".join(f"{r.column}: " + (FLAT if r.plw is None else f"PLW {r.plw:.3g}")
                                                  for r in others), markup=False, highlight=False)  # fmt: skip
    console.print(table4_rows(rg), markup=False, highlight=False)


def cmd_analyze(args: argparse.Namespace) -> None:
    from plwlab.analysis.analyze import analysis_inputs, analyze_table, fit_with_r
    from plwlab.files import spreadsheet_safe

    try:
        metrics = dict(m.split("=", 1) for m in args.metric)
    except ValueError:
        raise ValueError(f"--metric takes BENCHMARK=METRIC, got {args.metric}") from None
    out = Path(args.out)
    if args.backend == "r":
        _, results = analysis_inputs(args.results, metrics)
        out.mkdir(parents=True, exist_ok=True)
        results.map(spreadsheet_safe).to_csv(out / "scores.csv", index=False)  # the rows the fit uses
        fit_with_r(out / "scores.csv", out / "r_fits.json")
        console.print(f"wrote {out / 'r_fits.json'} (glmmTMB + mgcv)")
        return
    with console.status("fitting the beta GLMMs and the GAM"):
        summary = analyze_table(args.results, out, args.runs, metrics)
    for dataset, reason in summary["glmm_skipped"].items():
        console.print(f"{dataset}: GLMM skipped: {reason}", markup=False)
    for dataset, fit in summary["glmm"].items():
        plw = "no interior optimum" if fit["critical_plw"] is None else f"critical PLW {fit['critical_plw']:.3g}"
        problems = "; ".join(filter(None, [fit["warnings"], fit["error"] and f"glmmTMB would stop: {fit['error']}"]))
        flags = "clean" if fit["clean"] else "NOT clean: " + problems
        b1, p1, b2, p2 = (_num(fit[k], f) for k, f in (("b1", ".3f"), ("p_b1", ".2g"), ("b2", ".3f"), ("p_b2", ".2g")))
        console.print(f"{dataset}: b1 {b1} (p {p1}), b2 {b2} (p {p2}); "
                      f"{plw}; {flags}" + (f"; boundary: {fit['boundary']}" if fit["boundary"] else ""))  # fmt: skip
    if "gam" in summary:
        gam = summary["gam"]
        console.print("GAM optimal PLW by Rg (* = extrapolated: the data span Rg "
                      f"{gam['rg_range'][0]:g}-{gam['rg_range'][1]:g}): " + ", ".join(
                          f"{k}{'*' if k in gam['extrapolated'] else ''}: {v:g}" for k, v in gam["optimal_plw"].items()),
                      markup=False)  # fmt: skip
    else:
        console.print(f"GAM skipped: {summary['gam_skipped']}", markup=False)
    if args.wandb != "off":
        from plwlab.analysis.tracking import log_analysis_run
        from plwlab.results import read_table, sweep_names

        group = args.wandb_group or "+".join(sweep_names(read_table(args.results)))
        run_id = log_analysis_run(out, group, args.wandb_project, args.wandb)
        console.print(f"logged the analysis as W&B run {run_id} (group {group}, {args.wandb})", markup=False)
    console.print(f"wrote {args.out}")


def cmd_dashboard(args: argparse.Namespace) -> None:
    from plwlab.analysis.dashboard import dashboard

    entity = args.entity or os.environ.get("WANDB_ENTITY")
    if entity is None and not args.dry_run:
        raise ValueError("saving needs a W&B entity: --entity E (or WANDB_ENTITY), or --dry-run")
    result = dashboard(args.path, entity or "ENTITY", args.project, args.out, args.dry_run, args.group, args.preview)
    console.print(f"view ({', '.join(result['sections'])}): {result['view']}\nreport: {result['report']}", markup=False)
    for path in result.get("preview", []):
        console.print(f"preview: {path}", markup=False)
    if args.dry_run:
        console.print("dry run: nothing saved to W&B" + ("" if entity else " (entity ENTITY: pass --entity to save)"))
    else:
        console.print(f"saved: {result['view_url']}\n       {result['report_url']}", markup=False)


def cmd_generate(args: argparse.Namespace) -> None:
    from plwlab.evaluation.runs import load_run
    from plwlab.evaluation.talk import answer, interactive, sampling_args

    if args.instruction is None and not args.interactive:
        raise ValueError("give an instruction, or -i for the interactive mode")
    sampling = sampling_args(args.temperature, args.top_p, args.top_k)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    run = load_run(args.run_dir, args.dtype, args.device)
    if args.instruction is not None:
        text = answer(run, args.instruction, args.input, args.max_new_tokens, sampling,
                      None if args.no_stream else sys.stdout)  # fmt: skip
        if args.no_stream:
            print(text)
    if args.interactive:
        interactive(run, args.max_new_tokens, sampling)


def cmd_study(args: argparse.Namespace) -> None:
    from plwlab.study import run_study

    run_study(args.out, args.overrides, args.eval_overrides, args.experiment, args.wandb, args.wandb_project)


def cmd_judge_check(args: argparse.Namespace) -> None:
    from plwlab.evaluation.judges import PairwiseJudge, human_agreement, read_pandalm_testset

    items = read_pandalm_testset(args.testset)[: args.limit]
    judge = PairwiseJudge.from_pretrained(args.model, args.dtype, args.device, style=args.style, mode=args.mode,
                                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                          decoding={} if args.greedy else None)  # fmt: skip
    scores = human_agreement(judge, items)
    table = Table(title=f"{args.model} ({args.style}, {args.mode}) vs. the human majority")
    for key in scores:
        table.add_column(key, justify="right")
    table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in scores.values()))
    console.print(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="plwlab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-dir", type=Path, default=CONF_DIR, help="folder holding train.yaml")
    sub = parser.add_subparsers(dest="command", required=True)
    stats = sub.add_parser("stats", help="token statistics and Rg of datasets; prints a table and writes CSV")
    stats.add_argument("--out", default=f"{OUTPUT_DIR}/data_stats.csv", help="CSV file to write")
    stats.set_defaults(run=cmd_stats)
    build = sub.add_parser("build-data", help="build a dataset variant (JSON + manifest) into paths.data_dir")
    build.set_defaults(run=cmd_build_data)
    rec = sub.add_parser("recommend", help="suggested PLW for a dataset or an Rg value")
    rec.add_argument("--rg", type=float, help="use this Rg instead of measuring a dataset")
    rec.add_argument("--column", choices=["all", "mc", "gen"], default="all", help="paper Table 4 column")
    rec.add_argument("--model-file", help="fitted model JSON with an optimal_plw table (instead of Table 4)")
    rec.set_defaults(run=cmd_recommend)
    ana = sub.add_parser("analyze", help="fit the beta GLMMs and the GAM to a results table; tables and figures")
    ana.add_argument("results", help="CSV with columns model, dataset, rg, plw, benchmark, score (evaluate.py's results.csv "
                     "also has metric: the primary metric per benchmark is used)")
    ana.add_argument("--metric", action="append", default=[], metavar="BENCHMARK=METRIC",
                     help="use this metric for a benchmark (default: plwlab.evaluation.scoreboard.PRIMARY_METRICS), repeatable")
    ana.add_argument("--out", default=f"{OUTPUT_DIR}/analysis", help="output folder")
    ana.add_argument("--runs", help="folder of training runs (metrics.json) for the run-metric box plots")
    ana.add_argument("--backend", choices=["python", "r"], default="python",
                     help="r: fit the same models with R's glmmTMB and mgcv via Rscript instead")  # fmt: skip
    ana.add_argument("--wandb", choices=WANDB_MODES, default="off",
                     help="log the analysis (tables, figures) as a W&B run (job_type analysis) offline or online")
    ana.add_argument("--wandb-project", default="plwlab")
    ana.add_argument("--wandb-group", help="W&B group (default: the sweep name of the table's runs)")
    ana.set_defaults(run=cmd_analyze, overrides=[])
    study = sub.add_parser("study", help="train a PLW x dataset grid, evaluate and analyse it into one directory")
    study.add_argument("--out", default=f"{OUTPUT_DIR}/study", help="study directory (runs, results, analysis, REPORT.md)")
    study.add_argument("--experiment", default="study",
                       help="the grid (conf/experiment/): study (tiny model, ~3 min) or study_real (SmolLM2, ~1 h on CPU)")  # fmt: skip
    study.add_argument("--eval", dest="eval_overrides", action="append", default=[],
                       help="an evaluate.py override (repeatable), e.g. --eval eval.memorization.n=4")  # fmt: skip
    study.add_argument("--wandb", choices=WANDB_MODES, default="offline",
                       help="log training, evaluation and analysis to W&B: offline (default; wandb sync later), online, off")  # fmt: skip
    study.add_argument("--wandb-project", default="plwlab")
    study.set_defaults(run=cmd_study)
    dash = sub.add_parser("dashboard", help="the study's W&B workspace view and report (the paper's figures), from code")
    dash.add_argument("path", help="a study directory (plwlab study --out), a sweep directory or its results.csv")
    dash.add_argument("--entity", help="W&B entity (default: WANDB_ENTITY)")
    dash.add_argument("--project", default="plwlab", help="W&B project the runs were logged to")
    dash.add_argument("--group", help="the sweep's W&B group (default: the training name of the table's runs)")
    dash.add_argument("--out", help="where view.json and report.json go (default: <path>/dashboard)")
    dash.add_argument("--dry-run", action="store_true", help="write the view and report as JSON; save nothing")
    dash.add_argument("--preview", action="store_true",
                      help="also draw each panel group as a PNG from the study's files (<out>/preview/)")
    dash.set_defaults(run=cmd_dashboard, overrides=[])
    gen = sub.add_parser("generate", help="talk to a trained run: its answer to an instruction, in its own template")
    gen.add_argument("run_dir", metavar="run", help="a run directory (train.py's) or its hf_model folder")
    gen.add_argument("instruction", nargs="?", help="the instruction (omit with -i)")
    gen.add_argument("--input", default="", help="the Alpaca input field (context for the instruction)")
    gen.add_argument("-i", "--interactive", action="store_true", help="read instructions until /quit or Ctrl-D")
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy, as evaluation decodes")
    gen.add_argument("--top-p", type=float, help="nucleus sampling (with --temperature > 0)")
    gen.add_argument("--top-k", type=int, help="top-k sampling (with --temperature > 0)")
    gen.add_argument("--seed", type=int, help="seed for sampling")
    gen.add_argument("--no-stream", action="store_true", help="print the answer once it is complete")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.set_defaults(run=cmd_generate, overrides=[])
    judge = sub.add_parser("judge-check", help="agreement of a judge model with PandaLM's human-annotated pairs")
    judge.add_argument("testset", help="PandaLM testset-v1.json")
    judge.add_argument("--model", required=True, help="judge: HF hub id or local path")
    judge.add_argument("--style", choices=["pandalm", "alpaca_eval_guanaco", "alpaca_eval_ranking"], default="pandalm",
                       help="prompt and parser")  # fmt: skip
    judge.add_argument("--mode", choices=["generate", "logprob"], default="generate")
    judge.add_argument("--limit", type=int, help="first N pairs only")
    judge.add_argument("--max-new-tokens", type=int, default=None, help="default: the style's (50, 100, PandaLM 512)")
    judge.add_argument("--greedy", action="store_true", help="greedy decoding instead of PandaLM's 4-beam search")
    judge.add_argument("--batch-size", type=int, default=4)
    judge.add_argument("--device", default="cpu")
    judge.add_argument("--dtype", default="bfloat16")
    judge.set_defaults(run=cmd_judge_check, overrides=[])
    for p in (stats, build, rec, study):
        p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data=alpaca_data model=llama2")
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:  # plwlab's ConfigError, DataError, ModelLoadError too
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
