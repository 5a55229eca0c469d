"""Evaluate trained runs into the results table: python evaluate.py <run dir or glob> [eval=quick|mechanisms|paper].

The command lives in plwlab.evaluation.main (also `plwlab-evaluate`); configs in src/plwlab/conf/.
"""

from plwlab.evaluation.main import run

if __name__ == "__main__":
    run()
