"""The write-ahead step journal and fresh noise on every start/resume (docs/invariants.md, invariants 5, 6 and 8)."""
import os

import pytest
import torch
from nets import batch, nnunet_loss, tiny_unet

from nnunet_dp.accounting import epsilon_of
from nnunet_dp.config import DPConfig
from nnunet_dp.errors import DPLedgerError
from nnunet_dp.journal import JOURNAL_FILE, StepJournal, read_history
from nnunet_dp.run import DPRun, make_plan


def make_run(seed=None, target=None, steps=10, sigma=1.2):
    cfg = DPConfig(noise_multiplier=sigma, target_epsilon=target, expected_batch_size=4, num_epochs=1,
                   num_iterations_per_epoch=steps, seed=seed)
    plan = make_plan(cfg, rule="flat", num_training_cases=40, plans_batch_size=2)
    return DPRun(plan, device=torch.device("cpu"), seed=seed)


def test_journal_counts_every_step_across_sessions_and_cut_lines(tmp_path):
    j = StepJournal(str(tmp_path))
    j.start_session(noise_multiplier=1.0, sampling_rate=0.1)
    for _ in range(3):
        j.record_step()
    j.close()
    with open(tmp_path / JOURNAL_FILE, "ab") as f:  # a crash in the middle of a step line, then of a session line
        f.write(b"s")
    j = StepJournal(str(tmp_path))  # a resume: the cut line stays a line of its own
    j.start_session(noise_multiplier=2.0, sampling_rate=0.2)
    j.record_step()
    j.close()
    with open(tmp_path / JOURNAL_FILE, "ab") as f:
        f.write(b'{"session": "2026-01-01", "noise_mul')
    assert read_history(str(tmp_path / JOURNAL_FILE)) == [(1.0, 0.1, 4), (2.0, 0.2, 1)]
    j = StepJournal(str(tmp_path))
    j.import_history([(3.0, 0.3, 5)])
    j.close()
    assert read_history(str(tmp_path / JOURNAL_FILE)) == [(1.0, 0.1, 4), (2.0, 0.2, 1), (3.0, 0.3, 5)]


def test_a_step_before_any_session_is_an_error(tmp_path):
    (tmp_path / JOURNAL_FILE).write_text("s\n")
    with pytest.raises(DPLedgerError, match="before any session"):
        read_history(str(tmp_path / JOURNAL_FILE))


def test_steps_are_journaled_before_the_noise_and_epsilon_covers_them(tmp_path, monkeypatch):
    model = tiny_unet(2).double()
    x, t = batch(2, 2)
    run = make_run()
    run.attach_journal(StepJournal(str(tmp_path)), [])
    order = []
    import nnunet_dp.run as run_module
    real = run_module.privatize_
    monkeypatch.setattr(run_module, "privatize_", lambda *a, **k: (order.append(
        len(read_history(str(tmp_path / JOURNAL_FILE))) and read_history(str(tmp_path / JOURNAL_FILE))[0][2]),
        real(*a, **k))[1])
    for _ in range(3):
        run.private_step(model, nnunet_loss(), x, t)
    assert order == [1, 2, 3]  # when the noise of step k is drawn, k steps are on disk
    # a crashed run's steps (2 more in the journal than in the checkpoint) are counted after the resume
    resumed = make_run()
    history = read_history(str(tmp_path / JOURNAL_FILE))
    resumed.attach_journal(StepJournal(str(tmp_path)), history)
    assert resumed.steps == 3
    assert resumed.epsilon() == pytest.approx(epsilon_of([(1.2, 0.1, 3)], delta=1e-5), rel=1e-12)


def test_budget_counts_journaled_steps_with_other_settings():
    """A folder whose journal holds steps with another sigma: the limit is what still fits the target."""
    cfg = DPConfig(target_epsilon=4.0, expected_batch_size=4, num_epochs=1, num_iterations_per_epoch=50)
    plan = make_plan(cfg, rule="flat", num_training_cases=40, plans_batch_size=2)
    run = DPRun(plan, device=torch.device("cpu"), seed=None)
    prior = [(plan.noise_multiplier * 1.5, 0.1, 20)]
    run.attach_journal(None, prior)
    fits = run._step_limit - 20
    assert epsilon_of([*prior, (plan.noise_multiplier, 0.1, fits)], delta=1e-5) <= 4.0
    assert epsilon_of([*prior, (plan.noise_multiplier, 0.1, fits + 1)], delta=1e-5) > 4.0
    assert 0 < fits < plan.max_steps


def peek(run, n=6):
    g = torch.Generator()
    g.set_state(run.generator.get_state())
    return torch.randn(n, generator=g)


def test_fresh_os_entropy_at_every_start_and_nothing_restored():
    a, b = make_run(), make_run()
    assert not torch.equal(peek(a), peek(b))
    state = a.state_dict()
    assert "noise_rng_state" not in state and "seed" not in str(state)
    b.load_state_dict({**state, "noise_rng_state": a.generator.get_state()})  # an older checkpoint's state: ignored
    assert not torch.equal(peek(a), peek(b))


def test_seeded_mode_is_reproducible_but_never_replays_after_a_resume():
    a, b = make_run(seed=5), make_run(seed=5)
    a.attach_journal(None, [])
    b.attach_journal(None, [])
    assert torch.equal(peek(a), peek(b))
    resumed = make_run(seed=5)
    resumed.attach_journal(None, [(1.2, 0.1, 3)])
    assert not torch.equal(peek(resumed), peek(a))


def test_journal_is_synced(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    j = StepJournal(str(tmp_path))
    n = len(synced)
    j.start_session(noise_multiplier=1.0, sampling_rate=0.1)
    j.record_step()
    assert len(synced) == n + 2


def test_a_change_of_randomness_mode_is_refused(tmp_path):
    """A seeded folder cannot be resumed without its seed (it would turn "private"), a private one not with a seed;
    sessions written before the journal recorded the mode (None) do not decide."""
    from nnunet_dp.errors import DPConfigError
    from nnunet_dp.journal import ever_seeded, session_modes
    from nnunet_dp.nnunet.resume import check_randomness_mode

    journal = StepJournal(str(tmp_path))
    journal.import_history([(1.0, 0.1, 3)])
    journal.start_session(noise_multiplier=1.0, sampling_rate=0.1, private_randomness=False)
    journal.record_step()
    journal.close()
    path = str(tmp_path / JOURNAL_FILE)
    assert session_modes(path) == [None, False] and ever_seeded(path)
    check_randomness_mode(str(tmp_path), False)
    with pytest.raises(DPConfigError, match="new output folder"):
        check_randomness_mode(str(tmp_path), True)
    private = tmp_path / "private"
    private.mkdir()
    journal = StepJournal(str(private))
    journal.start_session(noise_multiplier=1.0, sampling_rate=0.1, private_randomness=True)
    journal.close()
    assert not ever_seeded(str(private / JOURNAL_FILE))
    check_randomness_mode(str(private), True)
    with pytest.raises(DPConfigError, match="Remove 'seed'"):
        check_randomness_mode(str(private), False)
