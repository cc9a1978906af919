"""Several processes (docs/scaling.md): the data split over ranks, one clock for all ranks, and
two gloo processes on the CPU that train what one process trains, write what one process
writes, and resume a killed run on the same curve.

The multi-process runs are marked ``slow`` (four training launches, about two minutes on two
cores); ``.ci/run`` runs them after the default suite."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_resume import _logged_steps, _losses, _wait_for

from fusion.data.datamodule import RankSlice, ResumableSampler, per_rank_batch
from fusion.distributed import is_first_process, map_split
from fusion.errors import UserError
from fusion.training.checkpointing import find_resume_checkpoint
from fusion.training.fusion_module import CosineClock

ROOT = Path(__file__).resolve().parents[1]


# -- the split of the data --------------------------------------------------------------
@pytest.mark.parametrize("n", [11, 12])
def test_ranks_draw_disjoint_shares_that_make_up_the_single_process_batches(n):
    one = ResumableSampler(n, seed=5)
    ranks = [ResumableSampler(n, seed=5, num_replicas=2, rank=r) for r in (0, 1)]
    for epoch in (0, 1):
        for s in (one, *ranks):
            s.set_epoch(epoch)
        full, shares = list(one), [list(s) for s in ranks]
        assert len(shares[0]) == len(shares[1]) == n // 2
        assert not set(shares[0]) & set(shares[1])
        # batch k of every rank (2 each) together is batch k of one process (4)
        for k in range(n // 4):
            together = shares[0][2 * k:2 * k + 2] + shares[1][2 * k:2 * k + 2]
            assert sorted(together) == sorted(full[4 * k:4 * k + 4])
    assert list(ranks[0]) != list(ResumableSampler(n, seed=5, num_replicas=2, rank=0).order(0))


def test_a_resumed_rank_skips_only_its_own_batches():
    a = ResumableSampler(20, seed=1, num_replicas=2, rank=1)
    a.set_epoch(3)
    whole = list(a)
    a.resume_at(3, 4)
    assert list(a) == whole[4:]


def test_a_run_resumed_on_another_number_of_ranks_goes_on_at_the_same_global_place():
    """3 global batches of 8 trained on 2 ranks (4 each); resumed on 4 ranks (2 each), the
    rest of the epoch is what the 2 ranks had left, batch by batch."""
    def rest(world):
        out = []
        for rank in range(world):
            sampler = ResumableSampler(48, seed=2, num_replicas=world, rank=rank)
            sampler.set_epoch(1)
            sampler.resume_at(1, 3 * 8 // world)
            out.append(list(sampler))
        share = 8 // world  # batch k of the job: every rank's k-th share together
        return [sorted(sum((r[k * share:(k + 1) * share] for r in out), []))
                for k in range(len(out[0]) // share)]

    assert rest(2) == rest(4) and len(rest(2)) == 3


def test_validation_records_are_each_seen_once_over_the_ranks():
    shares = [list(RankSlice(7, 3, r)) for r in range(3)]
    assert sorted(sum(shares, [])) == list(range(7))


def test_bad_splits_are_refused_naming_the_problem():
    assert per_rank_batch(64, 4) == 16
    with pytest.raises(UserError, match="batch_size=10 is the global batch.*multiple of 4"):
        per_rank_batch(10, 4)
    with pytest.raises(UserError, match="3 training record.*over 4 ranks"):
        ResumableSampler(3, num_replicas=4, rank=0)


def test_a_batch_larger_than_a_ranks_share_of_the_data_is_refused(tokenizer):
    from omegaconf import OmegaConf

    from fusion.config import DataConfig
    from fusion.data.datamodule import DocumentDataModule

    dm = DocumentDataModule(OmegaConf.structured(DataConfig(num_train=6, num_val=2,
                                                            batch_size=8)), tokenizer)
    dm.setup()
    with pytest.raises(UserError, match="6 training record.*fewer than its share of "
                                        "data.batch_size=8"):
        dm.train_dataloader()


def test_alone_map_split_is_a_plain_map_and_rank_zero_is_read_from_the_launcher(monkeypatch):
    assert map_split(lambda i, x: (i, x * 2), [3, 4, 5]) == [(0, 6), (1, 8), (2, 10)]
    for key in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert is_first_process()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not is_first_process()
    monkeypatch.setenv("RANK", "0")  # torchrun's global rank wins over the local one
    assert is_first_process()


def test_every_rank_reads_rank_zeros_clock():
    clock = CosineClock(warmup=0, min_ratio=0.0, budget_s=10.0)
    clock.start()
    clock.agree(lambda value, src: 7.5)  # what a broadcast from rank 0 returns
    assert clock.elapsed() == 7.5 and not clock.expired()
    assert clock.multiplier(1, 1000) == pytest.approx(0.5 * (1 + torch.cos(
        torch.tensor(0.75 * torch.pi)).item()))
    clock.agree(lambda value, src: 10.0)
    assert clock.expired()
    no_budget = CosineClock(warmup=0, min_ratio=0.0)
    no_budget.start()
    no_budget.agree(lambda value, src: pytest.fail("no budget, nothing to exchange"))


# -- two gloo processes on the CPU ----------------------------------------------------------
# Chameleon without its random parts (CM3 spans, caption dropout): one process and two ranks
# then see the same documents at every step and differ only in how the loss weighs them.
# float32 everywhere: trainer.precision=auto would pick bf16 on a CPU with AMX and float32
# on one without, and the FSDP runs (32-true) are compared with these loss by loss.
RUN = ["scripts/train.py", "experiment=chameleon_tiny", "debug=default", "logger=csv",
       "trainer.precision=32-true",
       "model.loss.cm3=false", "model.loss.caption_dropout=0", "trainer.max_steps=20",
       "trainer.limit_val_batches=0", "sampling.prompts=[a photo of a red circle]",
       "callbacks.checkpoint_every_n_steps=4", "callbacks.keep_last_checkpoints=2"]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def _train(out: Path, *extra: str, threads: int = 1,
           base: list[str] = RUN) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, *base, f"output_dir={out}", *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one process, batch 8) and (two ranks, batch 4 each), 20 steps each."""
    root = tmp_path_factory.mktemp("ddp")
    one = _train(root / "one", threads=2)
    two = _train(root / "two", *DDP)
    return root / "one", root / "two", one.stdout, two.stdout


