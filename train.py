"""Fine-tune with a prompt loss weight: python train.py [plw=0.1] [model=tiny] [data=alpaca_sample] ...

Sweep: python train.py -m plw=0,0.01,0.1,1. The command lives in plwlab.training.main (also `plwlab-train`);
configs in src/plwlab/conf/. See README.md and docs/cluster.md.
"""

from plwlab.training.main import run

if __name__ == "__main__":
    run()
