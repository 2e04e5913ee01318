"""The levers that fit a bigger model, as the spec asks for them: ZeRO offload mapped to DeepSpeed's config and
its impossible combinations refused before Ray; model.compile on a CPU without a C++ compiler refused before Ray."""

import pytest
from helpers import tiny_spec, write_spec

from shardrun import cli
from shardrun.config import DeepSpeedSpec, parse
from shardrun.errors import UserError
from shardrun.trainer.ds_config import build_ds_config


@pytest.mark.parametrize(("offload", "stage", "on_gpu", "expect"), [
    ({"optimizer": "cpu"}, 2, True, {"offload_optimizer": {"device": "cpu", "pin_memory": True}}),
    ({"optimizer": "cpu", "pin_memory": False}, 1, True, {"offload_optimizer": {"device": "cpu", "pin_memory": False}}),
    ({"optimizer": "cpu", "params": "cpu"}, 3, False, {"offload_optimizer": {"device": "cpu", "pin_memory": False},
                                                      "offload_param": {"device": "cpu", "pin_memory": False}}),
    ({"params": "nvme", "nvme_path": "/local_nvme"}, 3, True,
     {"offload_param": {"device": "nvme", "pin_memory": True, "nvme_path": "/local_nvme"}}),
    ({}, 3, True, {}),
])
def test_offload_becomes_zeros_offload_sections(offload, stage, on_gpu, expect):
    spec = DeepSpeedSpec(zero_stage=stage, offload=offload)
    zero = build_ds_config(spec, max_steps=10, on_gpu=on_gpu)["zero_optimization"]
    assert {k: v for k, v in zero.items() if k.startswith("offload")} == expect
    forced = build_ds_config(spec, max_steps=10, on_gpu=on_gpu).get("zero_force_ds_cpu_optimizer")
    assert forced is (False if expect else None)  # torch's AdamW steps offloaded state; DeepSpeed insists otherwise
    own = DeepSpeedSpec(zero_stage=stage, offload=offload, optimizer={"implementation": "deepspeed"})
    assert "zero_force_ds_cpu_optimizer" not in build_ds_config(own, max_steps=10, on_gpu=on_gpu)  # its CPU Adam


@pytest.mark.parametrize(("deepspeed", "expect"), [
    ({"zero_stage": 0, "offload": {"optimizer": "cpu"}}, "offload.optimizer needs ZeRO 1, 2 or 3"),
    ({"zero_stage": 2, "offload": {"params": "cpu"}}, "offload.params needs ZeRO 3 \\(deepspeed.zero_stage is 2\\)"),
    ({"zero_stage": 2, "offload": {"optimizer": "nvme", "nvme_path": "/n"}}, "nvme needs ZeRO 3"),
    ({"zero_stage": 3, "offload": {"params": "nvme"}}, "needs deepspeed.offload.nvme_path"),
    ({"zero_stage": 3, "offload": {"optimizer": "nvme", "nvme_path": "/n"}}, "implementation: deepspeed"),
    ({"offload": {"optimizer": "gpu"}}, "offload.optimizer"),
])
def test_offload_that_deepspeed_cannot_do_is_a_spec_error(tmp_path, corpus, deepspeed, expect):
    with pytest.raises(UserError, match=expect):
        parse(tiny_spec(corpus, tmp_path, deepspeed=deepspeed))


def test_compile_on_a_cpu_without_a_compiler_exits_2_before_ray(tmp_path, corpus, capsys, monkeypatch):
    spec = tiny_spec(corpus, tmp_path / "runs")
    spec["model"]["compile"] = True
    path = write_spec(tmp_path / "job.yaml", spec)
    assert cli.main(["check", str(path)]) == 0
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cli.main(["check", str(path)]) == 2
    assert "model.compile on CPU needs a C++ compiler" in capsys.readouterr().err
