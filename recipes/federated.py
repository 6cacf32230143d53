"""Federated CoMiGS (or a baseline) over Accelerate: one YAML config, `key=value` overrides.

    accelerate launch recipes/federated.py --config recipes/configs/demo.yaml
    accelerate launch --num_processes 2 recipes/federated.py --config recipes/configs/demo.yaml strategy=local

On a CPU-only machine, `accelerate launch --multi_gpu --num_processes 2 ...` gives two processes on gloo. The recipe
itself lives in `comigs_hf/recipe.py` so that the installed `comigs run` command runs the same code.
"""

from comigs_hf.recipe import main

if __name__ == "__main__":
    main()
