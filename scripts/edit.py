"""Edit images with a fine-tuned model folder (either family; docs/editing.md):

    python scripts/edit.py model_dir=outputs/train/edit_transfusion_tiny/model \
        image=photo.png instruction="make the red circle blue"
    python scripts/edit.py model_dir=... edits=data/shapes/edits.jsonl    # a batch of triplets
    python scripts/edit.py ... sampling.guidance_scale=3 image_guidance_scale=1.5

Single mode writes <output_dir>/edited.png; batch mode <output_dir>/NNNNN.png, edits.png
(source | edited | target) and PSNR against the targets. Both write edits.jsonl.
"""

import hydra
from omegaconf import DictConfig

from fusion.config import check_keys, register_configs
from fusion.sampling.edit import register_edit_config, run_editing

register_configs()
register_edit_config()


@hydra.main(config_path="../conf", config_name="edit", version_base="1.3")
def main(cfg: DictConfig) -> None:
    result = run_editing(check_keys(cfg))
    line = f"{result['count']} edit(s): {result['output']}"
    if "psnr" in result:
        line += f"   PSNR vs targets {result['psnr']:.2f} dB"
    print(line)


if __name__ == "__main__":
    main()
