"""Elementwise state in the layout's parts (see `layout`): model-shaped
tensors to parts and back.

A part is a group's stack of blocks [count, *shape] or the flat vector of
the variables without factors of one dtype. Gradients go into parts once per
step; every elementwise update (grafting, moments, momentum) then runs once
per part, and the deltas come back per variable once. Pure tensor
functions: no Keras, no variables.
"""

import numpy as np
import tensorflow as tf

from tf_secondorder.preconditioning import kronecker


def to_parts(layout, tensors):
    """({part: tensor in the part's dtype}, {part: bool mask}) of the parts
    that `tensors` ({variable: tensor of its shape}) reach. A part some of
    whose variables are missing holds zeros for them, and its mask (over the
    stack's rows, or the vector's elements) says which entries are present."""
    stacks, row_masks = kronecker.to_stacks(layout, tensors)
    out, masks = {}, {}
    index_of = {(p.kind, p.index): k for k, p in enumerate(layout.parts)}
    for number, stack in stacks.items():
        key = index_of[("stack", number)]
        out[key] = tf.cast(stack, layout.parts[key].dtype)
        if number in row_masks:
            masks[key] = row_masks[number]
    for number, flat in enumerate(layout.flats):
        present = [v in tensors for v, _, _ in flat.members]
        if not any(present):
            continue
        key = index_of[("flat", number)]
        pieces = [
            tf.reshape(tf.cast(tensors[v], flat.dtype), [-1])
            if here
            else tf.zeros([size], flat.dtype)
            for (v, _, size), here in zip(flat.members, present)
        ]
        out[key] = pieces[0] if len(pieces) == 1 else tf.concat(pieces, axis=0)
        if not all(present):
            sizes = [size for _, _, size in flat.members]
            masks[key] = tf.constant(np.repeat(present, sizes))
    return out, masks


def from_parts(layout, parts, like):
    """{variable: tensor with the shape and dtype of like[variable]} for the
    variables in `like`, from `parts` (every part they reach): the inverse
    of `to_parts`."""
    shapes = {v: t.shape for v, t in like.items()}
    stacks = {
        layout.parts[k].index: t
        for k, t in parts.items()
        if layout.parts[k].kind == "stack"
    }
    stacked = [v for v in like if layout.plans[v].members]
    out = kronecker.from_stacks(layout, stacks, stacked, shapes) if stacked else {}
    flat_key = {
        layout.parts[k].index: k for k in parts if layout.parts[k].kind == "flat"
    }
    for variable in like:
        if variable in out:
            continue
        number, begin, size = layout.flat_of[variable]
        vector = parts[flat_key[number]]
        if size != layout.flats[number].size:
            vector = vector[begin : begin + size]
        out[variable] = tf.reshape(vector, shapes[variable])
    return {v: tf.cast(t, like[v].dtype) for v, t in out.items()}


def keep_missing(mask, new, old):
    """`new` where `mask` (over the leading axis) is True, else `old`: the
    state of variables without a gradient this step stays as it was."""
    if mask is None:
        return new
    mask = tf.reshape(mask, [-1] + [1] * (new.shape.rank - 1))
    return tf.where(mask, new, old)
