"""Static (Python-side) layout of blocked Kronecker preconditioners.

Computed once in `build` from the variable shapes: how each variable is
merged and blocked, which block axes get a statistic (a *factor*), and how
the factors are stored. Blocks of one shape (with the same preconditioned
axes and dtype), from any variables, form a *group*; the factors of one
axis of a group are the rows of one *slot*, a stacked state [rows, n, n]
(statistics; Shampoo's roots; SOAP's bases). Every per-step and refresh
computation then runs once per group or slot, batched over its rows, so the
traced graph grows with the number of distinct block shapes, not with the
number of blocks.

The elementwise state (Shampoo's grafting and momentum, SOAP's moments)
lives in *parts*: a group's stack [count, *shape] holds the elements of its
blocks, and one flat vector per dtype holds those of the variables without
factors (vectors, left-out variables), concatenated in variable order. So
that state, too, is one variable and one computation per part, not per
model variable.
"""

import dataclasses
import math

from tf_secondorder.linalg import BlockPartitioner, merge_dims


@dataclasses.dataclass(frozen=True)
class Factor:
    """One Kronecker factor: the statistic of one axis of one block."""

    variable: int  # index of the model variable
    axis: int  # axis of the block it preconditions
    size: int  # side of the square statistic
    exponent: int  # p in (S + εI)^(-1/p) (Shampoo)
    index: int  # position in the layout's flat factor list
    dtype: str  # dtype the factor is computed in (float32 or float64)
    slot: int  # the stacked state holding it
    row: int  # its row in that slot
    origin: tuple  # where its block starts in the variable's merged shape


@dataclasses.dataclass(frozen=True)
class Member:
    """One region of one variable inside a group: rows
    [offset, offset + count) of the group's stacks."""

    variable: int
    region: int  # index into the variable's partitioner.regions
    offset: int
    count: int


@dataclasses.dataclass(frozen=True)
class Slot:
    """The stacked factors of one axis of a group: [count, size, size]."""

    group: int
    axis: int
    size: int
    count: int
    exponent: int
    dtype: str

    @property
    def tag(self):
        """A name for the slot's variables, unique within a layout."""
        return f"g{self.group}_a{self.axis}"


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Blocks of equal shape, preconditioned axes and dtype, from any
    variables, stacked in member order."""

    shape: tuple  # the blocks' shape
    axes: tuple  # the axes that have a factor
    dtype: str
    members: tuple  # Member, in stack order
    count: int  # blocks in the stack
    slots: tuple  # slot index of each axis in `axes`


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of the elementwise state: a group's stack
    (`kind == "stack"`, `index` the group) or the flat vector of the
    variables without factors of one dtype (`kind == "flat"`, `index` into
    `BlockLayout.flats`)."""

    kind: str
    index: int
    shape: tuple
    dtype: str

    @property
    def tag(self):
        """A name for the part's variables, unique within a layout."""
        if self.kind == "stack":
            return f"g{self.index}_{'x'.join(str(d) for d in self.shape[1:])}"
        return f"flat{self.index}_{self.dtype}"


@dataclasses.dataclass(frozen=True)
class Flat:
    """Variables without factors of one dtype: `members` are (variable,
    begin, size) in a vector of `size` elements."""

    dtype: str
    members: tuple
    size: int


@dataclasses.dataclass
class VariablePlan:
    """How one variable is preconditioned. A variable with no factors (a
    zero-size one, one left out, or one whose every axis is too long) is
    only grafted / Adam-updated. `members[r]` is (group, Member) of the
    partitioner's region r; a variable with members has its blocks stacked
    (a block whose every side is 1 is in a group without factors)."""

    shape: tuple
    merged_shape: list
    partitioner: BlockPartitioner
    factors: list
    members: dict

    @property
    def preconditioned(self):
        return bool(self.factors)


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
        grouped = {}  # key -> list of (variable, region index, count)
        unfactored = []
        self.plans = []
        for variable, shape in enumerate(shapes):
            shape = tuple(int(d) for d in shape)
            if 0 in shape:
                self.plans.append(VariablePlan(shape, [0], None, [], {}))
                unfactored.append(variable)
                continue
            merged = merge_dims(shape, block_size)
            partitioner = BlockPartitioner(merged, block_size)
            axes = tuple(
                axis
                for axis, dim in enumerate(merged)
                if preconditioned[variable]
                and (max_preconditioned_dim is None or dim <= max_preconditioned_dim)
            )
            plan = VariablePlan(shape, merged, partitioner, [], {})
            self.plans.append(plan)
            if not axes:
                unfactored.append(variable)
                continue
            for r, region in enumerate(partitioner.regions):
                # A side of length 1 (a remainder row, e.g. 257 = 256 + 1)
                # couples nothing: its 1×1 factor would only rescale the
                # block (which grafting undoes) or flip its sign (a basis).
                kept = tuple(a for a in axes if region.block_shape[a] > 1)
                key = (region.block_shape, kept, dtypes[variable])
                grouped.setdefault(key, []).append((variable, r, region.origins()))
        flat = {}  # dtype -> [(variable, begin, size)]
        for variable in unfactored:
            members = flat.setdefault(dtypes[variable], [])
            begin = members[-1][1] + members[-1][2] if members else 0
            members.append((variable, begin, math.prod(self.plans[variable].shape)))
        self.groups, self.slots, self.factors = [], [], []
        for (shape, axes, dtype), entries in grouped.items():
            number = len(self.groups)
            members, offset = [], 0
            origins = []
            for variable, r, starts in entries:
                count = len(starts)
                origins += starts
                member = Member(variable, r, offset, count)
                members.append(member)
                self.plans[variable].members[r] = (number, member)
                offset += count
            exponent = exponent_override or 2 * len(axes)
            slots = []
            for axis in axes:
                slot = len(self.slots)
                slots.append(slot)
                self.slots.append(
                    Slot(number, axis, shape[axis], offset, exponent, dtype)
                )
                for member in members:
                    for k in range(member.count):
                        factor = Factor(
                            variable=member.variable,
                            axis=axis,
                            size=shape[axis],
                            exponent=exponent,
                            index=len(self.factors),
                            dtype=dtype,
                            slot=slot,
                            row=member.offset + k,
                            origin=origins[member.offset + k],
                        )
                        self.factors.append(factor)
                        self.plans[member.variable].factors.append(factor)
            self.groups.append(
                BlockGroup(shape, axes, dtype, tuple(members), offset, tuple(slots))
            )
        self.flats = [
            Flat(dtype, tuple(members), members[-1][1] + members[-1][2])
            for dtype, members in flat.items()
        ]
        self.flat_of = {
            variable: (index, begin, size)
            for index, part in enumerate(self.flats)
            for variable, begin, size in part.members
        }
        self.parts = [
            Part("stack", n, (group.count, *group.shape), group.dtype)
            for n, group in enumerate(self.groups)
        ] + [
            Part("flat", i, (part.size,), part.dtype)
            for i, part in enumerate(self.flats)
        ]
