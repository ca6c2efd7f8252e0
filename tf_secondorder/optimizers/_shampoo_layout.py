"""Static (Python-side) layout of Shampoo's per-block statistics.

Computed once in ``build`` from the variable shapes: how each variable is
merged and blocked, which block dimensions get a statistic, and which
statistics share a size and exponent so their roots are computed as one
batched op.
"""

import collections
import dataclasses

from tf_secondorder.linalg import BlockPartitioner, merge_dims


@dataclasses.dataclass(frozen=True)
class Factor:
    """One Kronecker factor: statistic and preconditioner of one block axis."""

    variable: int  # index of the model variable
    block: int  # index of the block within the variable
    axis: int  # axis of the block it preconditions
    size: int  # side of the square statistic
    exponent: int  # p in (S + εI)^(-1/p)
    index: int  # position in the optimizer's flat factor lists
    dtype: str  # dtype the factor is computed in (float32 or float64)

    @property
    def tag(self):
        return f"b{self.block}_a{self.axis}"


@dataclasses.dataclass
class VariablePlan:
    shape: tuple
    merged_shape: list
    partitioner: BlockPartitioner
    factors: list
    factors_of_block: list


class ShampooLayout:
    """Plans for a list of variable shapes.

    Args:
        shapes: the variables' shapes.
        block_size: the longest block side; also the merge limit.
        max_preconditioned_dim: merged dimensions longer than this get no
            factor (only grafting), e.g. a vocabulary. None: no limit.
        exponent_override: p for every root instead of 2·order.
        dtypes: compute dtype of each variable's factors (default float32).
    """

    def __init__(
        self,
        shapes,
        block_size,
        max_preconditioned_dim=None,
        exponent_override=None,
        dtypes=None,
    ):
        dtypes = dtypes or ["float32"] * len(shapes)
        self.plans = []
        self.factors = []
        self.root_groups = collections.defaultdict(list)
        for variable, shape in enumerate(shapes):
            shape = tuple(int(d) for d in shape)
            merged = merge_dims(shape, block_size)
            partitioner = BlockPartitioner(merged, block_size)
            exponent = exponent_override or 2 * len(merged)
            preconditioned_axes = [
                axis
                for axis, dim in enumerate(merged)
                if max_preconditioned_dim is None or dim <= max_preconditioned_dim
            ]
            factors_of_block = []
            plan_factors = []
            for block, block_shape in enumerate(partitioner.block_shapes):
                block_factors = []
                for axis in preconditioned_axes:
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
                    key = (factor.size, exponent, factor.dtype)
                    self.root_groups[key].append(factor.index)
                    block_factors.append(factor)
                    plan_factors.append(factor)
                factors_of_block.append(block_factors)
            self.plans.append(
                VariablePlan(shape, merged, partitioner, plan_factors, factors_of_block)
            )
        self.root_groups = dict(self.root_groups)
