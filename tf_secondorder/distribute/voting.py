"""Majority vote of the replicas' signs (Bernstein et al. 2018, 2019).

    ĝ = sign(Σ_i v_i),  v_i = sign(decode(c_i)) ∈ {−1, 0, +1},  sign(0) = +1 in ĝ

A replica's vote on an element is 0 only where its decoded value is 0 (a
scaled sign whose scale is 0); it then abstains there. Two paths give
the same ĝ bit for bit (signs and integer counts are exact):

**all-gather**: every replica all-gathers every replica's code (W int32
words) and tallies all d elements itself: one collective; it hands over W
words and N·W arrive.

**sharded**: the vote bits are packed 32 to an int32 word, W_v words per bit
plane (plane 0: v < 0; plane 1, only for compressors that can decode a 0: v = 0),
and cut into N contiguous shards of S = ⌈W_v/N⌉ words; replica j owns
shard j.

    1. all_to_all: shard j of this replica's planes goes to replica j;
    2. owner j: Σ_i v_i over its shard, result bit = (sum < 0), S words;
    3. all_to_all: owner j's S words go to every replica (N copies);
       every replica unpacks all N shards into ĝ.

Per replica and step (Sign: one plane, S ≈ d/32/N words) both collectives
take and deliver N·S words, so about d bits of votes go up and d bits of
results come back: sent = received ≈ 2·d/8 bytes at any N, where the
all-gather delivers N·d/8. Step 3 is an all_to_all of N copies rather than
an all_gather of one: the links carry the same (N−1)·S words either way, and
so the byte counters (what a replica hands to collectives and what they
deliver) show what an owner really sends.

Why all_to_all: TF 2.21's `ReplicaContext` offers all_reduce and all_gather
only. A reduce-scatter of per-replica counts would move an int32 per element
(32 bits, not 1), and `CollectiveReduceScatterV2` has no CPU implementation
under MirroredStrategy ("CollectiveRegistry::Lookup did not find collective
implementation", measured on 4 and 8 logical CPUs), while
`CollectiveAllToAllV2` runs there and under MultiWorkerMirroredStrategy
(`compat/collectives.py`).

**The choice** (`path="auto"`): sharded when it delivers fewer bytes to a
replica than the all-gather, N·(planes·S + 1) + N·S words against
N·(W + 1) (each + 1 is the step's "not finite" flag), and the strategy has
an all_to_all kernel; otherwise the all-gather, which needs one collective
instead of two. With Sign that is the all-gather at 2 replicas (equal bytes
at best) and the sharded vote from 3 on (once the signs fill more than 2
words). Without an all_to_all kernel (a strategy whose cross-device ops are
not TF's collective ops, e.g. TPUStrategy) the sharded vote would be
emulated by gathers that deliver more than the all-gather, so "auto" keeps
the all-gather; `Channel.all_to_all(..., emulate=False)` finds out without
sending anything.
"""

import functools

import tensorflow as tf

from tf_secondorder import validation
from tf_secondorder.compression import packing
from tf_secondorder.compression.compressor import num_elements
from tf_secondorder.compression.signs import Sign
from tf_secondorder.distribute.aggregators import GatherMean

PATHS = ("auto", "gather", "sharded")


