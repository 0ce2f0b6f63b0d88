"""The lease: one writer per run directory or store (acquire, refuse, wait, heartbeat, stale takeover, release)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from segcore.errors import SegflowError
from segcore.lease import Lease, LeaseBusy, is_lease_name, run_dir_lease, store_lease


def _lease(location: str, **kwargs) -> Lease:
    kwargs.setdefault("what", "run directory r")
    return Lease(location, **kwargs)


def _write_holder(location: str, **fields) -> None:
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": None, "command": "segflow segment",
              "run": "r0", "token": "other", "started": now, "heartbeat": now, **fields}
    with open(location, "w") as fh:
        json.dump(holder, fh)


def test_locations_and_names(tmp_path):
    assert run_dir_lease("s3://b/runs/r1") == "s3://b/runs/r1/.segflow-lease.json"
    assert store_lease(str(tmp_path / "c.zarr")) == str(tmp_path / ".segflow-lease.c.zarr.json")
    assert is_lease_name(".segflow-lease.json") and is_lease_name("x/..segflow-lease.json.ab12.tmp")
    assert not is_lease_name("masks.zarr") and not is_lease_name("run.json")


def test_acquire_records_the_holder_and_release_removes_it(tmp_path):
    loc = run_dir_lease(tmp_path / "run")
    with _lease(loc, run="flow-1") as lease:
        held = json.loads(open(loc).read())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["run"] == "flow-1"
        assert held["token"] == lease.holder.token and held["started"] <= held["heartbeat"] <= time.time()
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".segflow-lease.json"]  # no temporary left
    assert not os.path.exists(loc)


def test_a_second_writer_is_refused_at_once_naming_the_holder(tmp_path):
    loc = run_dir_lease(tmp_path / "run")
    with _lease(loc):
        t0 = time.monotonic()
        with pytest.raises(LeaseBusy) as err:
            _lease(loc, what=f"run directory {tmp_path / 'run'}").acquire()
        assert time.monotonic() - t0 < 1.0
    message = str(err.value)
    assert message.startswith(f"run directory {tmp_path / 'run'} is being written by pid {os.getpid()} on host "
                              f"{socket.gethostname()} since ")
    assert "(heartbeat 0 s ago)" in message and message.endswith("or use another --out")
    assert isinstance(err.value, SegflowError) and isinstance(err.value, OSError)


def test_a_waiting_writer_gets_the_lease_when_it_is_released(tmp_path):
    loc = run_dir_lease(tmp_path / "run")
    first = _lease(loc).acquire()
    timer = threading.Timer(0.6, first.release)
    timer.start()
    t0 = time.monotonic()
    with _lease(loc, wait_s=5) as second:
        waited = time.monotonic() - t0
        assert json.loads(open(loc).read())["token"] == second.holder.token
    timer.join()
    assert 0.5 < waited < 3


def test_waiting_ends_with_a_refusal(tmp_path):
    loc = run_dir_lease(tmp_path / "run")
    with _lease(loc):
        t0 = time.monotonic()
        with pytest.raises(LeaseBusy, match=r"\(waited 0.5 s\)"):
            _lease(loc, wait_s=0.5).acquire()
        assert 0.5 <= time.monotonic() - t0 < 2


def test_the_heartbeat_renews_the_lease(tmp_path):
    loc = run_dir_lease(tmp_path / "run")
    with _lease(loc, heartbeat_s=0.1, stale_after_s=1):
        first = json.loads(open(loc).read())["heartbeat"]
        time.sleep(0.45)
        later = json.loads(open(loc).read())
    assert later["heartbeat"] - first >= 0.25 and later["started"] == first


def test_a_lease_without_heartbeat_is_taken_over_with_a_warning(tmp_path, caplog):
    loc = run_dir_lease(tmp_path / "run")
    os.makedirs(tmp_path / "run")
    _write_holder(loc, host="elsewhere", pid=4242, heartbeat=time.time() - 100)
    with caplog.at_level(logging.WARNING, logger="segcore.lease"), _lease(loc, stale_after_s=60) as lease:
        assert lease.took_over.pid == 4242 and lease.took_over.host == "elsewhere"
        assert json.loads(open(loc).read())["token"] == lease.holder.token
    assert "taking over the lease of pid 4242 on host elsewhere" in caplog.text
    assert "no heartbeat for 100 s" in caplog.text


def test_a_fresh_lease_of_another_host_is_not_stale(tmp_path):
    loc = run_dir_lease(tmp_path / "run")
    os.makedirs(tmp_path / "run")
    _write_holder(loc, host="elsewhere", pid=999_999, heartbeat=time.time() - 5)
    with pytest.raises(LeaseBusy, match="pid 999999 on host elsewhere .*heartbeat 5 s ago"):
        _lease(loc, stale_after_s=60).acquire()


def test_a_lease_whose_process_died_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(child.stdout)
    loc = run_dir_lease(tmp_path / "run")
    os.makedirs(tmp_path / "run")
    _write_holder(loc, pid=dead)  # fresh heartbeat, but the process is gone
    with caplog.at_level(logging.WARNING, logger="segcore.lease"), _lease(loc) as lease:
        assert lease.took_over.pid == dead
    assert f"its process {dead} on this host is gone" in caplog.text


def test_a_reused_pid_does_not_pass_for_the_holder(tmp_path):
    loc = run_dir_lease(tmp_path / "run")
    os.makedirs(tmp_path / "run")
    _write_holder(loc, pid=os.getpid(), pid_start=1)  # this pid, but a process started at another time
    with _lease(loc) as lease:
        assert lease.took_over is not None and lease.took_over.pid_start == 1


def test_an_unreadable_lease_is_taken_over(tmp_path):
    loc = run_dir_lease(tmp_path / "run")
    os.makedirs(tmp_path / "run")
    open(loc, "w").write("{not json")
    with _lease(loc) as lease:
        assert lease.took_over is not None


def test_a_holder_whose_lease_was_taken_notices(tmp_path, caplog):
    loc = run_dir_lease(tmp_path / "run")
    with caplog.at_level(logging.ERROR, logger="segcore.lease"), _lease(loc, heartbeat_s=0.1, stale_after_s=1) as a:
        _write_holder(loc, token="intruder", host="elsewhere", pid=7)
        time.sleep(0.35)
        assert a.lost
    assert os.path.exists(loc)  # the intruder's lease is not removed by the old holder
    assert "the lease was taken by pid 7 on host elsewhere" in caplog.text


def test_on_an_object_store_without_atomic_create(tmp_path):
    loc = run_dir_lease(f"memory://lease-{os.getpid()}-{time.time_ns()}/run")
    with _lease(loc, heartbeat_s=0.1, stale_after_s=1) as first:
        with pytest.raises(LeaseBusy, match=f"pid {os.getpid()}"):
            _lease(loc).acquire()
        time.sleep(0.3)
        assert not first.lost
    with _lease(loc) as again:  # released: free again
        assert again.took_over is None


def test_heartbeat_must_be_shorter_than_staleness(tmp_path):
    with pytest.raises(ValueError, match="below stale_after_s"):
        Lease(str(tmp_path / "l.json"), what="x", heartbeat_s=60, stale_after_s=60)


def test_a_lease_where_no_folder_can_be_made_is_one_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("x")
    lease = Lease(run_dir_lease(tmp_path / "a-file"), what="run directory a-file", option="--out")
    with pytest.raises(SegflowError, match=r"cannot write the run directory a-file: .*a-file is a file, not a folder; "
                                           r"give another --out"):
        with lease:
            pass
    assert (tmp_path / "a-file").read_text() == "x"
