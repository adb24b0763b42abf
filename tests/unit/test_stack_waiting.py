"""`huiying up` waiting for the four services (huiying/stack.py): a service killed while `up` waits
for the others is started again, and only a process `up` itself started that exits is a failed
start. Real processes (`sleep`) stand in for the services; /health is faked."""

import subprocess

import pytest

from huiying import stack


@pytest.fixture
def fake_services(tmp_path, monkeypatch):
    monkeypatch.setenv("HUIYING_VAR_DIR", str(tmp_path))
    processes = []

    def start(service):
        process = subprocess.Popen(["sleep", "60"])
        processes.append(process)
        stack.pid_file(service).parent.mkdir(parents=True, exist_ok=True)
        stack.pid_file(service).write_text(str(process.pid))
        return process.pid

    monkeypatch.setattr(stack, "start", start)
    yield start, processes
    for process in processes:
        process.kill()
        process.wait()


def test_a_service_killed_while_up_waits_for_the_others_is_started_again(fake_services, monkeypatch):
    start, processes = fake_services
    for service in ("routing", "notify"):
        start(service)
    notify = processes[1]
    polls = []

    def health(service, timeout=3, readiness=False):
        polls.append(service)
        if len(polls) == 1:  # notify dies while routing is still coming up
            notify.kill()
            notify.wait()
            return {"healthy": False}
        return {"healthy": True}

    monkeypatch.setattr(stack, "health", health)
    restarted = []
    stack.wait_healthy(
        ["routing", "notify"], timeout=10, spawned={"routing"}, on_start=lambda s, pid: restarted.append(s)
    )
    assert restarted == ["notify"]
    assert stack.running_pid("notify") == processes[-1].pid != notify.pid


def test_a_process_up_started_that_exits_is_a_failed_start_naming_the_service(fake_services, monkeypatch):
    start, processes = fake_services
    start("supervision")
    processes[0].kill()
    processes[0].wait()
    monkeypatch.setattr(stack, "health", lambda *a, **k: {"healthy": False})
    with pytest.raises(stack.StackError, match="supervision exited during start"):
        stack.wait_healthy(["supervision"], timeout=10, spawned={"supervision"})
