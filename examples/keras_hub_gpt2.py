"""keras-hub's GPT-2, built from a config, trained with Shampoo, SOAP or a
compressed optimizer under MirroredStrategy.

    pip install -e ".[gpu,bench,hub]"    # in its own virtual environment
    python examples/keras_hub_gpt2.py [--optimizer shampoo] [--steps 200]
    python examples/keras_hub_gpt2.py --optimizer adam+int8
    python examples/keras_hub_gpt2.py --vocabulary-size 50257   # GPT-2's vocabulary

Nothing is downloaded: `keras_hub.models.GPT2Backbone` is built from a config
(2 layers, 4 heads, hidden 128, intermediate 512, context 128; no preset) and
wrapped in `keras_hub.models.GPT2CausalLM` without a preprocessor, whose
logits come from the backbone's tied `ReversibleEmbedding`. The text is
CPython's pydoc topics, tokenized with `keras_hub.tokenizers.ByteTokenizer`
(one id per UTF-8 byte); the last 10% is held out. Training runs under
`tf.distribute.MirroredStrategy` over the GPUs, or without one over
`--logical-cpus` (default 2) logical CPU devices.

`--optimizer`: `shampoo`, `soap`, `onebitadam` (Adam, then 1-bit momentum
after `freeze_step`) or `adam`, each optionally `+CODEC` to compress what the
replicas send (`adam+int8`, `adam+scaled_sign`, `adam+sign`, `shampoo+bf16`;
`tfso.compression.names()` lists the codecs). keras-hub needs the full
`tensorflow` build (its tensorflow-text requires it), hence the `gpu` extra in
an environment without tensorflow-cpu; the wheel runs on CPUs too.
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_secondorder as tfso  # noqa: E402

LEARNING_RATES = {"shampoo": 3e-3, "soap": 3e-3, "onebitadam": 1e-3, "adam": 1e-3}


def make_strategy(logical_cpus):
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return tf.distribute.MirroredStrategy()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices)


def make_optimizer(name, learning_rate, max_preconditioned_dim):
    base, _, codec = name.partition("+")
    options = {"compression": codec} if codec else {}
    if base in ("shampoo", "soap"):
        # The token embedding is [vocabulary, hidden]. Shampoo and SOAP cut it
        # into blocks of at most block_size (256) per side and keep a
        # statistic per block axis: with GPT-2's 50257 tokens that is 197
        # row blocks, each with a 256 x 256 statistic of the vocabulary axis
        # (~51 MB in all) and an inverse root (Shampoo) or eigenbasis (SOAP)
        # to recompute at every refresh, for correlations between tokens most
        # of which are rare in any batch. An axis longer than
        # max_preconditioned_dim is left unpreconditioned (Google's
        # distributed Shampoo does the same above 4096 by default, its
        # skip_preconditioning_dim_size_gt): each block keeps only its
        # hidden-axis (128 x 128) factor and, in Shampoo, the grafted Adam
        # step's norm; SOAP keeps the identity basis on that axis. At the
        # default byte vocabulary (256) nothing is left out.
        cls = tfso.Shampoo if base == "shampoo" else tfso.SOAP
        return cls(
            learning_rate,
            precondition_frequency=50,
            max_preconditioned_dim=max_preconditioned_dim,
            **options,
        )
    if base == "onebitadam":
        return tfso.OneBitAdam(learning_rate, **options)
    # A Keras optimizer compresses through tfso.distributed (uncompressed
    # without a codec: it then only counts the bytes).
    return tfso.distributed(keras.optimizers.Adam(learning_rate), **options)


def pydoc_token_ids():
    """CPython's pydoc topics through ByteTokenizer: int32 ids in [0, 256)."""
    from pydoc_data import topics

    import keras_hub

    text = "".join(topics.topics[k] for k in sorted(topics.topics))
    tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    return np.asarray(tokenizer(text), dtype="int32")


