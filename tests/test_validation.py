"""Bad input gets a ValueError naming the argument, before any work."""

import math

import pytest

import tf_secondorder as tfso
from tf_secondorder import validation

C = tfso.compression
INF, NAN = math.inf, math.nan


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: tfso.Shampoo(learning_rate=INF), "learning_rate"),
        (lambda: tfso.SOAP(learning_rate=NAN), "learning_rate"),
        (lambda: tfso.SignSGD(learning_rate=-INF), "learning_rate"),
        (lambda: tfso.Shampoo(epsilon=INF), "epsilon"),
        (lambda: tfso.Shampoo(grafting_epsilon=0), "grafting_epsilon"),
        (lambda: tfso.Shampoo(grafting_epsilon=INF), "grafting_epsilon"),
        # 0 would divide 0 by 0 on coordinates no gradient reached.
        (lambda: tfso.SOAP(epsilon=0), "epsilon"),
        (lambda: tfso.Shampoo(block_size=1e300), "block_size"),
        (lambda: tfso.Shampoo(block_size=256.0), "block_size"),
        (lambda: tfso.SOAP(max_preconditioned_dim=2**40), "max_preconditioned_dim"),
        (lambda: tfso.Shampoo(exponent_override=True), "exponent_override"),
        (lambda: tfso.Shampoo(compression="sign", error_feedback=1), "error_feedback"),
        (lambda: tfso.distributed("sgd", error_feedback=True), "error_feedback"),
        (lambda: C.TernGrad(clip=INF), "clip"),
        (lambda: C.PowerSGD(seed=2.7), "seed"),
        (lambda: C.PowerSGD(seed=-1), "seed"),
        (lambda: C.QSGD(bucket_size=0), "bucket_size"),
        (lambda: C.TopK(ratio=NAN), "ratio"),
        (lambda: tfso.callbacks.SyncReplicas(save_every=(0,)), "save_every"),
        (lambda: tfso.callbacks.SyncReplicas(save_every=3), "save_every"),
        (lambda: tfso.SaddleEscape(threshold=INF), "threshold"),
        (lambda: tfso.SaddleEscape(seed=1.5), "seed"),
        (
            lambda: tfso.distributed("sgd", average_every=4, average_warmup_steps=1.5),
            "average_warmup_steps",
        ),
        (lambda: tfso.distributed("adam", compresion="sign"), "compresion"),
        (
            lambda: tfso.distributed(
                "adam",
                compression="sign",
                aggregation="majority_vote",
                saddle_escape=tfso.SaddleEscape(),
            ),
            "saddle_escape",
        ),
        (
            lambda: tfso.distributed(
                "adam", compression="sign", saddle_escape=tfso.SaddleEscape()
            ),
            "saddle_escape",
        ),
        (lambda: tfso.data.GrowingBatchSchedule(8, INF, 100), "growth_factor"),
        (
            lambda: tfso.data.GrowingBatchSchedule(8, 2.0, 100, max_batch_size=4),
            "max_batch_size",
        ),
    ],
)
def test_bad_input_names_the_argument_in_one_style(make, argument):
    with pytest.raises(ValueError, match=f"^`{argument}` must be .*; received "):
        make()


def test_checks_return_canonical_values():
    assert validation.number("x", 3, 0.0) == 3.0 and isinstance(
        validation.number("x", 3, 0.0), float
    )
    assert validation.integer("n", 7, 1) == 7
    assert validation.size("n", None, optional=True) is None
    assert validation.choice("c", None, ("a", None)) is None
    with pytest.raises(ValueError, match="`c` must be one of"):
        validation.choice("c", 1, (True, False))  # 1 is not True
    with pytest.raises(ValueError, match="`n` must be an integer"):
        validation.integer("n", True, 0)


def test_a_valid_config_round_trips():
    config = tfso.CommunicationConfig(
        compression=C.QSGD(bits=4), aggregation="mean", error_feedback=False
    )
    again = tfso.CommunicationConfig(**config.get_config())
    assert again == config
    assert (
        tfso.CommunicationConfig(compression="sign").get_config()["compression"]
        == "sign"
    )


def test_adaptive_optimizer_with_biased_compression_is_warned_off():
    import warnings

    import keras

    with pytest.warns(UserWarning, match="OneBitAdam"):
        tfso.distributed(keras.optimizers.Adam(), compression="sign")
    with pytest.warns(UserWarning, match="OneBitAdam"):
        tfso.distributed(
            keras.optimizers.AdamW(), compression="sign", aggregation="majority_vote"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tfso.distributed(keras.optimizers.Adam(), compression="int8")
        tfso.distributed(keras.optimizers.Adam(), compression="fp16")
        tfso.distributed(keras.optimizers.Adam(amsgrad=True), compression="topk")
        tfso.distributed(keras.optimizers.SGD(), compression="sign")
        tfso.OneBitAdam()
