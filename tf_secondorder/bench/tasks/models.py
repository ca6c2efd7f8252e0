"""Models shared by several tasks (and by `tf_secondorder.bench.scale`)."""

import keras


def byte_transformer(
    context=128,
    d_model=128,
    heads=4,
    mlp=512,
    blocks=2,
    seed=0,
    vocabulary=256,
    causal=True,
):
    """A pre-norm byte-level Transformer (logits over 256 bytes): a language
    model with `causal`, an encoder without; `vocabulary` may add tokens
    (a mask) to the input."""
    keras.utils.set_random_seed(seed)
    tokens = keras.Input((context,), dtype="int32")
    x = keras.layers.Embedding(vocabulary, d_model)(tokens)
    positions = keras.ops.arange(context)
    x = x + keras.layers.Embedding(context, d_model)(positions)
    for _ in range(blocks):
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.MultiHeadAttention(heads, d_model // heads)(
            h, h, use_causal_mask=causal
        )
        x = x + h
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.Dense(mlp, activation="gelu")(h)
        x = x + keras.layers.Dense(d_model)(h)
    x = keras.layers.LayerNormalization()(x)
    return keras.Model(tokens, keras.layers.Dense(256)(x), name="byte_transformer")
