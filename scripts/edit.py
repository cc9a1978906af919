"""Edit images with a fine-tuned model folder (either family; docs/editing.md):

    python scripts/edit.py model_dir=outputs/train/edit_transfusion_tiny/model \
        image=photo.png instruction="make the red circle blue"
    python scripts/edit.py model_dir=... edits=data/shapes/edits.jsonl    # a batch of triplets
    python scripts/edit.py ... sampling.guidance_scale=3 sampling.image_guidance_scale=1.5

Single mode writes <output_dir>/edited.png; batch mode <output_dir>/NNNNN.png, edits.png
(source | edited | target) and PSNR against the targets. Both write edits.jsonl.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fusion.config import check_keys, given_keys, register_configs
from fusion.errors import report_user_errors
from fusion.jobs.edit import register_edit_config, run_editing

register_configs()
register_edit_config()


@hydra.main(config_path="../conf", config_name="edit", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    # Sampling settings not given here come from the model folder's recipe (run_editing).
    result = run_editing(check_keys(cfg), given=given_keys(HydraConfig.get().overrides.task))
    line = f"{result['count']} edit(s): {result['output']}"
    if "psnr" in result:
        line += f"   PSNR vs targets {result['psnr']:.2f} dB"
    print(line)
    print("sampling: " + ", ".join(f"{k}={v}" for k, v in result["sampling"].items()))


if __name__ == "__main__":
    main()
