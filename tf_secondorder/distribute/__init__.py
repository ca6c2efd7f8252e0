"""How replicas talk: the communication options and the pieces behind them.

- `config`: `CommunicationConfig`, the options, validated once;
- `communicator`: the order of one step's pieces (reduce, guard, update);
- `channel`: a step's collectives, batched and counted;
- `aggregators`, `bidirectional`, `artemis`, `voting`: aggregators over the channel;
- `error_feedback`: the memory wrapped around any aggregator;
- `seeds`: the seed of each compressor call;
- `local_sgd`, `saddle`: pieces of the cross-replica step;
- `sharding`: splitting independent work (roots) across replicas;
- `launch`: worker processes on 127.0.0.1 for MultiWorkerMirroredStrategy;
- `cluster`: `multi_worker_strategy`, one that survives slow networks.

The compressors themselves are in `tf_secondorder.compression`.
"""

from tf_secondorder.distribute.cluster import multi_worker_strategy
from tf_secondorder.distribute.config import CommunicationConfig

__all__ = ["CommunicationConfig", "multi_worker_strategy"]
