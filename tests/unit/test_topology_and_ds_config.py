import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardrun.config import DeepSpeedSpec
from shardrun.trainer.ds_config import build_ds_config, deep_merge
from shardrun.trainer.topology import Topology, pick_device


def test_topology_from_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    topo = Topology.from_env(use_gpu=False)
    assert (topo.rank, topo.world_size, topo.local_rank, topo.device) == (3, 4, 1, "cpu")
    assert not topo.is_main


def test_topology_alone(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert Topology.from_env(use_gpu=False).is_main


def test_topology_checks_rank():
    with pytest.raises(ValueError, match="outside a world of 2"):
        Topology(rank=2, world_size=2, local_rank=0, device="cpu")


def test_topology_without_cuda_refuses_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="sees no CUDA device"):
        Topology.from_env(use_gpu=True)


@pytest.mark.parametrize(("use_gpu", "local_rank", "visible", "given", "device"), [
    (False, 1, 2, None, "cpu"),
    # Ray Train: the node's two GPUs shown to both workers (CUDA_VISIBLE_DEVICES=0,1); this one was given the
    # second, whatever its local rank says
    (True, 0, 2, "cuda:1", "cuda:1"),
    (True, 1, 2, None, "cuda:1"),  # torchrun: every GPU shown, one per local rank
    (True, 1, 1, None, "cuda:0"),  # narrowed to one GPU by hand
])
def test_each_worker_trains_on_its_own_gpu(use_gpu, local_rank, visible, given, device):
    assert pick_device(use_gpu, local_rank=local_rank, visible=visible, given=given) == device


def test_deepspeed_takes_its_cpu_accelerator_unless_the_spec_asks_for_gpus(monkeypatch):
    from shardrun.trainer.extensions import choose_accelerator

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    choose_accelerator(use_gpu=True)
    assert "DS_ACCELERATOR" not in os.environ  # DeepSpeed finds CUDA itself
    choose_accelerator(use_gpu=False)
    assert os.environ["DS_ACCELERATOR"] == "cpu"


def test_ds_config_from_spec():
    spec = DeepSpeedSpec(zero_stage=3, precision="bf16", micro_batch_size=4, grad_accum_steps=2,
                         grad_clip=0.5, schedule={"warmup_steps": 10})
    cfg = build_ds_config(spec, max_steps=100, on_gpu=False)
    assert cfg["zero_optimization"] == {"stage": 3}
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["optimizer"]["type"] == "AdamW"
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["scheduler"]["type"] == "WarmupCosineLR"
    assert cfg["scheduler"]["params"]["total_num_steps"] == 100
    on_gpu = build_ds_config(spec, max_steps=100, on_gpu=True)["optimizer"]["params"]
    assert on_gpu["torch_adam"] is True and on_gpu["fused"] is True  # torch's fused AdamW: nothing to compile
    own = DeepSpeedSpec(optimizer={"implementation": "deepspeed"})
    assert build_ds_config(own, max_steps=100, on_gpu=True)["optimizer"]["params"]["torch_adam"] is False


NO_COMPILER_STEP = """
import json, os, sys, torch
import shardrun.trainer.engine  # DeepSpeed with its CPU accelerator, as a worker imports it
import deepspeed
from shardrun.config import DeepSpeedSpec
from shardrun.trainer.ds_config import build_ds_config
from shardrun.trainer.engine import init_distributed
from shardrun.trainer.topology import Topology
init_distributed(Topology(rank=0, world_size=1, local_rank=0, device="cpu"))
spec = DeepSpeedSpec(zero_stage=int(sys.argv[1]), micro_batch_size=2, optimizer={"implementation": sys.argv[2]})
config = build_ds_config(spec, max_steps=4, on_gpu=True)  # the config a GPU worker gets
model = torch.nn.Linear(8, 8)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
loss = engine(torch.randn(2, 8)).pow(2).mean()
engine.backward(loss)
engine.step()
print("stepped with", type(engine.optimizer).__name__, getattr(engine.optimizer, "optimizer", engine.optimizer))
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [0, 2])
def test_the_default_optimizer_needs_no_compiler(tmp_path, stage):
    """With no C++ compiler or nvcc on PATH and an empty extensions folder, the optimizer a GPU worker's config
    names is built and steps, and nothing is compiled; DeepSpeed's own needs the compiler it lacks."""
    env = {"PATH": str(tmp_path / "nothing"), "HOME": str(tmp_path), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"),
           "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", NO_COMPILER_STEP, str(stage), "torch"], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "stepped with" in done.stdout and "AdamW" in done.stdout
    assert not (tmp_path / "ext").exists() or not any((tmp_path / "ext").rglob("*.so"))
    if stage == 2:
        theirs = subprocess.run([sys.executable, "-c", NO_COMPILER_STEP, str(stage), "deepspeed"], env=env,
                                capture_output=True, text=True, timeout=240)
        assert theirs.returncode != 0 and "cpu_adam" in theirs.stderr  # a C++ op: it cannot be built here


