"""Decision lines are written in batches, yet stderr keeps the order the lines were made in."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, time
    from consumers.observe import DecisionLog, setup_logging
    setup_logging("text")
    log = DecisionLog("exitpipe.classifier")
    for i in range(3):
        log.emit("decision", {"n": i})
    logging.getLogger("exitpipe.classifier").warning("a warning after three decisions")
    log.emit("decision", {"n": 3})
    if MODE == "wait":
        time.sleep(0.5)  # the flusher writes it while the daemon goes on
        print("waited", flush=True)
        time.sleep(5)
    """
)


def _run(mode: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", f"MODE = {mode!r}\n" + SCRIPT],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_warning_comes_after_the_decisions_made_before_it_and_nothing_is_lost_at_exit() -> None:
    out = _run("exit")
    lines = out.stderr.splitlines()
    assert [line[line.index("exitpipe.") :] for line in lines] == [
        "exitpipe.classifier decision n=0",
        "exitpipe.classifier decision n=1",
        "exitpipe.classifier decision n=2",
        "exitpipe.classifier a warning after three decisions",
        "exitpipe.classifier decision n=3",
    ]


def test_a_decision_line_is_written_within_its_interval_while_the_daemon_runs() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", "MODE = 'wait'\n" + SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == "waited\n"
        proc.kill()  # no exit handler runs: what is on stderr was written by the flusher
        proc.wait(10)
        assert proc.stderr.read().splitlines()[-1].endswith("decision n=3")
    finally:
        proc.kill()
        proc.wait(10)


def test_a_log_record_made_while_lines_are_being_written_does_not_hang_the_daemon() -> None:
    # A signal handler that logs (the daemons' SIGTERM handler does) can run in the middle of
    # writing decision lines, on the same thread: it must not wait for itself.
    script = textwrap.dedent(
        """
        import logging
        import consumers.observe as observe
        observe.setup_logging("text")
        write = observe._write
        def write_then_log(data):
            observe._write = write
            logging.getLogger("exitpipe").warning("signal SIGTERM: stopping")
            write(data)
        observe._write = write_then_log
        log = observe.DecisionLog("exitpipe.classifier")
        log.emit("decision", {"n": 1})
        observe.PENDING.flush()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=20, check=False
    )
    assert out.returncode == 0, out.stderr
    assert "signal SIGTERM: stopping" in out.stderr and "decision n=1" in out.stderr
