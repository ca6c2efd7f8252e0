"""Pipelined refreshes: roots (bases) of step t's statistics, computed on the
host while training goes on, installed at exactly step t + d.

The NumPy references (test_shampoo_reference.py, test_soap.py) pin the maths
for several delays. Here: the host's roots equal the ones a step computes
from the same snapshot, bit for bit (the same eigh kernel on the same numbers
on this CPU); the install step; replicas; the waiting counter; a checkpoint
between snapshot and install; bad input.
"""

import keras
import numpy as np
import pytest

import tf_secondorder as tfso
from tests.helpers import (
    factor_views,
    mlp,
    regression_data,
    replica_values,
    tape_step,
    weights_of,
)

OPTIONS = dict(learning_rate=0.01, precondition_frequency=3, block_size=8)
MAKERS = {
    "shampoo": lambda **kw: tfso.Shampoo(epsilon=1e-4, **OPTIONS, **kw),
    # The host keeps bfloat16 roots as bfloat16: still the same numbers.
    "shampoo-low-memory": lambda **kw: tfso.Shampoo(
        epsilon=1e-4,
        packed_statistics=True,
        preconditioner_dtype="bfloat16",
        **OPTIONS,
        **kw,
    ),
    "soap": lambda **kw: tfso.SOAP(start_preconditioning_step=3, **OPTIONS, **kw),
}
KIND = {
    "shampoo": "preconditioner",
    "shampoo-low-memory": "preconditioner",
    "soap": "basis",
}


def _loop(make, drive, steps=16, next_steps=1, **options):
    """A custom training loop; `drive`: call `advance_root_pipeline`
    (`next_steps`) before each step (the host computes), else the install
    steps compute. Returns the model, the optimizer and the step."""
    x, y = regression_data()
    model = mlp()
    optimizer = make(**options)
    step = tape_step(model, optimizer, keras.losses.MeanSquaredError())
    for i in range(steps):
        if drive:
            optimizer.advance_root_pipeline(next_steps)
        b = (16 * i) % len(x)
        step(x[b : b + 16], y[b : b + 16])
    return model, optimizer, step


@pytest.mark.parametrize("name", ["shampoo", "shampoo-low-memory", "soap"])
def test_host_roots_equal_the_roots_a_step_computes(name):
    hosted, host_opt, _ = _loop(MAKERS[name], True, refresh_delay=2)
    computed, step_opt, _ = _loop(MAKERS[name], False, refresh_delay=2)
    for a, b in zip(weights_of(hosted), weights_of(computed)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        factor_views(host_opt, KIND[name]), factor_views(step_opt, KIND[name])
    ):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Refreshes at steps 3, 6, 9, 12, 15; installs at 5, 8, 11, 14. Without a
    # driver every install computed its own roots; with one, the host did
    # (and the step waited whenever the host was not done: timing).
    assert int(host_opt.refreshes.numpy()) == int(step_opt.refreshes.numpy()) == 5
    assert int(step_opt.refresh_waits.numpy()) == 4


@pytest.mark.parametrize("delay", [1, 3])
def test_roots_change_exactly_at_the_install_steps(delay):
    x, y = regression_data()
    model = mlp()
    # Statistics every step: every snapshot differs from the last.
    optimizer = MAKERS["shampoo"](refresh_delay=delay, statistics_frequency=1)
    step = tape_step(model, optimizer, keras.losses.MeanSquaredError())
    changed = []
    before = None
    for t in range(1, 14):
        optimizer.advance_root_pipeline()
        b = (16 * t) % len(x)
        step(x[b : b + 16], y[b : b + 16])
        now = [v.numpy() for v in optimizer._preconditioners]
        if before is not None and any(
            not np.array_equal(a, b) for a, b in zip(before, now)
        ):
            changed.append(t)
        before = now
    # Snapshots at 3, 6, 9, 12 (every 3 steps from step 3).
    assert changed == [s + delay for s in (3, 6, 9, 12) if s + delay <= 13]
    assert optimizer.first_preconditioned_step == 3 + delay


