"""What every tf_secondorder optimizer is: a Keras optimizer that holds a
`Communicator` and runs its step through it.

`CommunicatingOptimizer` is placed before a `keras.optimizers.Optimizer`
class: before Keras's base for `Shampoo`, `SOAP` and `SignSGD`, before
`Adam`, `SGD`, ... for `tfso.distributed(...)`. It takes the communication
options out of the constructor's keyword arguments (one validated
`CommunicationConfig`, at `optimizer.communication`), builds the
communicator's state with the optimizer's, and connects Keras's step to it:

    replica context:        reduce_gradients -> communicator.reduce
    cross-replica context:  apply_reduced_gradients -> communicator.step,
                            whose update is weight decay + update_variables

`update_variables(strategy, grads_and_vars, learning_rate)` is the
optimizer's own update of all variables; by default Keras's loop calling
`update_step` for each variable, on each replica.
"""

import keras
import tensorflow as tf

from tf_secondorder.callbacks.sync import automatic_callbacks
from tf_secondorder.compat import keras_patches, replica_state, trainer
from tf_secondorder.compat.optimizer_step import KerasStepHooks
from tf_secondorder.distribute.communicator import Communicator
from tf_secondorder.distribute.config import CommunicationConfig


class CommunicatingOptimizer(KerasStepHooks):
    """Mixin for a `keras.optimizers.Optimizer` class (TensorFlow backend)."""

    # Communication options a subclass defaults differently (SignSGD votes).
    communication_defaults = {}

    def __init__(
        self, *args, communication_constraints=(), when_compressed=None, **kwargs
    ):
        """`communication_constraints`: `distribute.config.Constraint`s, the
        communication options the subclass's own arguments rule out;
        `when_compressed`: options it sets itself when something is
        compressed (both checked with the rest by `CommunicationConfig`)."""
        config = CommunicationConfig.pop_from(
            kwargs,
            communication_constraints,
            when_compressed,
            **self.communication_defaults,
        )
        super().__init__(*args, **kwargs)
        self.communication = config
        self.communicator = Communicator(config)
        keras_patches.prepare_for_strategy(self._distribution_strategy)
        # fit/evaluate/predict get the counters in their logs (and the
        # replicas' sync under local SGD).
        keras_patches.install_callback_injection(automatic_callbacks)

    def build(self, var_list):
        """Keras's state for `var_list`, then the communicator's (error-feedback
        memories, local-SGD copies, byte counters)."""
        if self.built:
            return
        super().build(var_list)
        self.communicator.build(OptimizerState(self), var_list, self.averaged_variables)

    # -- the step ----------------------------------------------------------------

    def local_transform(self):
        """None, or what each replica applies to its own gradients before they
        are sent (see `Communicator.reduce`)."""
        return None

    def reduce_gradients(self, grads_and_vars):
        """The gradients every replica applies: each replica's, transformed
        (`local_transform`), compressed and aggregated as the communication
        options say (`Communicator.reduce`)."""
        keys = [
            self._get_variable_index(v) if g is not None else None
            for g, v in grads_and_vars
        ]
        return self.communicator.reduce(
            grads_and_vars,
            keys,
            tf.cast(self.iterations, tf.int64),
            self.keras_sum,
            self.local_transform(),
        )

    def apply_reduced_gradients(self, strategy, grads_and_vars, learning_rate):
        """Weight decay and the update from the aggregated gradients, inside the
        communicator's step (non-finite guard, local-SGD averages, saddle
        escape)."""

        def update(grads_and_vars):
            self.keras_weight_decay(strategy, [v for _, v in grads_and_vars])
            self.update_variables(strategy, grads_and_vars, learning_rate)

        self.communicator.step(strategy, grads_and_vars, update, self.iterations)

    def update_variables(self, strategy, grads_and_vars, learning_rate):
        """The optimizer's own update of every variable (Keras's per-variable
        `update_step` unless an optimizer batches them)."""
        self.keras_update_variables(strategy, grads_and_vars, learning_rate)

    def step_was_skipped(self):
        return self.communicator.step_was_skipped(self.iterations)

    # -- what users read ---------------------------------------------------------

    @property
    def nonfinite_steps(self):
        """Steps skipped whole because a gradient had NaN/Inf (a variable)."""
        return self.communicator.counters.nonfinite_steps

    @property
    def saddle_perturbations(self):
        """Perturbations added by saddle escape so far (a variable), or None."""
        saddle = self.communicator.saddle
        return None if saddle is None else saddle.count

    def communication_stats(self):
        """Bytes and collective calls of this replica.

        `bytes_per_step`: bytes handed to collectives in the last step (0 for
        a local-SGD step without an average); `rounds`: collective calls so
        far; `bytes_total`: all bytes so far; `float32_bytes_per_step`: what
        an uncompressed float32 all-reduce of every trainable variable hands
        over, for comparison; `bytes_received_per_step`: what the collectives
        of one gradient exchange deliver to this replica.
        """
        if not self.built:
            return {
                "bytes_per_step": 0,
                "rounds": 0,
                "bytes_total": 0,
                "float32_bytes_per_step": 0,
                "bytes_received_per_step": 0,
            }
        return self.communicator.stats()

    # -- local SGD ---------------------------------------------------------------

    def replica_specific_variables(self):
        """Optimizer variables a local-SGD average must leave alone."""
        return []

    def averaged_variables(self):
        """What a local-SGD average replaces: the weights and the mirrored
        floating-point optimizer state."""
        excluded = {id(self.iterations)}
        excluded.update(id(v) for v in self.replica_specific_variables())
        learning_rate = getattr(self, "_learning_rate", None)
        if isinstance(learning_rate, tf.Variable) or hasattr(learning_rate, "value"):
            excluded.add(id(learning_rate))
        slots = [
            v
            for v in self.variables
            if id(v) not in excluded
            and v.dtype in ("float16", "bfloat16", "float32", "float64")
            and replica_state.is_mirrored(v)
        ]
        return list(trainer.optimizer_trainable_variables(self)) + slots

    def replicas_differ(self):
        """Whether local steps ran since the last average."""
        local_sgd = self.communicator.local_sgd
        if not self.built or not self.communicator.averages_locally(
            self._distribution_strategy
        ):
            return False
        return local_sgd.replicas_differ()

    def average_replicas(self, force=False):
        """Averages weights and slots over replicas now (outside `tf.function`).

        Does nothing when the replicas are already equal (unless `force`) or
        local SGD is off. Every worker of a multi-worker job must call it at
        the same point: it is a collective. Returns whether it averaged.
        """
        if not self.built or not self.communicator.averages_locally(
            self._distribution_strategy
        ):
            return False
        if not force and not self.replicas_differ():
            return False
        self.communicator.local_sgd.average_now(
            self._distribution_strategy, self.communicator.counters, self.iterations
        )
        return True

    # -- saving ------------------------------------------------------------------

    def save_own_variables(self, store):
        """Keras's saving, plus every replica's copy of state that differs
        between replicas under local SGD."""
        # Under local SGD a replica's optimizer state may differ from the
        # others' (DiLoCo's inner state, SOAP's bases): keep every replica's.
        per_replica = []
        if self.communication.local_sgd:
            per_replica = [v for v in self.variables if replica_state.is_mirrored(v)]
        replica_state.save_per_replica(self.variables, store, per_replica)

    def load_own_variables(self, store):
        """Keras's loading, plus the per-replica copies `save_own_variables`
        wrote."""
        plain, per_replica = replica_state.split_per_replica(self.variables, store)
        super().load_own_variables(plain)
        if len(plain) == len(self.variables):
            for key, value in per_replica.items():
                replica_state.assign_replica_values(self.variables[int(key)], value)

    def get_config(self):
        return {**super().get_config(), **self.communication.get_config()}


