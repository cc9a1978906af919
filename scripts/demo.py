"""The main job: `python scripts/demo.py` (add `debug=default` for a seconds-long run).

Runs the fusion pipeline on ShapesWorld, reusing finished stages, and prints the results table
that it also writes to <output_dir>/results.md.
"""

import hydra
from omegaconf import DictConfig

from fusion.config import check_keys, register_configs
from fusion.errors import report_user_errors
from fusion.pipeline import run_demo, write_results

register_configs()


@hydra.main(config_path="../conf", config_name="demo", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    debug = HydraConfig.get().runtime.choices.get("debug")
    results = run_demo(check_keys(cfg), debug=None if debug in (None, "null") else debug)
    print(write_results(Path(cfg.output_dir), results))


if __name__ == "__main__":
    main()
