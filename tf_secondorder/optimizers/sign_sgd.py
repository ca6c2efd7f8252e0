"""signSGD and Signum, with majority vote across replicas."""

import keras
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.compat import replica_state
from tf_secondorder.optimizers.base import CommunicatingOptimizer, slot_name


@keras.saving.register_keras_serializable(package="tf_secondorder")
class SignSGD(CommunicatingOptimizer, keras.optimizers.Optimizer):
    """signSGD (`momentum=0`) and Signum (`momentum>0`), majority vote by default.

    Each replica i keeps its own momentum of its own gradient g_i and sends
    its sign; the update follows the majority:

        m_i ← β·m_i + (1 − β)·g_i               (m_i = g_i when β = 0)
        θ ← θ − lr · sign(Σ_i sign(m_i))         (sign(0) = +1 in the vote)

    one bit per element each way: with 3 or more replicas each replica
    tallies 1/N of the elements and sends its shard's result back
    (`tfso.distribute.voting`). A minority of k replicas sending wrong
    signs can change the vote only on elements where the honest replicas'
    signs sum to at most k in absolute value (at exactly k only through the
    tie rule, towards +1); elsewhere the update is the honest majority's.
    With one replica this is
    θ ← θ − lr·sign(m) with sign(0) = 0, so a weight with a zero gradient
    does not move. With `aggregation="mean"` the replicas' momenta (or the
    chosen compression of them) are averaged and the update is
    θ ← θ − lr·sign(mean). Weight decay is Keras's decoupled one.

    Args:
        learning_rate: float, schedule or callable. Defaults to `0.001`.
        momentum: β in `[0, 1)`. Defaults to `0.0` (signSGD).
        compression, error_feedback, aggregation, average_every,
        average_warmup_steps, saddle_escape: what replicas send each other
            (`tfso.distribute.CommunicationConfig`), with other defaults:
            `compression="sign"`, `aggregation="majority_vote"` (error
            feedback then off). Local SGD needs `compression=None,
            aggregation="mean"`: each replica steps on the sign of its own
            momentum and weights are averaged every I steps.
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

    communication_defaults = {"compression": "sign", "aggregation": "majority_vote"}

    def __init__(
        self,
        learning_rate=0.001,
        momentum=0.0,
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
        validation.learning_rate(learning_rate)
        momentum = validation.number("momentum", momentum, 0.0, 1.0, high_open=True)
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
        self.momentum = momentum

    def build(self, var_list):
        """The optimizer's slots for `var_list` (the class docstring lists
        them), then the communicator's state."""
        if self.built:
            return
        super().build(var_list)
        # Each replica's own momentum of its own gradient: per replica, saved.
        self._momentums = [
            replica_state.add_variable(
                self, v.shape, "float32", slot_name(v, "momentum")
            )
            if self.momentum > 0
            else None
            for v in var_list
        ]

    def local_transform(self):
        if self.momentum == 0:
            return None
        beta = tf.constant(self.momentum, tf.float32)

        def momenta(gradients, keys):
            memories = [self._momentums[k] for k in keys]
            updated = [
                _momentum_update(tf.convert_to_tensor(m), g, beta)
                for m, g in zip(memories, gradients)
            ]
            return updated, list(zip(memories, updated))

        return momenta

    def update_step(self, gradient, variable, learning_rate):
        """The signed step of `variable` from the aggregated `gradient` (the
        class docstring has the rule)."""
        lr = tf.cast(learning_rate, variable.dtype)
        self.assign_sub(variable, _signed_step(tf.cast(gradient, variable.dtype), lr))

    def get_config(self):
        config = super().get_config()
        config.update({"momentum": self.momentum})
        return config


# Each is one fused pass over the tensor instead of three: at millions of
# parameters the unfused elementwise ops cost more than the 1-bit collective.
@tf.function(jit_compile=True, autograph=False)
def _momentum_update(momentum, gradient, beta):
    return beta * momentum + (1.0 - beta) * gradient


@tf.function(jit_compile=True, autograph=False)
def _signed_step(gradient, learning_rate):
    return learning_rate * tf.sign(gradient)
