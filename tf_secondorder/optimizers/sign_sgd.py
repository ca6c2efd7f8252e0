"""signSGD and Signum, with majority vote across replicas."""

import keras
import tensorflow as tf

from tf_secondorder.distribute import Communication
from tf_secondorder.distribute._keras_hooks import add_replica_local_variable
from tf_secondorder.optimizers import _validate


@keras.saving.register_keras_serializable(package="tf_secondorder")
class SignSGD(Communication, keras.optimizers.Optimizer):
    """signSGD (`momentum=0`) and Signum (`momentum>0`), majority vote by default.

    Each replica i keeps its own momentum of its own gradient g_i and sends
    its sign; the update follows the majority:

        m_i ← β·m_i + (1 − β)·g_i               (m_i = g_i when β = 0)
        θ ← θ − lr · sign(Σ_i sign(m_i))         (sign(0) = +1 in the vote)

    one bit per element each way (SPEC §4.3). It tolerates a minority of
    replicas sending wrong signs. With one replica this is
    θ ← θ − lr·sign(m) with sign(0) = 0, so a weight with a zero gradient
    does not move. With `aggregation="mean"` the replicas' momenta (or the
    chosen compression of them) are averaged and the update is
    θ ← θ − lr·sign(mean). Weight decay is Keras's decoupled one.

    Args:
        learning_rate: float, schedule or callable. Defaults to `0.001`.
        momentum: β in `[0, 1)`. Defaults to `0.0` (signSGD).
        compression: what each replica sends. Defaults to `"sign"`.
        error_feedback: `None` (off under majority vote, on for biased
            compressors under `"mean"`), `True` or `False`.
        aggregation: `"majority_vote"` (default) or `"mean"`.
        average_every, average_warmup_steps: local SGD (needs
            `compression=None, aggregation="mean"`): each replica steps on the
            sign of its own momentum and weights are averaged every I steps.
        saddle_escape: `None` or a `tfso.SaddleEscape`: a random perturbation
            when the gradient norm stays small (leaves strict saddles).
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: as for every
            `keras.optimizers.Optimizer`.

    References:
        - Bernstein, Wang, Azizzadenesheli, Anandkumar (2018). signSGD:
          Compressed Optimisation for Non-Convex Problems. ICML.
        - Bernstein, Zhao, Azizzadenesheli, Anandkumar (2019). signSGD with
          Majority Vote is Communication Efficient and Fault Tolerant. ICLR.
    """

    has_local_transform = True

    def __init__(
        self,
        learning_rate=0.001,
        momentum=0.0,
        compression="sign",
        error_feedback=None,
        aggregation="majority_vote",
        average_every=None,
        average_warmup_steps=0,
        saddle_escape=None,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="sign_sgd",
        **kwargs,
    ):
        _validate.learning_rate(learning_rate)
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        self.momentum = _validate.in_range(
            "momentum", momentum, 0.0, 1.0, high_open=True
        )
        self._init_communication(
            compression,
            error_feedback,
            aggregation,
            average_every,
            average_warmup_steps,
            saddle_escape,
        )

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._momentums = [
            add_replica_local_variable(
                self, v.shape, "float32", f"{v.path.replace('/', '_')}_momentum"
            )
            if self.momentum > 0
            else None
            for v in var_list
        ]
        self.build_communication(var_list)

    def local_gradient(self, gradient, variable):
        momentum = self._momentums[self._get_variable_index(variable)]
        if momentum is None:
            return gradient
        beta = tf.constant(self.momentum, tf.float32)
        updated = _momentum_update(tf.convert_to_tensor(momentum), gradient, beta)
        momentum.assign(updated)
        return updated

    def update_step(self, gradient, variable, learning_rate):
        lr = tf.cast(learning_rate, variable.dtype)
        self.assign_sub(variable, _signed_step(tf.cast(gradient, variable.dtype), lr))

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum, **self.communication_config()})
        return config


# Each is one fused pass over the tensor instead of three: at millions of
# parameters the unfused elementwise ops cost more than the 1-bit collective.
@tf.function(jit_compile=True, autograph=False)
def _momentum_update(momentum, gradient, beta):
    return beta * momentum + (1.0 - beta) * gradient


@tf.function(jit_compile=True, autograph=False)
def _signed_step(gradient, learning_rate):
    return learning_rate * tf.sign(gradient)
