"""The validation loop below the process group: which batches each rank evaluates (the same set for every world
size, the same number of forwards on every rank), the sum in batch order, when it runs, what it leaves as it
was (train mode, random state), and how its records are said (console, summary.json, the report)."""

import json
import math

import pytest
import torch
from helpers import tiny_spec

from shardrun import config
from shardrun.driver.run_log import RunLog, carry_over, summary_line
from shardrun.report import format_summary, report
from shardrun.trainer.evaluate import Evaluator, assigned, is_due, total
from shardrun.trainer.topology import Topology

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(("batches", "world"), [(5, 1), (5, 2), (3, 8), (8, 4), (1, 3)])
def test_every_batch_is_one_ranks_and_every_rank_runs_as_many_forwards(batches, world):
    shares = [assigned(batches, world, rank) for rank in range(world)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == math.ceil(batches / world)
    mine = sorted(b for s in shares for b in s if b is not None)
    assert mine == list(range(batches))


def test_the_sum_is_taken_in_batch_order_whatever_the_world_size():
    rng = torch.Generator().manual_seed(0)
    parts = [(b, float(torch.rand((), generator=rng)) * 1e3, 100 + b) for b in range(7)]
    alone = total([parts])
    for world in (2, 3, 7):
        ranks = [[p for p in parts if p[0] % world == r] for r in range(world)]
        assert total(ranks) == alone  # bitwise: the same additions in the same order
    assert alone[1] == sum(p[2] for p in parts)


def test_it_runs_every_n_steps_and_after_the_last(tmp_path):
    spec = config.parse(tiny_spec(tmp_path, tmp_path, eval={"paths": ["x"], "every_steps": 4}))
    assert [s for s in range(1, 11) if is_due(spec, s, last=s == 10)] == [4, 8, 10]
    spec.eval = config.EvalSpec(paths=["x"], at_end=False)
    assert not any(is_due(spec, s, last=s == 10) for s in range(1, 11))
    spec.eval = None
    assert not is_due(spec, 10, last=True)


class _Engine:
    """What the evaluator calls: the module, and the engine's forward."""

    def __init__(self, module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _Alone:
    def gather(self, mine):
        return [mine]


def test_an_evaluation_counts_the_held_out_tokens_and_leaves_mode_and_random_state_alone(tmp_path, corpus):
    from shardrun.trainer import models

    spec = config.parse(tiny_spec(corpus, tmp_path, model={"n_layer": 1, "n_head": 2, "n_embd": 16,
                                                           "block_size": 32, "dropout": 0.5},
                                  eval={"paths": [str(corpus)], "max_batches": 3}))
    torch.manual_seed(0)
    model = models.build(spec.model).train()
    evaluator = Evaluator(spec, Topology(rank=0, local_rank=0, world_size=1, device="cpu"))
    state = torch.get_rng_state()
    first = evaluator.evaluate(_Engine(model), _Alone())
    assert model.training and torch.equal(torch.get_rng_state(), state)
    assert first["eval_tokens"] == 3 * 4 * 32 and first["eval_loss"] > 0
    again = evaluator.evaluate(_Engine(model), _Alone())  # no dropout in eval mode: the same number
    assert again["eval_loss"] == first["eval_loss"]


def test_the_console_the_summary_and_a_resumed_runs_summary_carry_the_held_out_loss():
    log = RunLog(max_steps=20, byte_level=False)
    log.on_start({"step": 0, "samples": 0, "tokens": 0, "world_size": 2})
    for step, loss in ((10, 2.5), (20, 2.0)):
        log.on_record({"step": step, "samples": step, "tokens": step * 32, "loss": loss, "lr": 1e-3})
    lines = [log.on_record({"step": s, "eval_loss": v, "eval_tokens": 65536, "eval_seconds": 1.25})
             for s, v in ((10, 2.4), (20, 2.6))]
    assert lines[0] == "eval at step 10: loss 2.4000 (perplexity 11.02) over 65,536 tokens in 1.2 s"
    summary = log.summary(checkpoint=None, finished=True, wall_seconds=5)
    assert (summary["first_eval_loss"], summary["last_eval_loss"], summary["best_eval_loss"],
            summary["best_eval_step"]) == (2.4, 2.6, 2.4, 10)
    assert summary["last_loss"] == 2.0  # eval records are not step records
    assert "eval loss 2.4000 -> 2.6000 (best 2.4000 at step 10)" in summary_line(summary, "runs/x")
    table = RunLog(max_steps=5, byte_level=False).on_record({"step": 5, "eval_loss": 0.25, "eval_rows": 1,
                                                             "eval_seconds": 0.5})
    assert table == "eval at step 5: loss 0.2500 over 1 row in 0.5 s"

    later = {**summary, "start_step": 20, "first_eval_loss": 2.5, "last_eval_loss": 2.5, "best_eval_loss": 2.5,
             "best_eval_step": 30}  # a resumed invocation: the run's first and best are the earlier ones
    carried = carry_over(later, summary)
    assert (carried["first_eval_loss"], carried["best_eval_loss"], carried["best_eval_step"]) == (2.4, 2.4, 10)
    better = carry_over({**later, "best_eval_loss": 2.1}, summary)
    assert (better["best_eval_loss"], better["best_eval_step"]) == (2.1, 30)


def test_the_report_plots_the_held_out_loss_beside_the_training_loss(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "loss": 3.0 - s / 10, "lr": 1e-3, "samples_per_s": 10.0} for s in (10, 20, 30)]
    rows.insert(2, {"step": 20, "eval_loss": 2.0, "eval_tokens": 100})
    rows.append({"step": 30, "eval_loss": 1.5, "eval_tokens": 100})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = report(str(run))
    assert summary["records"] == 3 and summary["last_loss"] == pytest.approx(0.0)
    assert (summary["first_eval_loss"], summary["best_eval_loss"], summary["best_eval_step"]) == (2.0, 1.5, 30)
    assert "eval loss 2.0000 -> 1.5000 (best 1.5000 at step 30)" in format_summary(summary)
    assert "loss.png" in summary["plots"]


def test_keep_best_keeps_the_lowest_held_out_losses_and_the_newest_as_ray_train_does():
    from shardrun.checkpoint_format import kept_steps

    losses = {10: 2.0, 20: 1.5, 30: None, 40: 1.7, 50: 1.9}
    assert kept_steps(losses, 50, keep=1) == {20, 50}
    assert kept_steps(losses, 50, keep=2) == {20, 40, 50}
    assert kept_steps({10: 1.0, 20: 1.0, 30: None}, 30, keep=1) == {20, 30}  # a tie goes to the newer
    assert kept_steps({10: None, 20: None}, 20, keep=1) == {20}


def test_keep_best_needs_evaluations_and_says_when_checkpoints_fall_between_them(tmp_path):
    from shardrun.errors import UserError

    raw = tiny_spec(tmp_path, tmp_path, checkpoint={"keep_best": True, "every_steps": 5})
    with pytest.raises(UserError, match="keep_best ranks checkpoints by their held-out loss: it needs an eval"):
        config.parse(raw)
    spec = config.parse({**raw, "eval": {"paths": ["x"], "every_steps": 2}})
    assert any("checkpoint.every_steps (5) is no multiple of eval.every_steps (2)" in w for w in spec.warnings())
    assert not config.parse({**raw, "eval": {"paths": ["x"], "every_steps": 5}}).warnings()


def test_under_ray_keep_best_is_ray_trains_own_retention_by_eval_loss(tmp_path):
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _TrainingResultState

    from shardrun.cluster.launch import run_config
    from shardrun.trainer.checkpointer import UNRANKED

    raw = tiny_spec(tmp_path, tmp_path, checkpoint={"keep_best": True, "every_steps": 2, "keep": 3},
                    eval={"paths": ["x"], "every_steps": 2})
    kept = run_config(config.parse(raw)).checkpoint_config
    assert (kept.num_to_keep, kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (3, "eval_loss", "min")
    assert run_config(config.parse(tiny_spec(tmp_path, tmp_path))).checkpoint_config.checkpoint_score_attribute is None
    # Ray keeps its record as JSON, where infinity would come back as null and fail its ranking on resume
    record = _TrainingResultState(checkpoint_dir_name="c", metrics={"eval_loss": UNRANKED})
    assert _TrainingResultState.model_validate_json(record.model_dump_json()).metrics["eval_loss"] == UNRANKED


def test_a_table_is_evaluated_by_its_rows(tmp_path):
    import sys

    from helpers import REPO

    sys.path.insert(0, str(REPO))
    from examples.tabular_model import build, make_data

    make_data(tmp_path / "table", rows=2000)
    raw = {"name": "tab", "model": {"entrypoint": "examples.tabular_model:build"},
           "data": {"paths": [str(tmp_path / "table")], "format": "table", "label": "label"},
           "deepspeed": {"micro_batch_size": 32}, "run": {"max_steps": 1},
           "eval": {"paths": [str(tmp_path / "table")], "max_batches": 3}}
    spec = config.parse(raw)
    torch.manual_seed(0)
    evaluator = Evaluator(spec, Topology(rank=0, local_rank=0, world_size=1, device="cpu"))
    result = evaluator.evaluate(_Engine(build()), _Alone())
    assert result["eval_rows"] == 96 and result["eval_loss"] > 0 and "eval_tokens" not in result


def test_keep_best_prunes_to_the_best_evaluated_checkpoint_and_the_newest_and_lists_their_losses(tmp_path, capsys):
    from helpers import write_checkpoint

    from shardrun import checkpoint_format as layout
    from shardrun import cli
    from shardrun.driver.local import LocalCheckpointStore

    run = tmp_path / "tiny"
    losses = {2: 3.0, 4: 2.5, 6: None, 8: 2.7, 10: 2.9}  # step 6 saved without an evaluation
    for step, loss in losses.items():
        folder = write_checkpoint(run / layout.LOCAL_FOLDER / layout.local_dir_name(step), step, world=1,
                                  ranks=(0,))
        manifest = json.loads((folder / layout.MANIFEST).read_text())
        (folder / layout.MANIFEST).write_text(json.dumps({**manifest, **({"eval_loss": loss} if loss else {})}))
    store = LocalCheckpointStore(str(run), Topology(rank=0, local_rank=0, world_size=1, device="cpu"), keep=1,
                                 keep_best=True)
    store._prune(10)
    assert sorted(p.name for p in (run / layout.LOCAL_FOLDER).iterdir()) == [layout.local_dir_name(4),
                                                                             layout.local_dir_name(10)]
    assert cli.main(["checkpoints", str(run)]) == 0
    listed = capsys.readouterr().out
    assert "eval loss 2.5000" in listed and "eval loss 2.9000" in listed, listed