class OptimizerState:
    """Creates the state of communication pieces as the optimizer's variables
    (tracked, so saved and restored with it)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.num_replicas = optimizer._distribution_strategy.num_replicas_in_sync

    def per_replica(self, variable, suffix, shape, initializer="zeros"):
        """A value per replica, saved per replica (error-feedback memory)."""
        return replica_state.add_variable(
            self.optimizer, shape, "float32", slot_name(variable, suffix), initializer
        )

    def shared(self, variable, suffix, shape, initializer="zeros"):
        """Equal on every replica, assigned in replica context."""
        return replica_state.add_variable(
            self.optimizer,
            shape,
            "float32",
            slot_name(variable, suffix),
            initializer,
            per_replica=False,
        )

    def replica_counter(self, name):
        """An int64 counter assigned in replica context (equal on replicas)."""
        return replica_state.add_variable(
            self.optimizer, (), "int64", name, per_replica=False
        )

    def mirrored_copy(self, variable, suffix):
        """A variable like `variable`, starting at its value."""
        value = variable.value if isinstance(variable, keras.Variable) else variable
        return self.optimizer.add_variable(
            tuple(variable.shape),
            initializer=lambda shape, dtype: tf.identity(value),
            dtype=variable.dtype,
            name=slot_name(variable, suffix),
        )

    def build_inner(self, optimizer, variables):
        """Builds another Keras optimizer on `variables`, under this one's
        strategy; its variables are saved with this optimizer's."""
        with self.optimizer._distribution_strategy.scope():
            optimizer.build(variables)
        for variable in optimizer.variables:
            self.optimizer._track_variable(variable)

    def counter(self, name, dtype, initializer=0):
        """A scalar assigned in cross-replica context."""
        return self.optimizer.add_variable(
            (),
            initializer=keras.initializers.Constant(initializer),
            dtype=dtype,
            name=name,
            aggregation="only_first_replica",
        )


def slot_name(variable, suffix):
    """`<variable path>_<suffix>`, or `suffix` for state of no one variable."""
    if variable is None:
        return suffix
    path = getattr(variable, "path", None) or variable.name
    return f"{path.replace('/', '_').replace(':', '_')}_{suffix}"
