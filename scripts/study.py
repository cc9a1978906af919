"""A compute study: each family trained at a ladder of training-FLOP budgets, scored alike.

    python scripts/study.py                  # conf/study/cpu.yaml (docs/study.md)
    python scripts/study.py study=debug      # seconds (the tests run it)
    python scripts/study.py plots_dir=docs/images   # the plots again, from the finished runs

Writes <output_dir>/{runs/<run>/, table.jsonl, summary.md, study_<metric>.png}; a re-run
reuses every finished run and score (fusion/study.py).
"""

import hydra
from omegaconf import DictConfig

from fusion.config import check_keys, register_configs
from fusion.errors import report_user_errors
from fusion.study import report, run_study

register_configs()


@hydra.main(config_path="../conf", config_name="study", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    rows = run_study(check_keys(cfg))
    print(report(cfg, rows))


if __name__ == "__main__":
    main()