def shard_words(vote_words, num_replicas):
    """S: int32 words of one plane in each replica's shard."""
    return -(-vote_words // num_replicas)


def received_words(num_replicas, gather_words, vote_words, planes):
    """(all-gather, sharded) int32 words the collectives deliver to a replica
    in one step, the "not finite" flag included."""
    n = num_replicas
    length = shard_words(vote_words, n)
    return n * (gather_words + 1), n * (planes * length + 1) + n * length


def sharded_is_cheaper(num_replicas, gather_words, vote_words, planes):
    """The rule of "auto": strictly fewer words delivered (a tie goes to the
    all-gather's single collective)."""
    gather, sharded = received_words(num_replicas, gather_words, vote_words, planes)
    return sharded < gather


class MajorityVote(GatherMean):
    """The vote of the module docstring.

    Args:
        compressor: a sign-based compressor (`Sign`, `ScaledSign`).
        path: `"auto"` (the rule above), `"gather"` or `"sharded"` (emulated
            by gathers, and counted so, where there is no all_to_all kernel).
    """

    def __init__(self, compressor, path="auto"):
        super().__init__(compressor)
        self.path = validation.choice("path", path, PATHS)
        # Decoded signs are ±1, never 0: the abstain plane would be all zeros.
        self.planes = 1 if type(compressor) is Sign else 2
        # The path of the last trace ("gather" or "sharded"), for tests.
        self.traced_path = None

    def _exchange_and_combine(self, channel, wires, inputs, seeds):
        shapes = [tuple(x.shape) for x in inputs]
        if self.path != "gather" and (
            self.path == "sharded" or self._sharded_is_cheaper(shapes, channel)
        ):
            result = self._sharded(channel, wires, shapes, seeds)
            if result is not None:
                self.traced_path = "sharded"
                return result
        self.traced_path = "gather"
        return super()._exchange_and_combine(channel, wires, inputs, seeds)

    def combine(self, received, shapes, seeds, num_replicas):
        out = []
        for w, shape, s in zip(received, shapes, seeds):
            votes = tf.add_n(
                [tf.sign(d) for d in self.decoded(w, shape, s, num_replicas)]
            )
            out.append(tf.where(votes >= 0, 1.0, -1.0))
        return out

    # -- the sharded path ----------------------------------------------------------

    def _sharded_is_cheaper(self, shapes, channel):
        gather_words = sum(
            packing.word_count(num_elements(s), d)
            for shape in shapes
            for s, d in self.compressor.wire_specs(shape)
        )
        return sharded_is_cheaper(
            channel.num_replicas, gather_words, _vote_words(shapes), self.planes
        )

    def _sharded(self, channel, wires, shapes, seeds):
        n = channel.num_replicas
        length = shard_words(_vote_words(shapes), n)
        rows = self._vote_rows(wires, shapes, seeds, n, length)
        # "auto" must not pay for an emulated all_to_all: None sends nothing.
        exchanged = channel.all_to_all([[rows]], emulate=self.path == "sharded")
        if exchanged is None:
            return None
        shard = self._tally(exchanged[0][0], length)
        ((results,),) = channel.all_to_all([[tf.tile(shard[None], [n, 1])]])
        return self._unpack(results, shapes)

    @functools.cached_property
    def _vote_rows(self):
        def rows(wires, shapes, seeds, n, length):
            """[n, planes·length] int32: row j = this replica's shard j of
            each plane."""
            planes = [[] for _ in range(self.planes)]
            for wire, shape, seed in zip(wires, shapes, seeds):
                if self.planes == 1:
                    # Sign's wire is the packed bits of x < 0, plane 0 itself.
                    planes[0].append(wire[0])
                    continue
                decoded = tf.reshape(self.compressor.decode(wire, shape, seed), [-1])
                planes[0].append(_pack(decoded < 0))
                planes[1].append(_pack(tf.equal(decoded, 0.0)))
            blocks = []
            for words in planes:
                flat = tf.concat(words, 0)
                flat = tf.pad(flat, [[0, n * length - int(flat.shape[0])]])
                blocks.append(tf.reshape(flat, [n, length]))
            return tf.concat(blocks, 1)

        return self._fused(rows)

    @functools.cached_property
    def _tally(self):
        def tally(received, length):
            """This owner's S result words from the [n, planes·length] votes."""
            n = int(received.shape[0])
            bits = 32 * length

            def plane(p):
                words = received[:, p * length : (p + 1) * length]
                return tf.reshape(packing.unpack_bits(words, 1, n * bits), [n, bits])

            # +1 or −1 per replica; an abstaining one (plane 1) counts 0.
            votes = 1 - 2 * plane(0)
            if self.planes == 2:
                votes -= plane(1)
            return _pack(tf.reduce_sum(votes, axis=0) < 0)

        return self._fused(tally)

    @functools.cached_property
    def _unpack(self):
        def unpack(results, shapes):
            flat = tf.reshape(results, [-1])
            out, offset = [], 0
            for shape in shapes:
                count = num_elements(shape)
                words = packing.words_for(count, 1)
                bits = packing.unpack_bits(flat[offset : offset + words], 1, count)
                out.append(tf.reshape(1.0 - 2.0 * tf.cast(bits, tf.float32), shape))
                offset += words
            return out

        return self._fused(unpack)

    def _fused(self, fn):
        """`fn` as one XLA computation where the compressor allows (as `OneRound`
        does: unfused elementwise passes over millions of bits cost about
        what the 1-bit exchange does). Python arguments (shapes, sizes) are
        part of the trace."""
        return tf.function(
            fn, jit_compile=self.compressor.jit_compatible, autograph=False
        )


def _pack(mask):
    return packing.pack_bits(tf.cast(tf.reshape(mask, [-1]), tf.int32), 1)


def _vote_words(shapes):
    """Words of one bit plane: each tensor starts a new word, as its wire does."""
    return sum(packing.words_for(num_elements(s), 1) for s in shapes)
