"""Bidirectional compression with memory (SPEC §4.4; Artemis, MCM, DeepSpeed 1-bit).

With `aggregation="bidirectional"` each replica is the server of 1/N of the
flattened gradient. Per step, replica i with worker memory e_i and (as the
server of chunk r = i) server memory s_i, N replicas, C the compressor:

    p_i = x_i + e_i;   split p_i into N chunks p_i^(j) of L = ⌈d/N⌉ elements
    c_i^(j) = C(p_i^(j));   e_i ← p_i − [D(c_i^(1)), ..., D(c_i^(N))]
    all_to_all: chunk j's code goes to replica j
    server r:   a_r = (1/N) Σ_i D(c_i^(r));  q_r = a_r + s_r
                z_r = C(q_r);  s_r ← q_r − D(z_r)
    all_gather: every replica gets every z_r;  ĝ = [D(z_1), ..., D(z_N)]

Each replica sends d·b/N·(N−1) bits in the all_to_all and receives as many,
then sends d·b/N and receives d·b in the all_gather: O(d·b) per replica at
any N, where an all_gather of every replica's whole code delivers N·d·b.
Every replica decodes the same ĝ, so replicas stay in sync. Without memory
(`error_feedback=False`) e and s stay zero.
"""

import tensorflow as tf


def check_compressor(compressor):
    """Raises unless `compressor` supports the chunked two-way protocol."""
    if compressor is None:
        raise ValueError(
            "`aggregation='bidirectional'` compresses in both directions and "
            "needs a compressor. Received: compression=None"
        )
    if not compressor.one_round or compressor.shared_randomness:
        raise ValueError(
            "`aggregation='bidirectional'` needs a one-round compressor whose "
            "code a server can decode alone (not powersgd or randomk). "
            f"Received: compression={compressor.name!r}"
        )


def chunk_length(total, num_replicas):
    return -(-total // num_replicas)


def _seed(chunk, stream):
    return tf.stack([tf.cast(chunk, tf.int64), tf.cast(stream, tf.int64)])


def bidirectional_mean(
    compressor, channel, inputs, worker_memories, server_memory, step
):
    """The aggregate of one step (replica context).

    Args:
        compressor: a `Compressor` passing `check_compressor`.
        channel: the step's `Channel`.
        inputs: this replica's float32 tensors x_i.
        worker_memories: tensors like `inputs` (e_i), or None.
        server_memory: float32 [L] (s_i), or None.
        step: int64 scalar, the step number (for compressor randomness).

    Returns:
        (aggregates like `inputs`, new worker memories or None, new server
        memory or None).
    """
    n = channel.num_replicas
    me = tf.cast(channel.context.replica_id_in_sync_group, tf.int64)
    shapes = [tuple(x.shape) for x in inputs]
    sizes = [int(x.shape.num_elements()) for x in inputs]
    total = sum(sizes)
    length = chunk_length(total, n)
    flat = tf.concat([tf.reshape(x, [-1]) for x in inputs], 0)
    if worker_memories is not None:
        flat += tf.concat([tf.reshape(e, [-1]) for e in worker_memories], 0)
    chunks = tf.reshape(tf.pad(flat, [[0, n * length - total]]), [n, length])

    # Worker → servers. Randomness differs per (step, replica, chunk).
    stream = step * n + me
    wires, decoded = [], []
    for j in range(n):
        wire = compressor.compress(chunks[j], _seed(j, stream))
        wires.append(wire)
        decoded.append(compressor.decompress(wire, (length,), _seed(j, stream)))
    new_worker = None
    if worker_memories is not None:
        error = tf.reshape(chunks - tf.stack(decoded), [-1])[:total]
        new_worker = [
            tf.reshape(part, shape)
            for part, shape in zip(tf.split(error, sizes), shapes)
        ]
    stacked = [tf.stack([wire[k] for wire in wires]) for k in range(len(wires[0]))]
    (received,) = channel.all_to_all([stacked])

    # Server of chunk `me`: mean of the replicas' codes, compressed again.
    mean = tf.add_n(
        [
            compressor.decompress(
                [w[i] for w in received], (length,), _seed(me, step * n + i)
            )
            for i in range(n)
        ]
    ) / float(n)
    served = mean if server_memory is None else mean + server_memory
    server_seed = _seed(n + me, step * n + me)
    reply = compressor.compress(served, server_seed)
    new_server = None
    if server_memory is not None:
        new_server = served - compressor.decompress(reply, (length,), server_seed)

    # Servers → everyone.
    (gathered,) = channel.all_gather([reply])
    parts = [
        compressor.decompress(
            [w[r] for w in gathered], (length,), _seed(n + r, step * n + r)
        )
        for r in range(n)
    ]
    aggregate = tf.concat(parts, 0)[:total]
    aggregates = [
        tf.reshape(part, shape)
        for part, shape in zip(tf.split(aggregate, sizes), shapes)
    ]
    return aggregates, new_worker, new_server
