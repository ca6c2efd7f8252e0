"""Escaping strict saddle points by perturbation.

The perturbation rule of perturbed gradient descent (PGD: Jin, Ge,
Netrapalli, Kakade, Jordan, "How to Escape Saddle Points Efficiently", ICML
2017, arXiv:1703.00887): at a step whose gradient (all-reduced, over all
trainable variables) has ‖g‖ < `threshold`, and at least `interval` steps
after the last perturbation, the weights after the step move by ξ drawn
uniformly from the ball of radius `radius`. At a strict saddle the gradient
vanishes and plain gradient steps stay there; ξ has a component along the
negative curvature direction almost surely, which the following steps
amplify.

What differs from the paper's PGD: ξ is added after the step whose gradient
was small (PGD adds it first and steps from the perturbed point, one
gradient later), the gradient is the stochastic mini-batch one of
data-parallel training (PGD's analysis is for exact gradients), and the
threshold, radius and interval are the user's, not the paper's functions of
the smoothness constants. Nothing here is NEON (Xu, Jin, Yang, NeurIPS
2018), which extracts a negative-curvature direction from noise with
first-order steps and then moves along it.

ξ is drawn in cross-replica context from a seed and the step number, so every
replica adds the same ξ and replicas stay equal.
"""

import keras
import tensorflow as tf

from tf_secondorder import validation


@keras.saving.register_keras_serializable(package="tf_secondorder")
class SaddleEscape:
    """Options of the saddle perturbation: `saddle_escape=SaddleEscape(...)`.

    Args:
        threshold: perturb when the gradient norm is below this (> 0).
        radius: radius r of the ball ξ is drawn from (> 0).
        interval: at least this many steps between perturbations (>= 1).
        seed: integer seed of ξ.
    """

    def __init__(self, threshold=1e-3, radius=1e-2, interval=100, seed=0):
        self.threshold = validation.number("threshold", threshold, 0.0, low_open=True)
        self.radius = validation.number("radius", radius, 0.0, low_open=True)
        self.interval = validation.integer("interval", interval, 1)
        self.seed = validation.integer("seed", seed, 0, (1 << 31) - 1)

    def get_config(self):
        """The arguments that rebuild this saddle escape."""
        return {
            "threshold": self.threshold,
            "radius": self.radius,
            "interval": self.interval,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        """The saddle escape `config` (from `get_config`) describes."""
        return cls(**config)

    def __repr__(self):
        return f"SaddleEscape({self.get_config()})"


def get(identifier):
    if identifier is None or isinstance(identifier, SaddleEscape):
        return identifier
    if isinstance(identifier, dict):
        config = identifier.get("config", identifier)
        return SaddleEscape(**config)
    validation.fail(
        "saddle_escape", "None, a tfso.SaddleEscape or its config dict", identifier
    )


def ball_sample(sizes, radius, seed):
    """Uniform in the ball of `radius` in R^(Σ sizes), split by `sizes`."""
    total = sum(sizes)
    direction = tf.random.stateless_normal([total], seed=seed, dtype=tf.float32)
    u = tf.random.stateless_uniform([], seed=seed + [0, 1], dtype=tf.float32)
    length = radius * tf.pow(u, 1.0 / total)
    return tf.split(direction * (length / tf.norm(direction)), sizes)


class SaddlePerturbation:
    """The perturbation step: after the update, add ξ when it is due.

    State (saved with the optimizer): how many perturbations were added, and
    the step of the last one (the interval counts from it).
    """

    def __init__(self, options):
        self.options = options
        self.count = None
        self.last_step = None

    def build(self, state):
        self.count = state.counter("saddle_perturbations", "int32")
        self.last_step = state.counter("last_perturbation", "int32")

    def gradient_norm(self, strategy, grads_and_vars):
        """‖g‖ of the reduced gradient (equal on every replica); cross-replica."""
        squares = []
        for grad, _ in grads_and_vars:
            local = strategy.experimental_local_results(grad)[0]
            if isinstance(local, tf.IndexedSlices):
                local = tf.convert_to_tensor(local)
            squares.append(tf.reduce_sum(tf.square(tf.cast(local, tf.float32))))
        return tf.sqrt(tf.add_n(squares))

    def perturb_if_due(self, variables, norm, step):
        """Adds ξ to `variables` when ‖g‖ < threshold and the interval passed
        (cross-replica context: every replica adds the same ξ)."""
        options = self.options
        due = (norm < options.threshold) & (
            (self.count == 0) | (step - self.last_step >= options.interval)
        )

        def perturb():
            sizes = [int(v.shape.num_elements()) for v in variables]
            seed = tf.stack([tf.constant(options.seed), step])
            for variable, noise in zip(
                variables, ball_sample(sizes, options.radius, seed)
            ):
                variable.assign_add(
                    tf.cast(tf.reshape(noise, variable.shape), variable.dtype)
                )
            self.count.assign_add(1)
            self.last_step.assign(step)

        tf.cond(due, perturb, lambda: None)
