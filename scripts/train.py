"""Stage 2: train a family model on documents.

    python scripts/train.py experiment=transfusion_tiny
    python scripts/train.py experiment=transfusion_tiny debug=default   # seconds
    # image-editing fine-tune from a trained model folder (docs/editing.md)
    python scripts/train.py experiment=edit_transfusion_tiny \
        init_from=outputs/train/transfusion_tiny/model

Writes <output_dir>/{checkpoints/, model/ (config.json + model.safetensors), samples/}.
A stopped run (killed, pre-empted, Ctrl-C) resumes from the newest intact checkpoint in
<output_dir>/checkpoints/ when the same command is run again (docs/reliability.md).
"""

import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from fusion.config import check_keys, register_configs, resolve_path
from fusion.convert.llama import load_llama_backbone
from fusion.data.datamodule import DocumentDataModule
from fusion.data.text import TextTokenizer
from fusion.distributed import leave_process_group
from fusion.errors import UserError, report_user_errors
from fusion.families import build_family, load_image_tokenizer
from fusion.families.folders import recipe_sampling, save_model
from fusion.families.registry import training_flops_per_position
from fusion.training.callbacks import SampleGrid
from fusion.training.checkpointing import find_resume_checkpoint, fit_resuming
from fusion.training.factory import (
    build_callbacks,
    build_logger,
    build_trainer,
    quiet_known_warnings,
)
from fusion.training.fusion_module import FusionModule, NonFiniteTrainingError, nonfinite_weights
from fusion.training.init_from import init_from_checkpoint
from fusion.training.lora import add_lora, merge_lora
from fusion.training.pre_encode import check_encoded_data
from fusion.training.samplers import make_edit_sampler, make_image_sampler
from fusion.training.sharding import full_state_dict

register_configs()
log = logging.getLogger(__name__)


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    check_keys(cfg)
    quiet_known_warnings()
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.output_dir)
    resume, resume_step = find_resume_checkpoint(out / "checkpoints")
    tokenizer = TextTokenizer.from_file(resolve_path(cfg.data.text_tokenizer))
    image_tokenizer = load_image_tokenizer(cfg.image_tokenizer)
    model, loss = build_family(cfg.model, tokenizer, image_tokenizer, cfg.data.image_size)
    # batches are packed in the loader workers (a family loss without ``preparer`` packs here)
    data = DocumentDataModule(cfg.data, tokenizer,
                              text_budget=lambda n_images: loss.text_budget(model, n_images),
                              prepare=loss.preparer(model) if hasattr(loss, "preparer") else None)
    data.setup()  # every record is checked now (lengths included), not hours into the run
    check_encoded_data(cfg.data, cfg.image_tokenizer)  # pre-encoded shards: the same tokenizer
    if cfg.init_from and cfg.init_backbone:
        raise UserError("init_from and init_backbone both set: start from a fusion model "
                        "folder or from a pretrained LLM, not both")
    if cfg.init_from:  # fine-tuning: before the module, whose EMA copies the weights
        init_from_checkpoint(model, cfg, tokenizer)
    elif cfg.init_backbone:
        load_llama_backbone(model, cfg.init_backbone, tokenizer, cfg.data.text_tokenizer)
    if cfg.lora.rank:  # adapters on the started model; the rest is frozen
        add_lora(model, cfg.lora)
    elif cfg.data.documents == "edit":
        log.warning("editing documents without init_from: training from a random init")
    module = FusionModule(model, loss, image_tokenizer, cfg.optim, cfg.trainer.max_steps,
                          cfg.seed, encode_cache_mb=cfg.encode_cache_mb,
                          activation_checkpointing=cfg.trainer.activation_checkpointing,
                          flops_per_position=training_flops_per_position(model, loss))
    if cfg.data.documents == "edit":  # grids of held-out edits: source | edited | target
        held_out = data.held_out(8)
        grid_sampler = make_edit_sampler(cfg, tokenizer, image_tokenizer, loss, held_out)
        grid_captions = [r.instruction for r in held_out]
    else:
        grid_sampler = make_image_sampler(cfg, tokenizer, image_tokenizer, loss,
                                          check_prompts_for=model)
        grid_captions = cfg.sampling.prompts
    def fresh_model():  # the family's network, unsharded: grids and the folder under FSDP
        fresh = build_family(cfg.model, tokenizer, image_tokenizer, cfg.data.image_size)[0]
        return add_lora(fresh, cfg.lora) if cfg.lora.rank else fresh

    grid = SampleGrid(grid_sampler, grid_captions, out, cfg.sampling.grid_every_n_steps,
                      build_model=fresh_model)
    callbacks = build_callbacks(cfg.callbacks, out / "checkpoints", extra=[grid])
    logger = build_logger(cfg.logger, out, resume_step=resume_step if resume else None)
    trainer = build_trainer(cfg.trainer, logger, callbacks, out, splits_data_itself=True)
    try:
        fit_resuming(trainer, module, data, out / "checkpoints", resume, resume_step)
    except NonFiniteTrainingError as err:
        kept, step = find_resume_checkpoint(out / "checkpoints")
        raise NonFiniteTrainingError(f"{err}. Newest checkpoint: "
                                     f"{f'{kept} (step {step})' if kept else 'none'}") from None
    # FusionCheckpoint saves every N steps; a run ended by its time budget stops in between.
    # Checkpoint the final state too, so last.ckpt holds the live weights of the saved model.
    trainer.save_checkpoint(out / "checkpoints" / "last.ckpt", weights_only=False)
    # The weights whole, on rank 0 (FSDP: gathered from every rank's shard).
    weights = full_state_dict(module.eval_model)
    leave_process_group()  # the ranks' last collective is done (fusion.distributed)
    if not trainer.is_global_zero:  # one process writes the model folder (DDP, FSDP)
        return
    final = fresh_model()
    final.load_state_dict(weights)
    if cfg.lora.rank:  # an ordinary model folder: the adapters written into the weights
        merge_lora(final)
    bad = nonfinite_weights(final)
    if bad:
        raise NonFiniteTrainingError(f"the trained weights hold NaN or infinite values ({len(bad)}"
                                     f" tensors, e.g. {bad[:3]}); {out / 'model'} is not written")
    save_model(out / "model", final, cfg.model, cfg.data.text_tokenizer,
               cfg.image_tokenizer, extra={"image_size": cfg.data.image_size,
                                           "steps": trainer.global_step,
                                           "train_flops": module.clock.flops if module.flops_per_position else None,
                                           "documents": cfg.data.documents,
                                           "init_from": cfg.init_from,
                                           "init_backbone": cfg.init_backbone,
                                           "lora": (OmegaConf.to_container(cfg.lora)
                                                    if cfg.lora.rank else None),
                                           # the recipe's sampling, evaluate.py's defaults
                                           "sampling": recipe_sampling(cfg.sampling)})
    print(f"saved {out / 'model'}; samples: {grid.last_path}")


if __name__ == "__main__":
    main()
