"""Speed benchmark: a fastslow RL step against a TRL GRPOTrainer(loss_type="cispo") step.

python -m bench.speed              # side by side, alternating (bench/speed/__main__.py)
python -m bench.speed.loss_check   # same loss and gradient on one fixed batch
python -m bench.speed.profile      # where a fastslow step's time goes
"""

import os

# Before any Hugging Face import: nothing here may reach for the hub.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
