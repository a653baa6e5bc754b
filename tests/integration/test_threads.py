"""OMP_NUM_THREADS is honoured by our trainers on a CPU (nnUNetv2_train itself sets all cores), with clear errors."""
import multiprocessing

import pytest
import torch

from nnunet_dp.nnunet.threads import ENV, apply_cpu_threads, requested_threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("raw,expected", [(None, None), ("", None), ("  ", None), ("3", 3), (" 2 ", 2), ("4,2", 4)])
def test_requested_threads_parses_openmp_values(raw, expected):
    assert requested_threads({} if raw is None else {ENV: raw}) == expected


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5", ",2"])
def test_bad_values_name_the_variable_and_what_is_allowed(raw):
    with pytest.raises(ValueError, match=rf"OMP_NUM_THREADS = '{raw}' is not allowed: a positive integer"):
        requested_threads({ENV: raw})


def test_cpu_training_takes_the_requested_threads(restore_threads):
    torch.set_num_threads(2)  # what nnUNetv2_train -device cpu does on this 2-core machine: all cores
    line = apply_cpu_threads(torch.device("cpu"), {ENV: "1"})
    assert torch.get_num_threads() == 1
    assert line.startswith("CPU threads: 1 (OMP_NUM_THREADS=1;")
    # and back up: the variable decides in both directions
    assert apply_cpu_threads(torch.device("cpu"), {ENV: "2"}).startswith("CPU threads: 2")
    assert torch.get_num_threads() == 2


def test_unset_keeps_nnunets_choice_and_says_so(restore_threads):
    torch.set_num_threads(multiprocessing.cpu_count())
    line = apply_cpu_threads(torch.device("cpu"), {})
    assert torch.get_num_threads() == multiprocessing.cpu_count()
    assert f"CPU threads: {multiprocessing.cpu_count()} (nnU-Net's default" in line and ENV in line


def test_gpu_runs_are_left_alone(restore_threads):
    torch.set_num_threads(1)  # nnUNetv2_train -device cuda
    assert apply_cpu_threads(torch.device("cuda"), {ENV: "2"}) is None
    assert torch.get_num_threads() == 1
