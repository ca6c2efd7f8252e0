"""Escaping strict saddle points by perturbation (SPEC §4.7).

Perturbed gradient descent (Jin et al. 2017; in the distributed setting Xu,
Jin, Yang 2018): at a step whose gradient (all-reduced, over all trainable
variables) has ‖g‖ < `threshold`, and at least `interval` steps after the
last perturbation, the weights after the step move by ξ drawn uniformly from
the ball of radius `radius`. At a strict saddle the gradient vanishes and
plain gradient steps stay there; ξ has a component along the negative
curvature direction almost surely, which the following steps amplify.

ξ is drawn in cross-replica context from a seed and the step number, so every
replica adds the same ξ and replicas stay equal.
"""

import numbers

import keras
import tensorflow as tf


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
        for name, value in (("threshold", threshold), ("radius", radius)):
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not value > 0
                or value == float("inf")
            ):
                raise ValueError(
                    f"`{name}` must be a finite number > 0. Received: {name}={value!r}"
                )
        for name, value, low in (("interval", interval, 1), ("seed", seed, 0)):
            if (
                isinstance(value, bool)
                or not isinstance(value, numbers.Integral)
                or value < low
            ):
                raise ValueError(
                    f"`{name}` must be an integer >= {low}. Received: {name}={value!r}"
                )
        self.threshold = float(threshold)
        self.radius = float(radius)
        self.interval = int(interval)
        self.seed = int(seed)

    def get_config(self):
        return {
            "threshold": self.threshold,
            "radius": self.radius,
            "interval": self.interval,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"SaddleEscape({self.get_config()})"


def get(identifier):
    if identifier is None or isinstance(identifier, SaddleEscape):
        return identifier
    if isinstance(identifier, dict):
        config = identifier.get("config", identifier)
        return SaddleEscape(**config)
    raise ValueError(
        "`saddle_escape` must be None, a tfso.SaddleEscape or its config dict. "
        f"Received: saddle_escape={identifier!r}"
    )


def ball_sample(sizes, radius, seed):
    """Uniform in the ball of `radius` in R^(Σ sizes), split by `sizes`."""
    total = sum(sizes)
    direction = tf.random.stateless_normal([total], seed=seed, dtype=tf.float32)
    u = tf.random.stateless_uniform([], seed=seed + [0, 1], dtype=tf.float32)
    length = radius * tf.pow(u, 1.0 / total)
    return tf.split(direction * (length / tf.norm(direction)), sizes)


class SaddlePerturbation:
    """Mixin part of `Communication`: the perturbation after each step."""

    def _init_saddle_escape(self, saddle_escape):
        self.saddle_escape = get(saddle_escape)
        if self.saddle_escape is not None and self.average_every is not None:
            raise ValueError(
                "`saddle_escape` perturbs the common weights of synchronous "
                "training; it cannot be combined with `average_every`. "
                f"Received: saddle_escape={self.saddle_escape!r}, "
                f"average_every={self.average_every!r}"
            )

    def build_saddle_escape(self):
        self._perturbations = self._last_perturbation = None
        if self.saddle_escape is None:
            return
        counter = dict(shape=(), initializer="zeros", aggregation="only_first_replica")
        self._perturbations = self.add_variable(
            dtype="int32", name="saddle_perturbations", **counter
        )
        self._last_perturbation = self.add_variable(
            dtype="int32", name="last_perturbation", **counter
        )

    @property
    def saddle_perturbations(self):
        """How many perturbations were added so far (a saved variable)."""
        return self._perturbations

    def step_update(self, distribution, grads_and_vars, learning_rate):
        if self.saddle_escape is None:
            return super().step_update(distribution, grads_and_vars, learning_rate)
        options = self.saddle_escape
        squares = []
        for grad, _ in grads_and_vars:
            local = distribution.experimental_local_results(grad)[0]
            if isinstance(local, tf.IndexedSlices):
                local = tf.convert_to_tensor(local)
            squares.append(tf.reduce_sum(tf.square(tf.cast(local, tf.float32))))
        norm = tf.sqrt(tf.add_n(squares))
        super().step_update(distribution, grads_and_vars, learning_rate)
        step = tf.cast(self.iterations, tf.int32) + 1
        due = (norm < options.threshold) & (
            (self._perturbations == 0)
            | (step - self._last_perturbation >= options.interval)
        )
        variables = [v for _, v in grads_and_vars]

        def perturb():
            sizes = [int(v.shape.num_elements()) for v in variables]
            seed = tf.stack([tf.constant(options.seed), step])
            for variable, noise in zip(
                variables, ball_sample(sizes, options.radius, seed)
            ):
                variable.assign_add(
                    tf.cast(tf.reshape(noise, variable.shape), variable.dtype)
                )
            self._perturbations.assign_add(1)
            self._last_perturbation.assign(step)

        tf.cond(due, perturb, lambda: None)
