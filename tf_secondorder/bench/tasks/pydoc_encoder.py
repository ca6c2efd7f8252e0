"""`pydoc-encoder`: a bidirectional byte-level Transformer encoder trained
by masked-byte prediction (BERT's 15%: of the chosen positions 80% become a
mask token, 10% a random byte, 10% stay) on the pydoc corpus; the metric is
the held-out loss on the masked positions of fixed windows and masks."""

import keras
import numpy as np
import tensorflow as tf

from tf_secondorder.bench.tasks.data import pydoc_splits
from tf_secondorder.bench.tasks.models import byte_transformer
from tf_secondorder.bench.tasks.registry import Task, register

MASK_RATE = 0.15
MASK_TOKEN = 256  # one past the bytes


def _mask(windows, rng):
    """(inputs, sample weights) for masked-byte prediction of `windows`."""
    chosen = rng.random(windows.shape) < MASK_RATE
    action = rng.random(windows.shape)
    inputs = windows.copy()
    inputs[chosen & (action < 0.8)] = MASK_TOKEN
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    inputs[randomised] = rng.integers(0, 256, size=int(randomised.sum()))
    return inputs, chosen.astype("float32")


@register(
    "pydoc-encoder",
    steps=600,
    eval_every=50,
    description="a masked-byte Transformer encoder on CPython's pydoc text; "
    "held-out masked-byte loss",
)
def pydoc_encoder(
    steps=600, context=128, batch_size=32, eval_windows=256, data_dir=None
):
    """`pydoc-encoder`: masked-byte Transformer encoder on the pydoc corpus."""
    train, held_out = pydoc_splits(data_dir)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make_dataset(seed, batch_size=batch_size):
        corpus = tf.constant(train.astype("int32"))
        starts = tf.data.Dataset.random(seed=seed).map(
            lambda r: tf.math.floormod(r, len(train) - context)
        )

        def masked(start, draw):
            window = corpus[start : start + context]
            uniform = tf.random.stateless_uniform([2, context], draw)
            chosen = uniform[0] < MASK_RATE
            replaced = tf.where(
                uniform[1] < 0.8,
                MASK_TOKEN,
                tf.where(
                    uniform[1] < 0.9,
                    tf.random.stateless_uniform(
                        [context], draw + 1, maxval=256, dtype=tf.int32
                    ),
                    window,
                ),
            )
            inputs = tf.where(chosen, replaced, window)
            return inputs, window, tf.cast(chosen, tf.float32)

        draws = tf.data.Dataset.random(seed=seed + 1).map(
            lambda r: tf.stack([r, r // 2])
        )
        data = tf.data.Dataset.zip(starts, draws).map(masked)
        return data.batch(batch_size, drop_remainder=True).prefetch(2)

    rng = np.random.default_rng(1234)
    starts = rng.integers(0, len(held_out) - context, size=eval_windows)
    windows = np.stack([held_out[s : s + context] for s in starts]).astype("int32")
    eval_x, eval_weights = _mask(windows, rng)
    eval_x = tf.constant(eval_x)

    def evaluate(model):
        logits = model.predict(eval_x, batch_size=64, verbose=0)
        per_byte = keras.losses.sparse_categorical_crossentropy(
            windows, logits, from_logits=True
        )
        per_byte = np.asarray(per_byte)
        return float((per_byte * eval_weights).sum() / eval_weights.sum())

    return Task(
        name="pydoc-encoder",
        steps=steps,
        eval_every=50,
        batch_size=batch_size,
        make_model=lambda seed: byte_transformer(
            context=context, seed=seed, vocabulary=MASK_TOKEN + 1, causal=False
        ),
        make_dataset=make_dataset,
        evaluate=evaluate,
        loss=loss_fn,
        info={
            "metric": "held-out masked-byte loss (nats/byte)",
            "source": "TFDS pydoc_topics (built locally)",
            "tokens_per_step": batch_size * context,
        },
    )
