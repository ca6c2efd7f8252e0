"""`pydoc-lm` and `pydoc-gpt2`: byte-level language models on CPython's
pydoc text, on the same windows and held-out loss, so their results compare.

`pydoc-lm` is the package's own Transformer (`models.byte_transformer`);
`pydoc-gpt2` is keras-hub's GPT-2 of the same shape. keras-hub needs its own
install (see `HUB_INSTALL`), so it is imported only when `pydoc-gpt2` is
built, where a missing install becomes a TaskUnavailable saying what to do.
"""

import dataclasses
import hashlib

import keras
import numpy as np
import tensorflow as tf

from tf_secondorder.bench.tasks.data import pydoc_splits
from tf_secondorder.bench.tasks.models import byte_transformer
from tf_secondorder.bench.tasks.registry import Task, TaskUnavailable, register


@register(
    "pydoc-lm",
    steps=2000,
    eval_every=100,
    description="a byte-level Transformer language model on CPython's pydoc "
    "text; held-out loss",
)
def pydoc_language_model(
    steps=2000, context=128, batch_size=32, eval_windows=256, data_dir=None
):
    """`pydoc-lm`: byte-level Transformer LM on pydoc_data.topics; last 10% held out."""
    train, held_out = pydoc_splits(data_dir)
    data = np.concatenate([train, held_out])
    sha256 = hashlib.sha256(data.tobytes()).hexdigest()

    def make_dataset(seed, batch_size=batch_size):
        starts = tf.data.Dataset.random(seed=seed).map(
            lambda r: tf.math.floormod(r, len(train) - context - 1)
        )
        corpus = tf.constant(train.astype("int32"))

        def window(start):
            chunk = corpus[start : start + context + 1]
            return chunk[:-1], chunk[1:]

        return starts.map(window).batch(batch_size, drop_remainder=True).prefetch(2)

    rng = np.random.default_rng(1234)
    starts = rng.integers(0, len(held_out) - context - 1, size=eval_windows)
    windows = np.stack([held_out[s : s + context + 1] for s in starts]).astype("int32")
    eval_x, eval_y = tf.constant(windows[:, :-1]), windows[:, 1:]
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def evaluate(model):
        logits = model.predict(eval_x, batch_size=64, verbose=0)
        return float(loss_fn(eval_y, logits))

    return Task(
        name="pydoc-lm",
        steps=steps,
        eval_every=100,
        batch_size=batch_size,
        make_model=lambda seed: byte_transformer(context=context, seed=seed),
        make_dataset=make_dataset,
        evaluate=evaluate,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        info={
            "corpus_sha256": sha256,
            "corpus_bytes": int(len(data)),
            "metric": "held-out loss (nats/byte)",
            "source": "TFDS pydoc_topics (built locally)",
            "tokens_per_step": batch_size * context,
        },
    )


# keras-hub requires tensorflow-text, which requires the full `tensorflow`
# build: with the `cpu` extra's tensorflow-cpu, pip would install a second
# TensorFlow next to it. Hence the `gpu` extra, in a fresh environment.
HUB_INSTALL = 'pip install -e ".[gpu,bench,hub]"'


def keras_hub_module():
    """keras_hub, or TaskUnavailable saying how to install it."""
    try:
        import keras_hub  # optional: the `hub` extra, in its own environment
    except ImportError as e:
        raise TaskUnavailable(
            "task 'pydoc-gpt2' needs keras-hub, whose tensorflow-text requires "
            "the full `tensorflow` build (not tensorflow-cpu): in a fresh "
            f"virtual environment, {HUB_INSTALL}; its `tensorflow` wheel runs "
            f'on CPUs too (README.md, "keras-hub models"). ({e})'
        ) from e
    return keras_hub


def gpt2_language_model(
    context=128,
    vocabulary_size=256,
    hidden_dim=128,
    num_heads=4,
    intermediate_dim=512,
    num_layers=2,
    seed=0,
):
    """keras-hub's GPT-2 built from a config (no preset, nothing downloaded).

    `keras_hub.models.GPT2Backbone` with logits from its tied token embedding
    (`backbone.token_embedding(h, reverse=True)`, a `ReversibleEmbedding`),
    as `keras_hub.models.GPT2CausalLM` computes them. Token ids
    `[batch, context]` -> logits `[batch, context, vocabulary_size]`; every
    position attends (padding mask of ones). Byte ids are those of
    `keras_hub.tokenizers.ByteTokenizer(lowercase=False)`. No dropout, as in
    `pydoc-lm`. The shapes Shampoo meets: a `[vocabulary, hidden]` embedding
    used at both ends, 3-D attention kernels (`[hidden, heads, head_dim]`,
    `[heads, head_dim, hidden]`), LayerNorm vectors, 2-D biases.
    """
    keras_hub = keras_hub_module()
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_heads=num_heads,
        hidden_dim=hidden_dim,
        intermediate_dim=intermediate_dim,
        dropout=0.0,
        max_sequence_length=context,
    )
    tokens = keras.Input((context,), dtype="int32", name="token_ids")
    hidden = backbone(
        {"token_ids": tokens, "padding_mask": keras.ops.ones_like(tokens)}
    )
    logits = backbone.token_embedding(hidden, reverse=True)
    return keras.Model(tokens, logits, name="pydoc_gpt2")


@register(
    "pydoc-gpt2",
    steps=2000,
    eval_every=100,
    description="keras-hub's GPT-2 (from a config) on pydoc-lm's text and "
    f"windows; needs `{HUB_INSTALL}` in its own environment",
)
def pydoc_gpt2(steps=2000, context=128, batch_size=32, eval_windows=256, data_dir=None):
    """`pydoc-gpt2`: keras-hub's GPT-2 (`gpt2_language_model`) on pydoc-lm's data.

    The same corpus, windows, batches and held-out loss as `pydoc-lm`, and a
    model of its shape (2 blocks, width 128, 4 heads, MLP 512, context 128),
    so the two tasks' results compare; the model is keras-hub's, with the
    output projection tied to the token embedding (`pydoc-lm` has its own).
    """
    keras_hub_module()  # says what to install before any data is built
    task = pydoc_language_model(
        steps=steps,
        context=context,
        batch_size=batch_size,
        eval_windows=eval_windows,
        data_dir=data_dir,
    )
    windows = task.make_dataset

    def make_dataset(seed, batch_size=batch_size):
        # The windows' static shape is [batch, None] (a slice at a random
        # start); keras-hub's position embedding slices its table to the
        # input's length, so its gradient's static shape would be unknown
        # too. The optimizers cope with that; stating the length keeps the
        # traced graph's shapes static all the same.
        shape = (batch_size, context)
        return windows(seed, batch_size).map(
            lambda x, y: (tf.ensure_shape(x, shape), tf.ensure_shape(y, shape))
        )

    return dataclasses.replace(
        task,
        name="pydoc-gpt2",
        make_model=lambda seed: gpt2_language_model(context=context, seed=seed),
        make_dataset=make_dataset,
        info={
            **task.info,
            "model": "keras_hub.models.GPT2Backbone (2 layers, hidden 128, "
            "4 heads, intermediate 512), tied reversible embedding",
        },
    )
