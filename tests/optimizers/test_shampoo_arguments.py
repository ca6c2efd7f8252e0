"""Every invalid argument raises a ValueError that names it."""

import pytest

import tf_secondorder as tfso


@pytest.mark.parametrize(
    "name, value",
    [
        ("learning_rate", -0.1),
        ("beta1", 1.0),
        ("beta1", -0.1),
        ("beta2", 0.0),
        ("beta2", 1.5),
        ("epsilon", -1e-9),
        ("block_size", 0),
        ("block_size", 2.5),
        ("precondition_frequency", 0),
        ("start_preconditioning_step", 0),
        ("statistics_frequency", 0),
        ("grafting", "lamb"),
        ("grafting_epsilon", -1.0),
        ("nesterov", "yes"),
        ("exponent_override", 0),
        ("max_preconditioned_dim", 0),
        ("root_method", "cholesky"),
        ("statistics_dtype", "float16"),
        ("distribute_roots", "sometimes"),
    ],
)
def test_invalid_argument_is_named(name, value):
    with pytest.raises(ValueError, match=f"`{name}`"):
        tfso.Shampoo(**{name: value})


def test_unknown_argument_is_rejected():
    with pytest.raises((TypeError, ValueError), match="precondition_every"):
        tfso.Shampoo(precondition_every=10)


def test_valid_edge_values():
    opt = tfso.Shampoo(beta1=0.0, beta2=1.0, epsilon=0.0, grafting=None, block_size=1)
    assert opt.beta2 == 1.0 and opt.grafting is None
