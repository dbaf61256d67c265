"""The background job runner: order, interrupt, and surviving failures."""

import threading
import time

import pytest

from app.jobs import JobRunner


def test_jobs_run_one_at_a_time_in_order():
    runner = JobRunner()
    seen, active, overlap = [], [0], []

    def work(i):
        def fn(job):
            active[0] += 1
            overlap.append(active[0])
            time.sleep(0.02)
            seen.append(i)
            active[0] -= 1
            return i

        return fn

    jobs = [runner.submit("t", work(i)) for i in range(5)]
    assert [j.wait(10) for j in jobs] == list(range(5))
    assert seen == list(range(5))
    assert max(overlap) == 1


def test_interrupt_stops_running_job_and_queue_position():
    runner = JobRunner()
    started = threading.Event()

    def long(job):
        started.set()
        for _ in range(1000):
            job.check_interrupt()
            time.sleep(0.01)
        return "finished"

    first = runner.submit("long", long)
    second = runner.submit("quick", lambda job: "quick")
    started.wait(5)
    assert runner.queue_position(first) == 0
    assert runner.queue_position(second) == 1
    runner.interrupt()
    first.wait(5)
    assert first.status == "interrupted"
    assert second.wait(5) == "quick"


def test_failing_job_reports_error_and_runner_keeps_going():
    runner = JobRunner()
    bad = runner.submit("bad", lambda job: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        bad.wait(5)
    assert bad.status == "failed"
    assert runner.submit("ok", lambda job: 42).wait(5) == 42
