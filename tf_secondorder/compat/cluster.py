"""The coordination service of a multi-worker job, configured before the
strategy does it with TensorFlow's defaults.

MultiWorkerMirroredStrategy configures TF's coordination service itself,
with a 10 s heartbeat timeout, unless one is configured already. Over a
slow shared link, where one float32 all-reduce of a large model's gradients
takes longer than that (docs/benchmarks.md, "Multi-worker on a rate-limited
network", has the times), a worker's heartbeats queue behind the gradients,
the leader declares it dead and every worker aborts ("The following tasks
are unhealthy (stopped sending heartbeats)"). The same configuration with a
longer timeout, set first, avoids it.
"""

from tf_secondorder.compat import testing


def configure_coordination_service(cluster_resolver, heartbeat_timeout):
    """Configures the coordination service as MultiWorkerMirroredStrategy
    would, with `heartbeat_timeout` seconds. Returns False (and changes
    nothing) when one is configured already or the cluster is one task."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.distribute import multi_worker_util
    from tensorflow.python.eager import context

    cluster_spec = cluster_resolver.cluster_spec()
    if not cluster_spec.as_dict() or context.context().coordination_service:
        return False
    jobs = [
        coordination_config_pb2.CoordinatedJob(
            name=job, num_tasks=cluster_spec.num_tasks(job)
        )
        for job in ("chief", "worker")
        if job in cluster_spec.jobs
    ]
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=multi_worker_util.coordination_leader(cluster_spec),
        heartbeat_timeout_in_ms=int(heartbeat_timeout * 1000),
        coordinated_jobs=jobs,
    )
    testing.record("coordination_service")
    return True


def heartbeat_timeout_ms():
    """The configured heartbeat timeout in ms (0: TF's default), or None."""
    from tensorflow.python.eager import context

    config = context.context().coordination_service
    return None if config is None else int(config.heartbeat_timeout_in_ms)
