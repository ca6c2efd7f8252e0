"""The options Shampoo and SOAP share, validated, and the communication
options they rule out."""

from tf_secondorder import validation
from tf_secondorder.distribute.config import Constraint
from tf_secondorder.optimizers import refresh

STATISTICS_DTYPES = (None, "float32", "bfloat16")
DISTRIBUTE_ROOTS = ("auto", True, False)
# Under local SGD each replica has statistics of its own.
LOCAL_SGD_PIPELINED = Constraint(
    "average_every",
    "root_refresh",
    "'auto' or 'in_step' under local SGD (`average_every`): each replica "
    "refreshes from its own statistics in its step",
    "pipelined",
)
LOCAL_SGD_SHARED_ROOTS = Constraint(
    "average_every",
    "distribute_roots",
    "'auto' or False under local SGD (`average_every`): roots shared across "
    "replicas need common statistics, and each replica has its own",
    True,
)

NAMES = (
    "block_size",
    "precondition_frequency",
    "start_preconditioning_step",
    "statistics_frequency",
    "max_preconditioned_dim",
    "statistics_dtype",
    "distribute_roots",
    "precondition_1d",
    "packed_statistics",
    "root_refresh",
    "refresh_delay",
)


def validated(
    *,
    block_size,
    precondition_frequency,
    start_preconditioning_step,
    statistics_frequency,
    max_preconditioned_dim,
    statistics_dtype,
    distribute_roots,
    precondition_1d,
    packed_statistics,
    root_refresh,
    refresh_delay,
):
    """{name: value} of the shared options; a ValueError names a bad one."""
    return {
        "block_size": validation.size("block_size", block_size),
        "precondition_frequency": validation.integer(
            "precondition_frequency", precondition_frequency, 1
        ),
        "start_preconditioning_step": validation.integer(
            "start_preconditioning_step",
            start_preconditioning_step,
            1,
            optional=True,
        ),
        "statistics_frequency": validation.integer(
            "statistics_frequency", statistics_frequency, 1
        ),
        "max_preconditioned_dim": validation.size(
            "max_preconditioned_dim", max_preconditioned_dim, optional=True
        ),
        "statistics_dtype": validation.choice(
            "statistics_dtype", statistics_dtype, STATISTICS_DTYPES
        ),
        "distribute_roots": validation.choice(
            "distribute_roots", distribute_roots, DISTRIBUTE_ROOTS
        ),
        "precondition_1d": validation.boolean("precondition_1d", precondition_1d),
        "packed_statistics": validation.boolean("packed_statistics", packed_statistics),
        "root_refresh": validation.choice(
            "root_refresh", root_refresh, refresh.ROOT_REFRESH
        ),
        "refresh_delay": validation.integer(
            "refresh_delay", refresh_delay, 1, precondition_frequency, optional=True
        ),
    }


def communication_constraints(options):
    """The `Constraint`s of validated `options`, for `CommunicationConfig`."""
    constraints = []
    if options["root_refresh"] == "pipelined":
        constraints.append(LOCAL_SGD_PIPELINED)
    if options["distribute_roots"] is True:
        constraints.append(LOCAL_SGD_SHARED_ROOTS)
    return constraints
