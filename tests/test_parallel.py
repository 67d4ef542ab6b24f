"""Tests for stn_numpy._parallel: worker count precedence, the map, the allocator setting."""

import threading

import numpy as np
import pytest

from stn_numpy import _parallel


@pytest.fixture(autouse=True)
def default_threads(monkeypatch):
    monkeypatch.delenv(_parallel.ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    _parallel.set_num_threads(None)


def test_worker_count_precedence(monkeypatch):
    assert _parallel.get_num_threads() == _parallel.usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _parallel.get_num_threads() == 3
    monkeypatch.setenv(_parallel.ENV_VAR, "5")
    assert _parallel.get_num_threads() == 5
    _parallel.set_num_threads(1)
    assert _parallel.get_num_threads() == 1
    _parallel.set_num_threads(None)
    assert _parallel.get_num_threads() == 5


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_environment_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(_parallel.ENV_VAR, value)
    with pytest.raises(ValueError, match=_parallel.ENV_VAR):
        _parallel.get_num_threads()


@pytest.mark.parametrize("n", [0, -1, 1.0, True, "2"])
def test_set_num_threads_rejects_non_positive_ints(n):
    with pytest.raises(ValueError, match="positive int"):
        _parallel.set_num_threads(n)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_parallel_map_calls_every_item_once(threads):
    _parallel.set_num_threads(threads)
    out = np.zeros(50)
    seen = []
    lock = threading.Lock()

    def fn(i):
        out[i] += i
        with lock:
            seen.append(i)

    _parallel.parallel_map(fn, range(50))
    np.testing.assert_array_equal(out, np.arange(50))
    assert sorted(seen) == list(range(50))


def test_parallel_map_reraises_the_first_error():
    _parallel.set_num_threads(2)

    def fn(i):
        if i == 3:
            raise KeyError(i)

    with pytest.raises(KeyError):
        _parallel.parallel_map(fn, range(8))


def test_parallel_map_stops_work_after_an_error():
    # Calls not yet started are cancelled, and none still runs when the error arrives.
    _parallel.set_num_threads(2)
    started, running = [], []
    gate = threading.Event()

    def fn(i):
        started.append(i)
        running.append(i)
        if i == 0:
            gate.wait(5)
            raise KeyError(i)
        gate.set()
        threading.Event().wait(0.05)
        running.remove(i)

    with pytest.raises(KeyError):
        _parallel.parallel_map(fn, range(200))
    assert running == [0]  # only the failed call, which never got to remove itself
    assert len(started) < 200


def test_keep_freed_memory_leaves_user_allocator_settings_alone(monkeypatch):
    monkeypatch.setattr(_parallel, "_memory_kept", False)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1000000")
    assert _parallel.keep_freed_memory() is False
    assert _parallel.freed_memory_kept() is False


def test_keep_freed_memory_is_a_bool_and_idempotent():
    first = _parallel.keep_freed_memory()
    assert isinstance(first, bool)
    assert _parallel.keep_freed_memory() is first
    assert _parallel.freed_memory_kept() is first


@pytest.mark.parametrize("n, threads", [(0, 2), (1, 4), (7, 2), (7, 3), (10, 4)])
def test_bands_cover_every_index_once_in_nearly_equal_parts(n, threads):
    _parallel.set_num_threads(threads)
    parts = _parallel.bands(n, values=100, min_values=10)
    assert [i for start, stop in parts for i in range(start, stop)] == list(range(n))
    assert len(parts) == max(1, min(threads, n))
    lengths = [stop - start for start, stop in parts]
    assert max(lengths) - min(lengths) <= 1


def test_bands_keep_small_work_in_one_band():
    _parallel.set_num_threads(4)
    assert _parallel.bands(100, values=9, min_values=10) == [(0, 100)]


def test_parallel_map_runs_no_more_calls_at_once_than_asked_after_a_larger_setting():
    import threading
    import time

    from stn_numpy import _parallel

    running, most = [0], [0]
    lock = threading.Lock()

    def work(_):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    try:
        _parallel.set_num_threads(4)
        _parallel.parallel_map(work, range(8))
        _parallel.set_num_threads(2)
        most[0] = 0
        _parallel.parallel_map(work, range(8))
        assert most[0] <= 2
    finally:
        _parallel.set_num_threads(None)