def build_model(vocabulary_size, context, num_layers=2, seed=0):
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=num_layers,
        num_heads=4,
        hidden_dim=128,
        intermediate_dim=512,
        dropout=0.0,
        max_sequence_length=context,
    )
    # No preprocessor: the model takes {"token_ids", "padding_mask"} and
    # returns logits over the vocabulary, from the tied embedding.
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def windows(ids, context, batch_size, seed):
    """Endless batches of random windows: inputs and the next ids."""
    corpus = tf.constant(ids)
    offsets = tf.range(context + 1, dtype=tf.int64)

    def window(start):
        chunk = tf.gather(corpus, start + offsets)  # static shape [context + 1]
        tokens = chunk[:-1]
        return {"token_ids": tokens, "padding_mask": tf.ones_like(tokens)}, chunk[1:]

    starts = tf.data.Dataset.random(seed=seed).map(
        lambda r: tf.math.floormod(r, len(ids) - context - 1)
    )
    return starts.map(window).batch(batch_size, drop_remainder=True).prefetch(2)


def held_out_windows(ids, context, count=64):
    starts = np.random.default_rng(1234).integers(0, len(ids) - context - 1, count)
    chunks = np.stack([ids[s : s + context + 1] for s in starts])
    tokens = chunks[:, :-1]
    return {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}, chunks[:, 1:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--optimizer",
        default="shampoo",
        help="shampoo, soap, onebitadam or adam, optionally +CODEC (e.g. adam+int8)",
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument(
        "--vocabulary-size",
        type=int,
        default=256,
        help="rows of the tied embedding, >= 256 (ids above 255 never occur)",
    )
    parser.add_argument(
        "--max-preconditioned-dim",
        type=int,
        default=4096,
        help="Shampoo/SOAP: longer axes (a large vocabulary) are not preconditioned",
    )
    parser.add_argument("--logical-cpus", type=int, default=2)
    args = parser.parse_args(argv)
    base, _, codec = args.optimizer.partition("+")
    if base not in LEARNING_RATES:
        parser.error(f"--optimizer: {base!r} is not one of {sorted(LEARNING_RATES)}")
    if codec and codec not in tfso.compression.names():
        parser.error(f"--optimizer: {codec!r} is not in {tfso.compression.names()}")
    if args.vocabulary_size < 256:
        parser.error("--vocabulary-size must be >= 256 (one id per byte)")
    learning_rate = args.learning_rate or LEARNING_RATES[base]

    try:
        import keras_hub  # noqa: F401
    except ImportError:
        parser.exit(
            2,
            "this example needs keras-hub: in a fresh virtual environment, "
            'pip install -e ".[gpu,bench,hub]" (see README.md)\n',
        )

    strategy = make_strategy(args.logical_cpus)
    ids = pydoc_token_ids()
    split = int(0.9 * len(ids))
    train = windows(ids[:split], args.context, args.batch_size, seed=0)
    held_x, held_y = held_out_windows(ids[split:], args.context)

    with strategy.scope():
        model = build_model(args.vocabulary_size, args.context, args.num_layers)
        optimizer = make_optimizer(
            args.optimizer, learning_rate, args.max_preconditioned_dim
        )
        optimizer.build(model.trainable_variables)
        model.compile(
            optimizer=optimizer,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
        )

    def held_out_loss():
        return model.evaluate(held_x, held_y, batch_size=32, verbose=0)

    print(
        f"GPT2CausalLM from a config: {model.count_params():,} parameters, "
        f"vocabulary {args.vocabulary_size}, {args.optimizer} at lr "
        f"{learning_rate:g} on {strategy.num_replicas_in_sync} replicas",
        flush=True,
    )
    print(f"step 0: held-out loss {held_out_loss():.4f}", flush=True)
    history = model.fit(
        train,
        steps_per_epoch=args.steps,
        epochs=1,
        shuffle=False,  # the dataset shuffles itself
        verbose=0,
        callbacks=[tfso.callbacks.CommunicationStats()],
    )
    print(
        f"step {args.steps}: held-out loss {held_out_loss():.4f} "
        f"(mean training loss {history.history['loss'][-1]:.4f})",
        flush=True,
    )
    if hasattr(optimizer, "root_failures"):
        print(
            f"refreshes {int(optimizer.refreshes.numpy())}, "
            f"root failures {int(optimizer.root_failures.numpy())}"
        )
    stats = optimizer.communication_stats()
    print(
        f"bytes per replica per step {stats['bytes_per_step']} "
        f"(float32: {stats['float32_bytes_per_step']})"
    )


if __name__ == "__main__":
    main()
