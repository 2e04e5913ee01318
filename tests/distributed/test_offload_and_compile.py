"""The memory and speed levers on one CPU rank, through the engine the worker loop builds (shardrun's restore):
ZeRO-3 with the optimizer state and the weights offloaded to host memory trains as without; a compiled model
(model.compile, DeepSpeed's engine.compile) loses what the eager one does, and a compiled run resumed from its
checkpoint goes on exactly as the unbroken compiled run."""

import json
import sys

import pytest
from helpers import run, tiny_spec, write_spec

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

SCRIPT = """
import contextlib, json, sys, tempfile, torch, yaml
from shardrun.config import JobSpec
from shardrun.trainer import checkpoint, engine
from shardrun.trainer.checkpoint import TrainState
from shardrun.trainer.restore import restore
from shardrun.trainer.topology import Topology


class Store:
    def __init__(self, path=None):
        self.path = path

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield self.path


raw = yaml.safe_load(open(sys.argv[1]))
topology = Topology(rank=0, world_size=1, local_rank=0, device="cpu")
engine.init_distributed(topology)
rows = torch.randint(0, 256, (5, 4, 33), generator=torch.Generator().manual_seed(0))


def spec(**model_and_deepspeed):
    out = yaml.safe_load(yaml.safe_dump(raw))
    for section, values in model_and_deepspeed.items():
        out[section].update(values)
    return JobSpec.model_validate(out)


def train(built, steps):
    losses = []
    for batch in steps:
        loss = built(rows[batch, :, :-1], rows[batch, :, 1:])
        built.backward(loss)
        built.step()
        losses.append(loss.item())
    return losses


def fresh(s):
    return restore(s, Store(), topology).engine


out = {}
plain = spec(deepspeed={"zero_stage": 3})
offloaded = spec(deepspeed={"zero_stage": 3, "offload": {"optimizer": "cpu", "params": "cpu"}})
built = fresh(offloaded)
zero = built.optimizer
out["offload"] = {"optimizer": str(zero.offload_optimizer), "params": str(zero.offload_param)}
out["offloaded"], out["plain"] = train(built, [0] * 5), train(fresh(plain), [0] * 5)  # one batch, learnt

compiled = spec(model={"compile": True}, deepspeed={"zero_stage": 2})
out["eager"] = train(fresh(spec(deepspeed={"zero_stage": 2})), range(5))
built = fresh(compiled)
out["is_compiled"] = built.is_compiled
out["compiled"] = train(built, range(3))
folder = tempfile.mkdtemp()
checkpoint.save(built, folder, TrainState(step=3), {}, topology, zero_stage=2, precision="fp32")
out["compiled"] += train(built, range(3, 5))
resumed = restore(compiled, Store(folder), topology).engine
out["resumed"] = train(resumed, range(3, 5))
print("RESULT " + json.dumps(out))
"""


def test_offload_and_compile_train_as_the_plain_engine_and_a_compiled_run_resumes_exactly(tmp_path, corpus):
    raw = tiny_spec(corpus, tmp_path / "runs", scaling={"num_workers": 1},
                    deepspeed={"optimizer": {"lr": 1e-2}, "schedule": {"warmup_steps": 0}})
    out = run([sys.executable, "-c", SCRIPT, str(write_spec(tmp_path / "job.yaml", raw))], timeout=280).stdout
    result = json.loads(out.split("RESULT ", 1)[1])
    assert result["offload"] == {"optimizer": "True", "params": "True"}, result  # ZeRO-3's own flags
    assert result["offloaded"] == pytest.approx(result["plain"], abs=1e-5), result
    assert result["offloaded"][-1] < result["offloaded"][0] - 0.1  # it trains
    assert result["is_compiled"]
    assert result["compiled"] == pytest.approx(result["eager"], abs=1e-4), result
    assert result["resumed"] == pytest.approx(result["compiled"][3:], abs=1e-6), result
