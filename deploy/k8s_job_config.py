"""finpipe's code location for Kubernetes: the same assets, jobs, schedule and sensor as ``finpipe.definitions``,
but every step runs as a Kubernetes Job of its own (dagster-k8s' ``k8s_job_executor``), and the training step
(qlora_adapter) asks for a GPU node and one ``nvidia.com/gpu``.

Serve it from the run-worker image (instance config: deploy/dagster-k8s.yaml):

    dagster api grpc -h 0.0.0.0 -p 4000 -f deploy/k8s_job_config.py     # Helm: dagsterApiGrpcArgs

(0.0.0.0 inside the pod only; expose it through a ClusterIP Service, never outside the cluster.)
Needs ``pip install dagster-k8s`` (the version matching dagster); finpipe itself does not depend on it.

Steps inherit image, namespace, env (HF_TOKEN via the ``finpipe-secrets`` Secret), the lake volume and the security
context from the instance's K8sRunLauncher; only what differs per step is set here. The GPU request is
``per_step_k8s_config`` of the executor, so the asset code stays cluster-agnostic. The same dict works as the op tag
``dagster-k8s/config`` if you prefer it on the asset itself::

    @dg.asset(..., op_tags={"dagster-k8s/config": QLORA_ADAPTER_K8S_CONFIG})
    def qlora_adapter(...): ...

(the executor merges both into the step's Job; ``per_step_k8s_config`` wins where they conflict).
"""

from dagster_k8s import k8s_job_executor

from finpipe.definitions import definitions_with_executor
from finpipe.defs.resources import LAKE_WRITER_LIMITS

#: the training step: a GPU node (label set by NVIDIA's GPU feature discovery / GPU operator), one GPU, and the
#: taint most GPU node pools carry
QLORA_ADAPTER_K8S_CONFIG = {
    "container_config": {
        "resources": {
            "requests": {"cpu": "4", "memory": "16Gi"},
            "limits": {"nvidia.com/gpu": "1", "memory": "32Gi"},
        },
    },
    "pod_spec_config": {
        "node_selector": {"nvidia.com/gpu.present": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    },
}

K8S_EXECUTOR_CONFIG = {
    "max_concurrent": 4,  # step Jobs at once per run
    # k8s_job_executor replaces finpipe's multiprocess executor: keep its limit of one lake writer per run (the
    # instance pool limit in dagster-k8s.yaml covers writers of different runs)
    "tag_concurrency_limits": LAKE_WRITER_LIMITS,
    "step_k8s_config": {  # every other step: CPU only
        "container_config": {"resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}},
    },
    "per_step_k8s_config": {"qlora_adapter": QLORA_ADAPTER_K8S_CONFIG},
}

k8s_executor = k8s_job_executor.configured(K8S_EXECUTOR_CONFIG, name="finpipe_k8s_job_executor")

defs = definitions_with_executor(k8s_executor)
