"""Thread count from the available cores and the load; passive OpenMP waiting set before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from fluxmusic import threads as th
from fluxmusic.errors import FluxMusicError


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_default_threads_from_cores_and_load(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert th.default_threads(cores=2, load=0.0) == 2
    assert th.default_threads(cores=2, load=0.4) == 2
    assert th.default_threads(cores=2, load=0.6) == 1  # another process keeps most of a core busy
    assert th.default_threads(cores=2, load=9.0) == 1  # oversubscribed: never fewer than one
    assert th.default_threads(cores=16, load=5.2) == 11


def test_omp_num_threads_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert th.default_threads(cores=2, load=9.0) == 3


def test_available_cores_uses_affinity(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 5, 7}, raising=False)
    assert th.available_cores() == 3


@pytest.mark.parametrize("value, expected", [(None, None), ("auto", None), (1, 1), ("4", 4), (" 2 ", 2)])
def test_parse_threads(value, expected):
    assert th.parse_threads(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0", "two", "1.5", True, 2.0])
def test_parse_threads_rejects(value):
    with pytest.raises(FluxMusicError, match=r"threads .* must be an integer >= 1 or 'auto'"):
        th.parse_threads(value)


def test_configure_threads_sets_torch(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert th.configure_threads(None) == 1 and torch.get_num_threads() == 1
    assert th.configure_threads("2") == 2 and torch.get_num_threads() == 2


@pytest.mark.parametrize("load, expected", [(0.2, th.SHORT_SPIN_ENV), (1.3, th.PASSIVE_WAIT_ENV)])
def test_wait_policy_spins_briefly_on_a_free_machine_and_sleeps_under_load(monkeypatch, load, expected):
    for key in th.WAIT_ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert th.choose_wait_policy(cores=2, load=load) == expected
    assert all(os.environ[k] == v for k, v in expected.items())
    other = th.PASSIVE_WAIT_ENV if expected is th.SHORT_SPIN_ENV else th.SHORT_SPIN_ENV
    assert all(k in expected or k not in os.environ for k in other)


def test_wait_policy_keeps_user_choice(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert th.choose_wait_policy(cores=2, load=0.0) == {}
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE" and "KMP_BLOCKTIME" not in os.environ


def test_cli_sets_the_wait_policy_before_torch_loads():
    env = {k: v for k, v in os.environ.items() if k not in th.WAIT_ENV_KEYS and k != "OMP_NUM_THREADS"}
    code = ("import sys, os, fluxmusic.cli; print('torch' in sys.modules, "
            "os.environ.get('OMP_WAIT_POLICY') or os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    torch_loaded, policy = out.stdout.split()
    assert torch_loaded == "False" and policy in ("PASSIVE", th.SHORT_SPIN_ENV["GOMP_SPINCOUNT"])


def test_cli_bad_threads_exits_2(capsys):
    from fluxmusic.cli import main

    assert main(["serve", "--threads", "0"]) == 2
    assert "threads '0' must be an integer >= 1 or 'auto'" in capsys.readouterr().err