def test_mirrored_fit_keeps_replicas_identical_and_logs_waits(mirrored):
    x, y = regression_data()
    with mirrored.scope():
        model = mlp()
        optimizer = MAKERS["shampoo"](refresh_delay=2)
        model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert "refresh_waits" in history.history
    assert int(optimizer.refreshes.numpy()) == 5  # steps 3, 6, ..., 15
    assert int(optimizer.root_failures.numpy()) == 0
    for variable in list(model.weights) + list(optimizer.variables):
        values = replica_values(variable)
        for other in values[1:]:
            np.testing.assert_array_equal(values[0], other, err_msg=variable.path)
    roots = factor_views(optimizer, "preconditioner")
    assert not any(np.allclose(r.numpy(), np.eye(r.size)) for r in roots)


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_checkpoint_between_snapshot_and_install_resumes_exactly(name, tmp_path):
    """Steps 1..7 then a save: the snapshot of step 6 is taken, its roots
    are due at step 8. The loaded optimizer recomputes them from the saved
    snapshot; the run equals the uninterrupted one bit for bit."""
    x, y = regression_data()

    def compiled():
        model = mlp()
        model.compile(optimizer=MAKERS[name](refresh_delay=2), loss="mse")
        return model

    uninterrupted = compiled()
    uninterrupted.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    first = compiled()
    first.fit(x[:112], y[:112], batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert int(first.optimizer.iterations.numpy()) == 7
    assert int(first.optimizer._root_refresh.snapshot_step.numpy()) == 6
    path = str(tmp_path / "mid.keras")
    first.save(path)
    resumed = keras.models.load_model(path)
    resumed.fit(x[112:], y[112:], batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(weights_of(resumed), weights_of(uninterrupted)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(resumed.optimizer.variables, uninterrupted.optimizer.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def _drive_until_install(next_steps):
    """Steps 1..4 (snapshot at 3, install due at 5), each after a driver
    call with `next_steps`, then the driver call before step 5."""
    _, optimizer, step = _loop(
        MAKERS["shampoo"], True, steps=4, next_steps=next_steps, refresh_delay=2
    )
    before = [v.numpy() for v in optimizer._preconditioners]
    optimizer.advance_root_pipeline(next_steps)
    return optimizer, step, before


def test_in_one_process_the_driver_installs_before_the_install_step():
    """One step per call: the driver assigns the roots right before step
    t + d (so the step's graph holds no install branch) and clears the
    pending refresh; the step then uses them."""
    optimizer, step, before = _drive_until_install(next_steps=1)
    assert optimizer._root_refresh.host.installs
    assert int(optimizer._root_refresh.snapshot_step.numpy()) == 0
    after = [v.numpy() for v in optimizer._preconditioners]
    assert all(not np.array_equal(a, b) for a, b in zip(before, after))
    assert int(optimizer.iterations.numpy()) == 4
    # Changing the call's span afterwards would skip an install: refused.
    with pytest.raises(ValueError, match="`next_steps` must stay 1"):
        optimizer.advance_root_pipeline(2)


def test_with_several_steps_per_call_the_step_installs():
    """Step t + d may run inside a call: the driver only hands the roots
    over, and the step installs them, as across workers."""
    optimizer, step, before = _drive_until_install(next_steps=2)
    assert not optimizer._root_refresh.host.installs
    assert int(optimizer._root_refresh.snapshot_step.numpy()) == 3
    np.testing.assert_array_equal(before[0], optimizer._preconditioners[0].numpy())
    x, y = regression_data()
    step(x[64:80], y[64:80])  # step 5 installs
    assert int(optimizer._root_refresh.snapshot_step.numpy()) == 0
    assert not np.array_equal(before[0], optimizer._preconditioners[0].numpy())
    assert int(optimizer.refresh_waits.numpy()) <= 1


def test_the_host_install_equals_the_install_in_the_step():
    """The same roots installed by the driver and by the step: the same run
    bit for bit (the same arithmetic on the same numbers)."""
    runs = []
    for next_steps in (1, 2):
        # The span is what the step is traced for; every call drives.
        model, optimizer, _ = _loop(
            MAKERS["soap"], True, steps=12, next_steps=next_steps, refresh_delay=2
        )
        runs.append((weights_of(model), optimizer))
    (w1, o1), (w2, o2) = runs
    assert o1._root_refresh.host.installs and not o2._root_refresh.host.installs
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(o1.variables, o2.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(refresh_delay=0), "refresh_delay"),
        (dict(refresh_delay=4), "refresh_delay"),
        (dict(refresh_delay=2.0), "refresh_delay"),
        (dict(root_refresh="host"), "root_refresh"),
        (dict(root_refresh="pipelined", average_every=4), "root_refresh"),
    ],
)
def test_bad_input_is_named(options, name):
    for make in (MAKERS["shampoo"], MAKERS["soap"]):
        with pytest.raises(ValueError, match=f"`{name}` must be"):
            make(**options)


def test_in_step_and_local_sgd_have_no_delay_and_config_round_trips():
    assert MAKERS["shampoo"](root_refresh="in_step").refresh_delay_steps == 0
    assert MAKERS["shampoo"](average_every=4).refresh_delay_steps == 0
    assert MAKERS["shampoo"]().refresh_delay_steps == 3  # min(10, frequency)
    assert tfso.Shampoo().refresh_delay_steps == 10
    optimizer = MAKERS["soap"](refresh_delay=2)
    clone = tfso.SOAP.from_config(optimizer.get_config())
    assert (clone.root_refresh, clone.refresh_delay) == ("auto", 2)


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_a_driver_that_stops_waiting_leaves_the_roots_as_they_are(name):
    """Once `advance_root_pipeline` has run, a step traced afterwards relies
    on it (no root computation in its graph): when later calls are skipped,
    the install steps keep the current roots and count the miss."""
    x, y = regression_data()
    model = mlp()
    optimizer = MAKERS[name](refresh_delay=2)
    step = tape_step(model, optimizer, keras.losses.MeanSquaredError())
    optimizer.build(model.trainable_variables)
    optimizer.advance_root_pipeline()  # before the first trace, then never
    for i in range(10):
        step(x[16 * i % 128 : 16 * i % 128 + 16], y[16 * i % 128 : 16 * i % 128 + 16])
    # Snapshots at 3, 6, 9; installs due at 5 and 8, both without roots.
    assert int(optimizer.refresh_waits.numpy()) == 2
    for view in factor_views(optimizer, KIND[name]):
        np.testing.assert_array_equal(view.numpy(), np.eye(view.size))
    assert all(np.isfinite(w).all() for w in weights_of(model))


def _counted_loop(next_steps, resync_every_call, nan_steps=()):
    """40 steps, refreshes every 10 from step 10, delay 2, the driver called
    before every `next_steps` steps; a step in `nan_steps` (counted from 1
    over all steps run) gets a NaN batch and is skipped whole, so that
    `iterations` falls behind the driver's count."""
    x, y = regression_data()
    model = mlp()
    optimizer = tfso.Shampoo(
        learning_rate=0.01, precondition_frequency=10, block_size=8, refresh_delay=2
    )
    step = tape_step(model, optimizer, keras.losses.MeanSquaredError())
    for i in range(40):
        if i % next_steps == 0:
            optimizer.advance_root_pipeline(next_steps, resync=resync_every_call)
        b = (16 * i) % len(x)
        xb = x[b : b + 16] * (np.nan if i + 1 in nan_steps else 1.0)
        step(xb, y[b : b + 16])
    return model, optimizer


@pytest.mark.parametrize("next_steps", [1, 2])
# Skipped: the snapshot step 10; then step 12's install (step 13 run) and
# the snapshot step 20 (step 22 run).
@pytest.mark.parametrize("nan_steps", [(), (10, 13, 22)])
def test_the_driver_reads_the_step_counter_only_around_refreshes(next_steps, nan_steps):
    """Reading `iterations` waits for the running step on an accelerator, so
    the driver counts the steps in Python and reads the counters only when
    a snapshot or an install can be due: on its first call and a few times
    per refresh, not before every call. The run equals one whose driver
    reads them before every call, bit for bit, also when skipped steps
    leave `iterations` behind the driver's count."""
    model, optimizer = _counted_loop(next_steps, False, nan_steps)
    reference, every_call = _counted_loop(next_steps, True, nan_steps)
    for a, b in zip(weights_of(model), weights_of(reference)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(optimizer.variables, every_call.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    # Snapshots every 10 steps taken, each installed 2 steps later (the
    # last one of a run without NaN is still pending at the end).
    refreshes = (40 - len(nan_steps)) // 10
    assert int(optimizer.refreshes.numpy()) == refreshes
    assert int(optimizer.nonfinite_steps.numpy()) == len(nan_steps)
    roots = factor_views(optimizer, "preconditioner")
    assert not any(np.allclose(r.numpy(), np.eye(r.size)) for r in roots)
    calls = 40 // next_steps
    # The first call comes before the first step builds the optimizer.
    assert every_call._root_refresh.host.counter_reads == calls - 1
    # Its first call, then per refresh the calls that find the snapshot,
    # hand the roots over (several steps per call) and install (or wait),
    # and one more per call where a skipped step kept an event one step
    # away.
    reads = optimizer._root_refresh.host.counter_reads
    assert reads <= 1 + 3 * refreshes + len(nan_steps), reads
