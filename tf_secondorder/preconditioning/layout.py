"""Static (Python-side) layout of blocked Kronecker preconditioners.

Computed once in `build` from the variable shapes: how each variable is
merged and blocked, and which block axes get a statistic (a *factor*). Shampoo
keeps an inverse root per factor, SOAP an eigenbasis.
"""

import dataclasses

from tf_secondorder.linalg import BlockPartitioner, merge_dims


@dataclasses.dataclass(frozen=True)
class Factor:
    """One Kronecker factor: the statistic of one axis of one block."""

    variable: int  # index of the model variable
    block: int  # index of the block within the variable
    axis: int  # axis of the block it preconditions
    size: int  # side of the square statistic
    exponent: int  # p in (S + εI)^(-1/p) (Shampoo)
    index: int  # position in the optimizer's flat factor lists
    dtype: str  # dtype the factor is computed in (float32 or float64)

    @property
    def tag(self):
        return f"b{self.block}_a{self.axis}"


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Blocks of equal shape, preconditioned axes and dtype, from any
    variables: their statistics are one batched gram per axis."""

    shape: tuple  # the blocks' shape
    axes: tuple  # the axes that have a factor
    dtype: str
    members: tuple  # (variable, block) pairs
    factors: tuple  # per member, the factor index of each axis in `axes`


@dataclasses.dataclass
class VariablePlan:
    """How one variable is preconditioned. A variable with no factors (a
    zero-size one, or every axis too long) is only grafted / Adam-updated."""

    shape: tuple
    merged_shape: list
    partitioner: BlockPartitioner
    factors: list
    factors_of_block: list


class BlockLayout:
    """Plans for a list of variable shapes.

    Args:
        shapes: the variables' shapes.
        block_size: the longest block side; also the merge limit.
        max_preconditioned_dim: merged dimensions longer than this get no
            factor, e.g. a vocabulary. None: no limit.
        exponent_override: p for every root instead of 2·k.
        dtypes: compute dtype of each variable's factors (default float32).
        preconditioned: per variable, False for one that gets no factor at
            all (default: every variable may be preconditioned).

    The root exponent of a block with k preconditioned axes is 2k: an axis
    left out (longer than `max_preconditioned_dim`) does not count, as in
    scalable_shampoo's `exponent_for_preconditioner`. A matrix preconditioned
    on one side then gets (GGᵀ)^(−1/2), full-matrix AdaGrad on that side.
    """

    def __init__(
        self,
        shapes,
        block_size,
        max_preconditioned_dim=None,
        exponent_override=None,
        dtypes=None,
        preconditioned=None,
    ):
        dtypes = dtypes or ["float32"] * len(shapes)
        preconditioned = preconditioned or [True] * len(shapes)
        self.plans = []
        self.factors = []
        grouped = {}
        for variable, shape in enumerate(shapes):
            shape = tuple(int(d) for d in shape)
            if 0 in shape:
                self.plans.append(VariablePlan(shape, [0], None, [], []))
                continue
            merged = merge_dims(shape, block_size)
            partitioner = BlockPartitioner(merged, block_size)
            axes = [
                axis
                for axis, dim in enumerate(merged)
                if preconditioned[variable]
                and (max_preconditioned_dim is None or dim <= max_preconditioned_dim)
            ]
            exponent = exponent_override or 2 * len(axes)
            factors_of_block = []
            plan_factors = []
            for block, block_shape in enumerate(partitioner.block_shapes):
                block_factors = []
                for axis in axes:
                    factor = Factor(
                        variable=variable,
                        block=block,
                        axis=axis,
                        size=block_shape[axis],
                        exponent=exponent,
                        index=len(self.factors),
                        dtype=dtypes[variable],
                    )
                    self.factors.append(factor)
                    block_factors.append(factor)
                    plan_factors.append(factor)
                factors_of_block.append(block_factors)
                if block_factors:
                    key = (tuple(block_shape), tuple(axes), dtypes[variable])
                    members, indices = grouped.setdefault(key, ([], []))
                    members.append((variable, block))
                    indices.append(tuple(f.index for f in block_factors))
            self.plans.append(
                VariablePlan(shape, merged, partitioner, plan_factors, factors_of_block)
            )
        self.groups = [
            BlockGroup(shape, axes, dtype, tuple(members), tuple(indices))
            for (shape, axes, dtype), (members, indices) in grouped.items()
        ]