def test_ds_config_schedule_edges():
    constant = DeepSpeedSpec(schedule={"decay": "constant", "warmup_steps": 0})
    sched = build_ds_config(constant, max_steps=10, on_gpu=False)["scheduler"]
    assert sched["type"] == "WarmupLR" and sched["params"]["warmup_num_steps"] == 1
    short = build_ds_config(DeepSpeedSpec(schedule={"warmup_steps": 50}), max_steps=10, on_gpu=False)
    assert short["scheduler"]["params"]["warmup_num_steps"] == 10
    assert short["scheduler"]["params"]["total_num_steps"] == 11


def test_raw_config_is_merged_last():
    spec = DeepSpeedSpec(config={"zero_optimization": {"overlap_comm": True},
                                 "optimizer": {"params": {"lr": 0.5}}, "gradient_clipping": 2.0})
    cfg = build_ds_config(spec, max_steps=10, on_gpu=False)
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True}
    assert cfg["optimizer"]["params"]["lr"] == 0.5
    assert cfg["optimizer"]["params"]["torch_adam"] is True
    assert cfg["gradient_clipping"] == 2.0


def test_deep_merge_leaves_inputs_alone():
    base, over = {"a": {"b": 1}}, {"a": {"c": 2}}
    assert deep_merge(base, over) == {"a": {"b": 1, "c": 2}}
    assert base == {"a": {"b": 1}} and over == {"a": {"c": 2}}


@pytest.mark.parametrize("path", ["/usr/bin:/bin", "{bin}:/usr/bin:/bin"])
def test_the_engine_builds_deepspeeds_ops_with_this_environments_ninja(path):
    """Two ninja versions take each other's build of DeepSpeed's CPU op for a stale one: whatever PATH a worker
    starts with, the engine puts the ninja beside its Python first, once."""
    here = str(Path(sys.executable).parent)
    assert (Path(here) / "ninja").exists()  # DeepSpeed depends on the ninja package
    code = "import os, shardrun.trainer.engine; print(os.environ['PATH'])"
    out = subprocess.run([sys.executable, "-c", code], env={"PATH": path.format(bin=here), "HOME": str(Path.home())},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == f"{here}:/usr/bin:/bin"


@pytest.mark.parametrize(("device", "precision", "capability", "advised"), [
    ("cuda:0", "fp32", (9, 0), True),  # H100
    ("cuda:0", "fp32", (8, 0), True),  # A100
    ("cuda:0", "fp32", (7, 0), False),  # V100: no bf16 tensor cores
    ("cuda:0", "bf16", (9, 0), False),
    ("cpu", "fp32", None, False),
])
def test_fp32_on_a_gpu_with_bf16_tensor_cores_is_pointed_out(device, precision, capability, advised):
    from shardrun.trainer.engine import precision_advice

    said = precision_advice(device, precision, capability)
    assert bool(said) == advised and (not said or "deepspeed.precision: bf16" in said)


@pytest.mark.parametrize(("precision", "reduce", "accum", "fp32"), [
    ("bf16", "auto", 2, True),  # micro-batches' rounding adds up: reduce in fp32
    ("bf16", "auto", 1, False),
    ("bf16", "fp32", 1, True),
    ("bf16", "model", 4, False),
    ("fp32", "auto", 4, False),  # fp32 already
])
def test_gradients_of_a_low_precision_model_are_reduced_in_fp32_when_asked_or_accumulated(precision, reduce, accum,
                                                                                         fp32):
    spec = DeepSpeedSpec(precision=precision, reduce_dtype=reduce, grad_accum_steps=accum)
    cfg = build_ds_config(spec, max_steps=10, on_gpu=True)
    assert ("communication_data_type" in cfg) == fp32 and cfg.get("communication_data_type", "fp32") == "fp32"


@pytest.mark.parametrize(("stage", "on_gpu", "overlap", "params", "zero"), [
    (2, True, None, 124_000_000, {"overlap_comm": True, "reduce_bucket_size": 31_000_000,
                                  "allgather_bucket_size": 31_000_000}),
    (1, True, None, 1_000_000, {"overlap_comm": True, "reduce_bucket_size": 10_000_000,
                                "allgather_bucket_size": 10_000_000}),
    (2, True, None, 7_000_000_000, {"overlap_comm": True, "reduce_bucket_size": 500_000_000,
                                    "allgather_bucket_size": 500_000_000}),
    (2, False, None, 124_000_000, {}),  # CPU: nothing to overlap on
    (2, False, True, None, {"overlap_comm": True}),
    (2, True, False, 124_000_000, {"overlap_comm": False}),
    (3, True, None, 124_000_000, {}),  # ZeRO 3 overlaps by itself
    (0, True, None, 124_000_000, {}),
])
def test_communication_overlaps_backward_on_gpus_in_buckets_sized_from_the_model(stage, on_gpu, overlap, params,
                                                                                 zero):
    spec = DeepSpeedSpec(zero_stage=stage, overlap_comm=overlap)
    cfg = build_ds_config(spec, max_steps=10, on_gpu=on_gpu, model_params=params)
    assert cfg["zero_optimization"] == {"stage": stage, **zero}
