"""COMP-AMS: AMSGrad on error-feedback-compressed gradients."""

import keras
import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.optimizers.base import CommunicatingOptimizer


@keras.saving.register_keras_serializable(package="tf_secondorder")
class CompAMS(CommunicatingOptimizer, keras.optimizers.Optimizer):
    """AMSGrad on gradients compressed with error feedback (Li et al. 2022).

    Each replica i compresses its gradient with its error-feedback memory
    e_i, p_i = g_i + e_i, sends C(p_i) and keeps e_i ← p_i − C(p_i); the mean
    ḡ = (1/N) Σ_i C(p_i) feeds AMSGrad:

        m ← β1·m + (1 − β1)·ḡ
        v ← β2·v + (1 − β2)·ḡ²;   v̂ ← max(v̂, v)
        θ ← θ − lr·√(1 − β2^t)/(1 − β1^t) · m / (√v̂ + ε)

    Error feedback makes a biased compressor's dropped mass arrive later;
    Adam's second moment, fed such bursty gradients, can shrink and let the
    step explode, which the running maximum v̂ prevents. The paper (Li,
    Karimi, Li 2022) proves that for smooth non-convex objectives with
    bounded gradients and a compressor of bounded distortion COMP-AMS
    converges at uncompressed AMSGrad's rate, with linear speedup in the
    number of workers. That is the paper's theorem, an order of
    convergence; it promises nothing about the loss reached in a given
    number of steps, and this package's measurements show a gap on the
    digits autoencoder and on the digits classifiers (an MLP and a CNN, the
    paper's kind of task), though not on a byte-level Transformer
    (docs/benchmarks.md, "1-bit Adam / COMP-AMS"): a block-sign code gives
    v̂ one magnitude per tensor, and small dense and conv layers need one
    per element. With one replica (no
    strategy) nothing is compressed and this is AMSGrad.

    The first `compression_warmup_steps` (default 32) are all-reduced in full
    precision. This warm-up is this package's addition, not part of the
    paper's algorithm, which compresses from the first step
    (`compression_warmup_steps=0` runs it). It borrows 1-bit Adam's warm-up
    so that v̂ starts from per-element magnitudes, which a block-sign code
    (one magnitude per tensor) cannot give it, for a few more bytes
    (docs/benchmarks.md, "1-bit Adam / COMP-AMS", has the losses).
    A compressed second moment still loses most per-element scaling there:
    for Adam's quality at a small fraction of the bytes use `OneBitAdam`,
    whose variance is frozen from full-precision gradients.

    A step with NaN/Inf in a gradient is skipped whole and counted in
    `nonfinite_steps`.

    Args:
        learning_rate: float, schedule or callable. Defaults to `0.001`.
        beta1: decay of the first moment, in `[0, 1)`. Defaults to `0.9`.
        beta2: decay of the second moment, in `[0, 1)`. Defaults to `0.999`.
        epsilon: added to √v̂, > 0. Defaults to `1e-7` (Keras's Adam's).
        compression, error_feedback, aggregation, average_every,
        average_warmup_steps, saddle_escape, compression_warmup_steps,
        full_precision_every: what replicas send each other
            (`tfso.distribute.CommunicationConfig`). Defaults to
            `compression="scaled_sign"` (one bit per element and one float
            per tensor) with error feedback, after
            `compression_warmup_steps=32` full-precision steps (0 when
            `compression=None`).
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: as for every
            `keras.optimizers.Optimizer`.

    References:
        - Li, Karimi, Li (2022). On Distributed Adaptive Optimization with
          Gradient Compression. ICLR. arXiv:2205.05632.
        - Reddi, Kale, Kumar (2018). On the Convergence of Adam and Beyond.
          ICLR (AMSGrad).
        - Karimireddy, Rebjock, Stich, Jaggi (2019). Error Feedback Fixes
          SignSGD and other Gradient Compression Schemes. ICML.
    """

    # Full-precision steps before compression starts: see the docstring.
    communication_defaults = {
        "compression": "scaled_sign",
        "compression_warmup_steps": 32,
    }

    def __init__(
        self,
        learning_rate=0.001,
        beta1=0.9,
        beta2=0.999,
        epsilon=1e-7,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name="comp_ams",
        **kwargs,
    ):
        validation.learning_rate(learning_rate)
        options = {
            "beta1": validation.number("beta1", beta1, 0.0, 1.0, high_open=True),
            "beta2": validation.number("beta2", beta2, 0.0, 1.0, high_open=True),
            "epsilon": validation.number("epsilon", epsilon, 0.0, low_open=True),
        }
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
        self._velocity_maxima = self.add_optimizer_variables(var_list, "velocity_max")

    def update_step(self, gradient, variable, learning_rate):
        """AMSGrad's update of `variable` from the aggregated `gradient` (the
        class docstring has the rule)."""
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        gradient = tf.cast(gradient, dtype)
        t = tf.cast(self.iterations + 1, dtype)
        beta1 = tf.constant(self.beta1, dtype)
        beta2 = tf.constant(self.beta2, dtype)
        m, v, v_max = (
            self._momentums[index],
            self._velocities[index],
            self._velocity_maxima[index],
        )
        # 1 − β in double precision, as Keras's Adam.
        new_m = beta1 * m + tf.constant(1.0 - self.beta1, dtype) * gradient
        new_v = beta2 * v + tf.constant(1.0 - self.beta2, dtype) * tf.square(gradient)
        new_v_max = tf.maximum(v_max, new_v)
        step_size = tf.cast(learning_rate, dtype) * tf.sqrt(1.0 - tf.pow(beta2, t))
        step_size /= 1.0 - tf.pow(beta1, t)
        self.assign(m, new_m)
        self.assign(v, new_v)
        self.assign(v_max, new_v_max)
        self.assign_sub(
            variable,
            step_size * new_m / (tf.sqrt(new_v_max) + tf.constant(self.epsilon, dtype)),
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {"beta1": self.beta1, "beta2": self.beta2, "epsilon": self.epsilon}
        )
        return config
