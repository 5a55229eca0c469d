"""The evaluate.py command: ``python evaluate.py <run dir or glob> [eval=quick|mechanisms|paper] [key=value ...]``
(also ``plwlab-evaluate`` and ``python -m plwlab.evaluation.main``). See docs/evaluation.md and conf/evaluate.yaml.

Run folders may be given as plain arguments, unquoted: a sweep's folders contain ``=`` and ``,``
(``outputs/plwlab/data.limit=48,plw=0.1``), which Hydra would read as an override and a list; a glob the shell
expanded arrives as many such arguments. ``run_dir=...`` (Hydra's form) works as before."""

from __future__ import annotations

import glob
import os
import sys

import hydra
from omegaconf import DictConfig

from plwlab import CONF_DIR
from plwlab.config import EvaluateConfig, register, unknown_override
from plwlab.evaluation.evaluate import evaluate


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # bad paths or values, servers, failed runs: one line
        raise SystemExit(f"error: {e}") from None


def is_run_path(arg: str) -> bool:
    """Whether a command-line argument names run folders rather than being an override (``key=value``,
    ``~key``, ``+key=value``, a config group's ``hydra/launcher=slurm``) or a flag: no ``=``, or a ``/`` before the
    first ``=`` (an override's key has none, but for a config group's path), or an existing path or a glob that
    matches one."""
    if arg.startswith(("-", "~", "+")):
        return False
    key = arg.split("=", 1)[0]
    if key.startswith("hydra/") or (CONF_DIR / key).is_dir():  # a config group with a '/': hydra/launcher=slurm
        return os.path.exists(arg)
    return "=" not in arg or "/" in key or os.path.exists(arg) or bool(glob.glob(arg))


def hydra_quoted(path: str) -> str:
    """``path`` as a quoted Hydra string (``=``, ``,``, ``*`` and spaces kept literally)."""
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def arguments(argv: list[str]) -> list[str]:
    """``argv`` with its run-folder arguments (:func:`is_run_path`) turned into one ``run_dir=`` override (a list
    when there are several, e.g. a glob the shell expanded)."""
    paths = [a for a in argv if is_run_path(a)]
    rest = [a for a in argv if not is_run_path(a)]
    if not paths:
        return rest
    value = hydra_quoted(paths[0]) if len(paths) == 1 else "[" + ",".join(hydra_quoted(p) for p in paths) + "]"
    return [*rest, f"run_dir={value}"]


def run() -> None:
    """evaluate.py's entry point: plain run-folder arguments become ``run_dir``; an unknown key is one line."""
    argv = arguments(sys.argv[1:])
    problem = unknown_override(argv, EvaluateConfig)
    if problem:
        raise SystemExit(f"error: {problem}")
    sys.argv = [sys.argv[0], *argv]
    main()


register()  # the ${plwlab.asset:...} resolver

if __name__ == "__main__":
    run()
