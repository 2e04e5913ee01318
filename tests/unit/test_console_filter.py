"""What the console keeps of other programs' lines (shardrun.driver.noise): Ray's forwarded worker lines and the
routine lines of Ray and DeepSpeed go, shardrun's own lines from the workers stay (without Ray's prefix), colour
codes go off a terminal, secrets are masked, --verbose keeps everything."""

import io
import sys

from shardrun.driver.noise import ConsoleFilter, hidden_line, library_output_to_stderr

SEEN_IN_A_RUN = [  # lines a 20-step `shardrun run` printed before the filter (shortened)
    "2026-12-06 06:18:29,778\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this "
    "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "\x1b[36m(TrainController pid=4307)\x1b[0m Attempting to start training worker group of size 2",
    "\x1b[36m(RayTrainWorker pid=4495)\x1b[0m Setting up process group for: env:// [rank=0, world_size=2]",
    "\x1b[36m(TrainController pid=4307)\x1b[0m [2026-12-06 06:18:50,403 E 4307 4341] core_worker.cc:2465: Actor "
    "with class name: 'PreemptionWatcher' ... max_restarts",
    "\x1b[36m(RayTrainWorker pid=4468)\x1b[0m DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
    "\x1b[36m(RayTrainWorker pid=4495)\x1b[0m Checkpoint successfully created at: Checkpoint(filesystem=local, "
    "path=/tmp/runs/gpt-stdlib/checkpoint_00000010)\x1b[32m [repeated 3x across cluster] (Ray deduplicates logs "
    "by default. Set RAY_DEDUP_LOGS=0 to disable log deduplication)\x1b[0m",
    "[2026-12-06 06:23:43,983] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
    "Processing zero checkpoint '/tmp/runs/gpt-stdlib/checkpoint_00000060/global_step60'",
]


def test_others_routine_lines_are_kept_out_and_ours_stay_without_rays_prefix():
    out = io.StringIO()
    console = ConsoleFilter(out)
    for line in SEEN_IN_A_RUN:
        console.write(line + "\n")
    console.write("[shardrun] step      5/20 | loss 5.2240\n")
    console.write("\x1b[36m(RayTrainWorker pid=4495)\x1b[0m [shardrun] Ray's record of this run's checkpoints names "
                  "no checkpoint; resuming from abfs://runs@acct/r?sig=SECRET\n")
    console.write("a user's own print, not from a worker\n")
    assert out.getvalue().splitlines() == [
        "[shardrun] step      5/20 | loss 5.2240",
        "[shardrun] Ray's record of this run's checkpoints names no checkpoint; resuming from "
        "abfs://runs@acct/r?sig=***",
        "a user's own print, not from a worker",
    ]
    assert console.hidden == len(SEEN_IN_A_RUN)
    assert "8 lines of Ray's, DeepSpeed's and the workers' own logging were kept off the console: --verbose" in \
        hidden_line((console,))
    assert hidden_line((ConsoleFilter(io.StringIO()),)) is None


def test_a_line_written_in_pieces_is_judged_whole_and_a_last_piece_on_flush():
    out = io.StringIO()
    console = ConsoleFilter(out)
    console.write("\x1b[36m(RayTrainWorker pid=1)\x1b[0m Reporting training ")
    console.write("result 1\n[shardrun] done")
    assert out.getvalue() == ""
    console.flush()
    assert out.getvalue() == "[shardrun] done"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_colour_stays_on_a_terminal_and_verbose_keeps_every_line():
    term = Terminal()
    ConsoleFilter(term).write("\x1b[33mwarning\x1b[0m: a user's line\n")
    assert term.getvalue() == "\x1b[33mwarning\x1b[0m: a user's line\n"
    out = io.StringIO()
    verbose = ConsoleFilter(out, verbose=True)
    for line in SEEN_IN_A_RUN:
        verbose.write(line + "\n")
    assert len(out.getvalue().splitlines()) == len(SEEN_IN_A_RUN) and "\x1b[" not in out.getvalue()
    assert verbose.hidden == 0


def test_library_output_goes_to_stderr_so_stdout_keeps_the_result(capsys):
    with library_output_to_stderr(verbose=False):
        print("Processing zero checkpoint '/x/global_step4'")
        print("[shardrun] exporting step 4")
        print("Loading checkpoint shards: 100%", file=sys.stderr)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "[shardrun] exporting step 4\n"


def test_the_bar_is_drawn_past_the_filter(monkeypatch):
    from shardrun.driver.console import Console

    monkeypatch.delenv("SHARDRUN_PROGRESS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    raw = Terminal()
    console = Console(lambda line: None, ConsoleFilter(raw), max_steps=10)
    assert console.stream is raw and console.bar


def test_a_signal_handler_that_prints_while_a_line_is_written_does_not_wait_for_itself():
    """Ctrl-C's handler prints its line in the main thread, perhaps in the middle of the filter's own write."""
    out = io.StringIO()
    console = ConsoleFilter(out)

    class Interrupting(io.StringIO):
        fired = False

        def write(self, text):  # the stream behind the filter, interrupted by a "signal" as it writes
            if not self.fired:
                self.fired = True
                console.write("[shardrun] stop requested (SIGINT)\n")
            return out.write(text)

    console.stream = Interrupting()
    console.write("[shardrun] step      3/200\n")
    assert out.getvalue().splitlines() == ["[shardrun] stop requested (SIGINT)", "[shardrun] step      3/200"]


def test_a_redrawn_progress_bar_is_judged_by_its_last_drawing():
    out = io.StringIO()
    console = ConsoleFilter(out)
    console.write("\rLoading checkpoint shards:   0%|     | 0/2\rLoading checkpoint shards: 100%|#####| 2/2\n\n")
    console.write("\rdownloading: 50%\rdownloading: 100%\n")
    assert out.getvalue() == "downloading: 100%\n" and console.hidden == 1
