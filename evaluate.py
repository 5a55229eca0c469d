"""Evaluate trained runs into the results table: python evaluate.py run_dir=<run dir or glob> [eval=quick|mechanisms|paper].

The command lives in plwlab.evaluation.main (also `plwlab-evaluate`); configs in src/plwlab/conf/.
"""

from plwlab.evaluation.main import main

if __name__ == "__main__":
    main()
