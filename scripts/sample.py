"""Generate from a trained model folder (either family):

    python scripts/sample.py model_dir=outputs/train/transfusion_tiny/model task=text_to_image
    python scripts/sample.py ... task=text_to_image prompt_file=prompts.txt
    python scripts/sample.py ... task=image_to_text images=/path/to/pngs
    python scripts/sample.py ... task=text_to_text prompts='[a photo of]'

    # GenEval's prompts, 4 images each, also written in GenEval's folder layout (geneval/)
    python scripts/sample.py ... prompt_file=.../evaluation_metadata.jsonl images_per_prompt=4

Several processes share the batches (the same results as one process, N times faster):
    torchrun --nproc-per-node 4 scripts/sample.py ... device=cuda   (docs/scaling.md)

Writes <output_dir>/<task>.png (a grid with captions) and <task>.jsonl; text_to_image also
writes each image as images/NNNNN.png, its jsonl row naming the file, prompt and seed. Sampling
settings the model recorded from its training recipe (guidance, top-k, ...) are used unless
given on the command line (``sampling.top_k=...``). fusion.FusionPipeline gives the same
images for the same settings and seed.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fusion.config import check_keys, given_keys, register_configs
from fusion.distributed import process_group_from_env, quiet_other_ranks
from fusion.errors import report_user_errors
from fusion.jobs.sample import run_sampling

register_configs()


@hydra.main(config_path="../conf", config_name="sample", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    with process_group_from_env():  # torchrun's group, when there is one
        quiet_other_ranks()
        result = run_sampling(check_keys(cfg),
                              explicit_sampling=given_keys(HydraConfig.get().overrides.task))
    skipped = f" ({result['skipped']} unreadable images skipped)" if result.get("skipped") else ""
    print(f"{result['task']}: {result['count']} results in {result['output_dir']}{skipped}")


if __name__ == "__main__":
    main()