def _killed_and_resumed(out: Path, strategy: list[str], ready: str) -> dict[int, str]:
    """Start a 20-step run, SIGKILL every rank once ``checkpoints/<ready>`` exists and step 7
    is logged, run the same command again; -> its logged losses."""
    cmd = [sys.executable, *RUN, *strategy, f"output_dir={out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # its own session: the kill reaches every rank at once, as a cluster ends a job
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    _wait_for(out / "checkpoints" / ready, proc)
    while "7" not in _logged_steps(out):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, killed_at = find_resume_checkpoint(out / "checkpoints")
    assert 8 <= killed_at < 20
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    return _losses(out)


@pytest.mark.slow
def test_two_ranks_learn_what_one_process_learns(runs):
    one, two, _, _ = runs
    a, b = _losses(one), _losses(two)
    assert sorted(a) == sorted(b) == list(range(20))
    # Step 0 starts from the same weights: what differs is only that DDP averages the two
    # ranks' token means where one process takes one mean over all tokens (the ranks' token
    # counts differ by a caption's length) and the order of float sums; measured 4e-5
    # relative. Later steps compound those differences in the updates: at most 7e-4 measured
    # over 20 steps (docs/scaling.md). A wrong split (a rank repeating or skipping data, or
    # unsynced gradients) moves the loss by the step-to-step noise, a few percent.
    assert abs(float(a[0]) - float(b[0])) / float(a[0]) < 2e-4
    for step in a:
        assert abs(float(a[step]) - float(b[step])) / float(a[step]) < 2e-3, step
    wa, wb = load_file(one / "model" / "model.safetensors"), load_file(
        two / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 2e-3


@pytest.mark.slow
def test_only_rank_zero_writes_and_the_folder_loads_in_one_process(runs):
    from fusion import FusionPipeline

    one, two, one_out, two_out = runs
    assert two_out.count("saved ") == 1  # rank 1 writes no model folder
    files = {p.relative_to(two).as_posix() for p in two.rglob("*") if "hydra" not in p.parts}
    assert files == {p.relative_to(one).as_posix() for p in one.rglob("*")
                     if "hydra" not in p.parts}  # checkpoints, logs, samples, model folder
    # Hydra's job log is per process: rank 1 writes its own console log, nothing else.
    extra = {p.name for p in two.glob("hydra/*/*")} - {p.name for p in one.glob("hydra/*/*")}
    assert extra == {"train_ddp_process_1.log"}
    with (two / "csv" / "metrics.csv").open(newline="") as fh:
        steps = [r["step"] for r in csv.DictReader(fh) if r.get("train/loss")]
    assert len(steps) == len(set(steps)) == 20  # one writer: every step once
    pipe = FusionPipeline.from_pretrained(two / "model")
    image = pipe("a photo of a red circle", output_type="np", progress=False)
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_a_ddp_run_killed_mid_way_resumes_on_the_same_curve(runs, tmp_path):
    _, straight, _, _ = runs
    out = tmp_path / "killed"
    # Same data per rank, same per-rank random streams, same gloo reductions: bitwise the
    # same losses before and after the resume point.
    assert _killed_and_resumed(out, DDP, "step0000008.ckpt") == _losses(straight)


# -- sampling and evaluation over two processes (torchrun, gloo) ---------------------------
def _torchrun(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert (proc.returncode == 0) == ok, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_vae):
    from test_api import _folder

    return _folder(tmp_path_factory.mktemp("tf") / "model", "transfusion", str(tiny_vae))


def _images(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*.png")}


@pytest.mark.slow
def test_two_processes_evaluate_a_model_with_the_scores_of_one(model_folder, tmp_path):
    import json

    args = ["scripts/evaluate.py", "model", "--model", str(model_folder), "--images-per-tag",
            "2", "--caption-images", "8", "--batch-size", "4", "--device", "cpu"]
    # one thread in both: FID's feature net sums in another order with more threads
    subprocess.run([sys.executable, *args, "--keep-images", str(tmp_path / "one"), "--json",
                    str(tmp_path / "one.json")], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc = _torchrun(*args, "--keep-images", str(tmp_path / "two"),
                     "--json", str(tmp_path / "two.json"))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert _images(tmp_path / "one") == _images(tmp_path / "two")  # bitwise the same images
    assert two == one  # every figure, FID and captions included
    assert proc.stdout.count("geneval_overall") == 1  # rank 0 reports


@pytest.mark.slow
def test_two_processes_sample_interleaved_documents_as_one_does(model_folder, tmp_path):
    common = ["scripts/sample.py", f"model_dir={model_folder}", "task=interleaved",
              "max_new_tokens=6", "max_images=1", "device=cpu",
              "prompts=[a red circle,2 photos of a blue square,a green triangle]"]
    subprocess.run([sys.executable, *common, f"output_dir={tmp_path / 'one'}"], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    _torchrun(*common, f"output_dir={tmp_path / 'two'}")
    for name in ("interleaved.jsonl", "interleaved.md"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text()
    assert _images(tmp_path / "one") == _images(tmp_path / "two")
    # more processes than prompts: refused, naming both
    bad = _torchrun(*common[:-1], "prompts=[a red circle]", f"output_dir={tmp_path / 'bad'}",
                    ok=False)
    assert "1 prompt(s) cannot be split over 2 processes" in bad.stderr


@pytest.mark.slow
def test_stage_one_trains_with_two_processes(tmp_path):
    """scripts/train_tokenizer.py under DDP: each rank its own share of the images (the
    resumable sampler's split), one artifact written by rank 0."""
    import json

    out = tmp_path / "run"
    _train(out, *DDP, "trainer.precision=32-true", f"tokenizer.artifact_dir={out / 'art'}",
           base=["scripts/train_tokenizer.py", "debug=default", "logger=csv",
                 "data.image_size=32", "tokenizer.autoencoder.block_out_channels=[16,32,32]",
                 "tokenizer.autoencoder.norm_num_groups=8", "tokenizer.eval_images=8",
                 "tokenizer.scaling_images=8", "tokenizer.image_log_every=0"])
    info = json.loads((out / "art" / "config.json").read_text())["info"]
    assert info["train_steps"] == 4 and info["heldout"]["images"] == 8


_GROUP_SCRIPT = """
import sys
import torch.distributed as dist
from fusion.distributed import all_ranks, process_group_from_env

with process_group_from_env() as (size, rank):
    ranks = all_ranks(rank)
    if sys.argv[1] == "fail" and rank == 1:
        raise RuntimeError("rank 1 fails")
print(f"rank {rank} of {size} saw {ranks}; group left: {not dist.is_initialized()}")
"""


@pytest.mark.slow
def test_a_script_leaves_torchruns_group_at_its_end_and_a_failing_rank_fails_the_job(tmp_path):
    script = tmp_path / "group.py"
    script.write_text(_GROUP_SCRIPT)
    for _ in range(3):  # the abort at teardown it guards against came 1 run in several
        proc = _torchrun(str(script), "ok")
        assert "rank 0 of 2 saw [0, 1]; group left: True" in proc.stdout
    bad = _torchrun(str(script), "fail", ok=False)
    assert "rank 1 fails" in bad.stderr


# -- FSDP (trainer=fsdp: FSDP2 through Lightning's ModelParallelStrategy) -------------------
def _tiny_family(family: str = "chameleon"):
    from fusion.config import compose
    from fusion.data.text import TextTokenizer
    from fusion.families import build_family, load_image_tokenizer

    cfg = compose("train", [f"experiment={family}_tiny"])
    tok = TextTokenizer.from_file(ROOT / "tokenizers/shapes-bpe/tokenizer.json")
    torch.manual_seed(0)
    model, _ = build_family(cfg.model, tok, load_image_tokenizer(cfg.image_tokenizer), 64)
    return model


def test_activation_checkpointing_keeps_the_keys_and_the_gradients():
    from fusion.models.transformer import TransformerBlock
    from fusion.training.sharding import checkpoint_blocks

    plain, wrapped = _tiny_family(), _tiny_family()
    n_blocks = sum(isinstance(m, TransformerBlock) for m in plain.modules())
    assert checkpoint_blocks(wrapped) == n_blocks > 0
    assert checkpoint_blocks(wrapped) == 0  # a second call wraps nothing twice
    assert wrapped.state_dict().keys() == plain.state_dict().keys()
    from fusion.models.attention import layout_from_segments

    ids = torch.randint(0, 100, (2, 24))
    layout = layout_from_segments([[(0, "text", 24)], [(0, "text", 10), (1, "text", 14)]])
    grads = []
    for model in (plain, wrapped):
        model(ids, layout).float().pow(2).mean().backward()
        grads.append({n.replace("._checkpoint_wrapped_module", ""): p.grad.clone()
                      for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][k], grads[1][k], atol=1e-6) for k in grads[0])


def test_the_sharding_plan_and_the_gathered_weights(tmp_path):
    """One FSDP unit per block plus the root, and the gathered state dict equals the plain
    one (a one-process gloo group: fully_shard needs a process group, not several ranks)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from fusion.models.transformer import TransformerBlock
    from fusion.training.sharding import full_state_dict, is_sharded, shard_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = _tiny_family()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        shard_model(model, init_device_mesh("cpu", (1,)), bf16=True)
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        blocks = [m for m in model.modules() if isinstance(m, TransformerBlock)]
        assert is_sharded(model) and len(units) == len(blocks) + 1
        assert all(isinstance(b, FSDPModule) for b in blocks)
        gathered = full_state_dict(model)
        assert gathered.keys() == before.keys()
        assert all(torch.equal(gathered[k], before[k]) for k in before)
    finally:
        dist.destroy_process_group()


def test_bad_fsdp_setups_are_refused():
    from fusion.training.factory import check_sharded_setup

    with pytest.raises(UserError, match="accelerator=mps cannot shard"):
        check_sharded_setup("mps", "32-true")
    with pytest.raises(UserError, match="not 16-mixed"):
        check_sharded_setup("cpu", "16-mixed")
    check_sharded_setup("cpu", "bf16-mixed")


FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true"]


@pytest.mark.slow
def test_fsdp_learns_what_ddp_learns_writes_one_folder_and_resumes(runs, tmp_path):
    from fusion import FusionPipeline

    one, ddp, _, _ = runs
    straight = tmp_path / "straight"
    _train(straight, *FSDP)
    a, b = _losses(ddp), _losses(straight)
    assert sorted(a) == sorted(b) == list(range(20))
    # the same split and the same reductions up to their order (reduce-scatter vs all-reduce)
    assert all(abs(float(a[s]) - float(b[s])) / float(a[s]) < 1e-3 for s in a)
    assert (straight / "checkpoints" / "last.ckpt" / ".metadata").is_file()  # sharded
    files = {p.relative_to(straight / "model").as_posix() for p in (straight / "model").rglob("*")}
    assert files == {p.relative_to(one / "model").as_posix()
                     for p in (one / "model").rglob("*")}
    assert load_file(straight / "model" / "model.safetensors").keys() == load_file(
        one / "model" / "model.safetensors").keys()
    assert FusionPipeline.from_pretrained(straight / "model")(
        "a photo of a red circle", output_type="np", progress=False).shape == (1, 64, 64, 3)

    out = tmp_path / "killed"
    assert _killed_and_resumed(out, FSDP, "step0000008.ckpt/meta.pt") == _losses(straight)


@pytest.mark.slow
def test_fsdp_with_bf16_activation_checkpointing_and_ema(tmp_path, tiny_vae):
    from fusion import FusionPipeline

    out = tmp_path / "run"
    _train(out, *FSDP[:-1], "trainer.precision=bf16-mixed", "trainer.activation_checkpointing=true",
           "optim.ema_decay=0.9", f"image_tokenizer={tiny_vae}", "sampling.diffusion_steps=2",
           base=["scripts/train.py", "experiment=transfusion_tiny", "debug=default",
                 "logger=csv", "trainer.limit_val_batches=1",
                 "sampling.prompts=[a photo of a red circle]"])
    losses = _losses(out)
    assert sorted(losses) == list(range(4)) and all(float(v) == float(v) for v in losses.values())
    assert (out / "samples" / "step0000004.png").is_file()  # the grid, from gathered weights
    pipe = FusionPipeline.from_pretrained(out / "model")
    assert pipe("a red circle", diffusion_steps=2, output_type="np",
                progress=False).shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_fsdp_with_lora_trains_the_adapters_and_saves_them_merged(tmp_path):
    """LoRA under FSDP2: frozen and trained parameters share each sharded block; the folder
    holds the merged weights under the plain names, and only the projections moved."""
    pytest.importorskip("peft")
    from fusion import FusionPipeline

    out = tmp_path / "run"
    _train(out, *FSDP, "lora.rank=4", "optim.lr=1e-2", "trainer.max_steps=4",
           "callbacks.checkpoint_every_n_steps=2")
    losses = _losses(out)
    assert sorted(losses) == list(range(4)) and all(float(v) == float(v) for v in losses.values())
    weights = load_file(out / "model" / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in weights)
    meta = json.loads((out / "model" / "config.json").read_text())
    assert meta["lora"]["rank"] == 4
    FusionPipeline.from_pretrained(out / "model")  # strict load of the plain model


@pytest.mark.slow
def test_the_main_job_trains_and_evaluates_with_two_processes(tmp_path):
    import json

    from test_demo import _run

    out = tmp_path / "demo"
    printed = _run(out, "demo.processes=2", "demo.edit_steps=0")
    assert "trainer.strategy=ddp" in printed and "torch.distributed.run" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["train_steps"] == 4 and "geneval_overall" in results
    assert (out / "samples.png").is_file()
