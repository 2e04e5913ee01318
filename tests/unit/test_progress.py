import math

from shardrun.driver.run_log import RunLog, format_duration


def _rec(step, loss, tokens_per_step=100):
    return {"step": step, "samples": step * 2, "tokens": step * tokens_per_step, "loss": loss,
            "lr": 1e-3, "tokens_per_s": 1000.0, "step_time": 0.5}


def test_lines_show_step_loss_throughput_eta():
    p = RunLog(max_steps=100, byte_level=True)
    p.on_start({"step": 0, "samples": 0, "tokens": 0, "world_size": 2})
    line = p.on_record(_rec(10, math.log(256)))
    assert "step     10/100" in line and "loss 5.5452" in line and "bpb 8.000" in line
    assert "1,000 tok/s" in line and "ETA 0m45s" in line


def test_summary_counts_this_invocation_and_restarts():
    p = RunLog(max_steps=40, byte_level=False)
    assert "resuming from step 20" in p.on_start({"step": 20, "samples": 40, "tokens": 2000,
                                                  "world_size": 2})
    p.on_record(_rec(25, 3.0))
    assert "(restart 1)" in p.on_start({"step": 20, "samples": 40, "tokens": 2000, "world_size": 2})
    p.on_record(_rec(40, 2.0))
    s = p.summary(checkpoint="ckpt", finished=True, wall_seconds=12.345)
    assert s == {"start_step": 20, "final_step": 40, "steps": 20, "samples": 40, "tokens": 2000,
                 "first_loss": 3.0, "last_loss": 2.0, "wall_seconds": 12.35, "checkpoint": "ckpt",
                 "restarts": 1, "finished": True}


def test_durations():
    assert format_duration(59) == "0m59s"
    assert format_duration(3725) == "1h02m"


def test_a_group_on_another_world_size_says_how_it_resumed():
    p = RunLog(max_steps=100, byte_level=False)
    p.on_start({"step": 0, "samples": 0, "tokens": 0, "world_size": 2})
    line = p.on_start({"step": 20, "samples": 160, "tokens": 0, "world_size": 1, "resized_from": 2,
                       "universal": True, "grad_accum_steps": 2, "global_batch": 8})
    assert line == ("resuming from step 20 with 1 worker (restart 1); the checkpoint was written by 2 workers, "
                    "converted to DeepSpeed's universal format; now 2 micro-batches per step, a global batch of 8")


def test_a_resumed_runs_summary_keeps_where_the_run_began_and_both_launchers_say_it_the_same_way():
    from shardrun.driver.run_log import carry_over, summary_line

    first = carry_over({"start_step": 0, "final_step": 100, "first_loss": 5.5, "last_loss": 3.0}, None)
    assert (first["run_start_step"], first["run_first_loss"], first["invocations"]) == (0, 5.5, 1)
    second = carry_over({"start_step": 100, "final_step": 150, "first_loss": 3.1, "last_loss": 2.5}, first)
    third = carry_over({"start_step": 150, "final_step": 200, "first_loss": 2.6, "last_loss": 2.2}, second)
    assert (third["run_start_step"], third["run_first_loss"], third["invocations"]) == (0, 5.5, 3)
    assert carry_over({"start_step": 0, "first_loss": 5.4}, third)["invocations"] == 1  # started over
    line = summary_line({**third, "finished": True, "wall_seconds": 75, "checkpoint": "/r/x/checkpoint_00000200",
                         "restarts": 1}, "/r/x")
    assert line == ("finished: steps 150-200 in 1m15s, loss 2.6000 -> 2.2000, 1 restart, checkpoint "
                    "/r/x/checkpoint_00000200; summary.json in /r/x")
