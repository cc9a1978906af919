"""Stage 1: train (or import) an image tokenizer and save it as an artifact.

    python scripts/train_tokenizer.py tokenizer=vae_tiny data=shapes         # train the VAE
    python scripts/train_tokenizer.py tokenizer=vqgan_tiny data=shapes       # the VQ-GAN
    python scripts/train_tokenizer.py tokenizer=vae_pretrained \\
        tokenizer.pretrained=/path/to/vae                                     # bring your own
    python scripts/train_tokenizer.py debug=default                           # seconds

seed -> data -> model -> callbacks/loggers -> trainer -> fit -> measure the latent scaling
(VAE) -> held-out metrics (+ codebook usage, VQ-GAN) ->
tokenizers/<name>/{config.json, model.safetensors, card.md}.
"""

import os
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fusion.config import check_keys, register_configs, resolve_path
from fusion.errors import UserError, report_user_errors

register_configs()


@hydra.main(config_path="../conf", config_name="train_tokenizer", version_base="1.3")
@report_user_errors
def main(cfg: DictConfig) -> None:
    import lightning as L
    import torch

    from fusion.distributed import leave_process_group
    from fusion.eval.reconstruction import evaluate_reconstruction
    from fusion.image.vae import measure_latent_scaling as measure
    from fusion.training.checkpointing import find_resume_checkpoint, fit_resuming
    from fusion.training.factory import build_callbacks, build_logger, build_trainer
    from fusion.training.tokenizer_module import (
        AutoencoderModule,
        ImageDataModule,
        build_image_tokenizer,
        check_artifact_dir,
        write_card,
    )

    check_keys(cfg)
    tok_cfg, out = cfg.tokenizer, Path(cfg.output_dir)
    try:
        artifact = check_artifact_dir(resolve_path(tok_cfg.artifact_dir), tok_cfg.overwrite)
    except FileExistsError as err:  # an artifact there already: the user picks overwrite or not
        raise UserError(str(err)) from err
    L.seed_everything(cfg.seed, workers=True)
    trains = tok_cfg.get("pretrained") is None
    # a killed run goes on from its newest intact checkpoint (docs/reliability.md)
    resume, resume_step = find_resume_checkpoint(out / "checkpoints") if trains else (None, 0)

    data = ImageDataModule(cfg.data, train_crop=tok_cfg.get("train_crop"))
    data.setup()
    tokenizer = build_image_tokenizer(tok_cfg)  # by tokenizer.kind: vae | vqgan
    data.crop_align = tokenizer.downsample_factor  # crops keep the latent grid's phase
    module = AutoencoderModule(tokenizer, tok_cfg.loss, tok_cfg.optim,
                               image_log_every=tok_cfg.image_log_every,
                               image_dir=out / "images")
    logger = build_logger(cfg.logger, out, resume_step=resume_step if resume else None)
    callbacks = build_callbacks(cfg.callbacks, out / "checkpoints")
    trainer = build_trainer(cfg.trainer, logger, callbacks, out, splits_data_itself=True)

    cpu_start = time.process_time()
    if trains:
        fit_resuming(trainer, module, data, out / "checkpoints", resume, resume_step)
    cpu_seconds = time.process_time() - cpu_start  # this process's; all threads
    train_seconds = module.clock.elapsed()  # with a resumed run's earlier time (its checkpoint)
    leave_process_group()  # the ranks' last collective is done (fusion.distributed)
    if not trainer.is_global_zero:  # one process measures and writes the artifact (DDP)
        return

    tokenizer.cpu()
    if tok_cfg.kind == "vae":  # the diffusion latents' shift and scale
        measure(tokenizer, data.image_batches("train", tok_cfg.scaling_images))
    metrics = evaluate_reconstruction(tokenizer, data.val_source, tok_cfg.eval_images,
                                      progress=True)
    if tok_cfg.kind == "vqgan":
        from fusion.image.vqgan import evaluate_codes

        metrics.update(evaluate_codes(tokenizer, data.val_source, tok_cfg.eval_images))
    device = trainer.strategy.root_device
    tokenizer.info.update(train_steps=module.batches_done, train_seconds=round(train_seconds, 1),
                          train_cpu_seconds=round(cpu_seconds, 1), heldout=metrics,
                          train_device=torch.cuda.get_device_name(device)
                          if device.type == "cuda" else device.type)
    tokenizer.save_pretrained(artifact)
    threads = [f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"] \
        if "OMP_NUM_THREADS" in os.environ else []  # part of how fast it ran
    card = write_card(artifact, tokenizer, cfg, command=" ".join(
        [*threads, "python", "scripts/train_tokenizer.py", *sys.argv[1:]]))
    print(card)


if __name__ == "__main__":
    main()
