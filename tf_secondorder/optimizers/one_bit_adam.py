"""1-bit Adam: Adam warm-up, then frozen variance and compressed momentum."""

import keras
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.compression import ScaledSign
from tf_secondorder.distribute.config import Constraint
from tf_secondorder.optimizers.base import CommunicatingOptimizer


@keras.saving.register_keras_serializable(package="tf_secondorder")
class OneBitAdam(CommunicatingOptimizer, keras.optimizers.Optimizer):
    """1-bit Adam (Tang et al. 2021): full-precision Adam for `freeze_step`
    steps, then a frozen second moment and compressed momentum.

    Warm-up (t ≤ T = `freeze_step`), on the full-precision mean gradient ḡ,
    Keras's Adam:

        m ← β1·m + (1 − β1)·ḡ;   v ← β2·v + (1 − β2)·ḡ²
        θ ← θ − lr·√(1 − β2^s)/(1 − β1^t) · m/(√v + ε)        (s = t)

    Compression stage (t > T): v stays as it was at T. Each replica i updates
    the common momentum with its *own* gradient, m_i = β1·m + (1 − β1)·g_i,
    and the replicas exchange m_i compressed with error feedback (by default
    one bit per element and a scale per 256, gathered; with
    `aggregation="bidirectional"` DeepSpeed's exchange with worker and server
    memories); the result m̄ becomes the momentum and the step is the same
    with s = T:

        m ← m̄

    Every `variance_update_every` = K steps after T, one step is again
    all-reduced in full precision and updates v (as K steps of decay,
    β2^K, so s grows by K): on a run whose gradient scale drifts, a variance
    frozen for good leaves late steps too large or too small, which the
    occasional update corrects (docs/benchmarks.md, "1-bit Adam / COMP-AMS",
    has the losses with and without it).

    With the variance frozen, Adam's update is linear in the momentum, so
    error feedback on the momentum converges as it does for momentum SGD;
    error feedback on gradients fed to Adam's variance does not. With one
    replica nothing is compressed: Adam, then Adam with the variance frozen.
    The compressed exchange runs during the warm-up too (a graph is static),
    its result and memories unused, so warm-up steps cost float32 bytes plus
    the compressed ones. A step with NaN/Inf in a gradient is skipped whole
    and counted in `nonfinite_steps`; every memory is saved per replica.

    Args:
        learning_rate: float, schedule or callable. Defaults to `0.001`.
        beta1: decay of the first moment, in `[0, 1)`. Defaults to `0.9`.
        beta2: decay of the second moment, in `[0, 1)`. Defaults to `0.999`.
        epsilon: added to √v, > 0. Defaults to `1e-7` (Keras's Adam's).
        freeze_step: T, the full-precision Adam steps before the variance
            freezes, >= 1. Defaults to `32`.
        variance_update_every: K >= 1, or `None` to freeze the variance for
            good (DeepSpeed's 1-bit Adam). Defaults to `128`. The bytes over
            a run of S steps are about (T + S/K)/S of float32 Adam's plus
            1/28 (block signs): under 1/16 from a few hundred steps on.
        compression, error_feedback, aggregation, saddle_escape: what replicas
            send each other (`tfso.distribute.CommunicationConfig`). Defaults
            to `compression=tfso.compression.ScaledSign(bucket_size=256)`,
            `aggregation="mean"` (the reasons are in the class's source).
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: as for every
            `keras.optimizers.Optimizer`.

    References:
        - Tang, Gan, Awan, Rajbhandari, Li, Lian, Liu, Zhang, He (2021).
          1-bit Adam: Communication Efficient Large-Scale Training with
          Adam's Convergence Speed. ICML. arXiv:2102.02888.
        - Kingma, Ba (2015). Adam: A Method for Stochastic Optimization.
    """

    # Block signs (a scale per 256) keep the per-block magnitudes that one
    # scale per tensor flattens, which the momentum needs. The gathered mean
    # hands each replica's d bits to the collective where the bidirectional
    # exchange hands d·(1 + 1/N), so at a few replicas it sends fewer bytes.
    # docs/benchmarks.md ("1-bit Adam / COMP-AMS") has the numbers.
    communication_defaults = {
        "compression": ScaledSign(bucket_size=256),
        "aggregation": "mean",
    }

    def __init__(
        self,
        learning_rate=0.001,
        beta1=0.9,
        beta2=0.999,
        epsilon=1e-7,
        freeze_step=32,
        variance_update_every=128,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="one_bit_adam",
        **kwargs,
    ):
        validation.learning_rate(learning_rate)
        options = {
            "beta1": validation.number("beta1", beta1, 0.0, 1.0, high_open=True),
            "beta2": validation.number("beta2", beta2, 0.0, 1.0, high_open=True),
            "epsilon": validation.number("epsilon", epsilon, 0.0, low_open=True),
            "freeze_step": validation.integer("freeze_step", freeze_step, 1),
            "variance_update_every": validation.integer(
                "variance_update_every", variance_update_every, 1, optional=True
            ),
        }
        constraints = (
            Constraint(
                "compression_warmup_steps",
                "compression_warmup_steps",
                "left to `freeze_step` (OneBitAdam compresses after it)",
            ),
            Constraint(
                "average_every",
                "average_every",
                "None (OneBitAdam exchanges the momentum every step)",
            ),
        )
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
            communication_constraints=constraints,
            # Uncompressed momenta are simply all-reduced: no stages.
            when_compressed={
                "compression_warmup_steps": options["freeze_step"],
                "full_precision_every": options["variance_update_every"],
            },
            **kwargs,
        )
        for key, value in options.items():
            setattr(self, key, value)

    def build(self, var_list):
        """The optimizer's slots for `var_list` (the class docstring lists
        them), then the communicator's state."""
        if self.built:
            return
        super().build(var_list)
        self._momentums = self.add_optimizer_variables(var_list, "momentum")
        self._velocities = self.add_optimizer_variables(var_list, "velocity")

    def local_transform(self):
        beta1 = self.beta1

        def own_momenta(gradients, keys):
            # After the freeze each replica sends β1·m + (1 − β1)·g_i; on
            # full-precision steps its gradient (all-reduced as such).
            frozen = tf.logical_not(self._full_precision(self.iterations + 1))
            sent = []
            for gradient, key in zip(gradients, keys):
                m = tf.cast(tf.convert_to_tensor(self._momentums[key]), tf.float32)
                momentum = beta1 * m + (1.0 - beta1) * gradient
                sent.append(tf.where(frozen, momentum, gradient))
            return sent, []

        return own_momenta

    def update_step(self, gradient, variable, learning_rate):
        """1-bit Adam's update of `variable` from the aggregated `gradient`
        (the class docstring has the rule)."""
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        gradient = tf.cast(gradient, dtype)
        t = tf.cast(self.iterations + 1, dtype)
        # 1 − β in double precision, as Keras's Adam (1 − β rounded from the
        # float32 β would differ by up to 5e-5 relative for β2 = 0.999).
        beta1, rest1 = (
            tf.constant(self.beta1, dtype),
            tf.constant(1.0 - self.beta1, dtype),
        )
        beta2 = tf.constant(self.beta2, dtype)
        m, v = self._momentums[index], self._velocities[index]
        step = tf.cast(self.iterations + 1, tf.int32)
        frozen = tf.logical_not(self._full_precision(step))
        # A variance update after the freeze stands for K steps: β2^K.
        every = float(self.variance_update_every or 1)
        after = t > self.freeze_step
        decay = tf.where(
            after, tf.constant(self.beta2**every, dtype), tf.constant(self.beta2, dtype)
        )
        rest = tf.where(
            after,
            tf.constant(1.0 - self.beta2**every, dtype),
            tf.constant(1.0 - self.beta2, dtype),
        )
        new_m = tf.where(frozen, gradient, beta1 * m + rest1 * gradient)
        new_v = tf.where(frozen, v, decay * v + rest * tf.square(gradient))
        # Keras's Adam's form: the corrections in the step size.
        step_size = tf.cast(learning_rate, dtype) * tf.sqrt(
            1.0 - tf.pow(beta2, self._variance_steps(t))
        )
        step_size /= 1.0 - tf.pow(beta1, t)
        self.assign(m, new_m)
        self.assign(v, new_v)
        self.assign_sub(
            variable,
            step_size * new_m / (tf.sqrt(new_v) + tf.constant(self.epsilon, dtype)),
        )

    def _full_precision(self, step):
        """Whether 1-based `step` updates the variance from a full-precision
        mean gradient."""
        due = step <= self.freeze_step
        if self.variance_update_every is not None:
            due |= tf.equal((step - self.freeze_step) % self.variance_update_every, 0)
        return due

    def _variance_steps(self, t):
        """Steps of β2 decay the variance has seen: t up to the freeze, then
        K per variance update."""
        freeze = tf.constant(float(self.freeze_step), t.dtype)
        if self.variance_update_every is None:
            return tf.minimum(t, freeze)
        every = float(self.variance_update_every)
        updates = tf.floor(tf.maximum(t - freeze, 0.0) / every)
        return tf.minimum(t, freeze) + every * updates

    def get_config(self):
        config = super().get_config()
        # Set by `freeze_step` / `variance_update_every`; not options here.
        config.pop("compression_warmup_steps", None)
        config.pop("full_precision_every", None)
        config.update(
            {
                "beta1": self.beta1,
                "beta2": self.beta2,
                "epsilon": self.epsilon,
                "freeze_step": self.freeze_step,
                "variance_update_every": self.variance_update_every,
            }
        )
        return config
