"""GPU and multi-node decisions, checked on CPU with a faked cluster (no Ray started).

The cluster's resources, its live nodes and the `ray up` bootstrap config are replaced by
monkeypatched stand-ins, so the layouts a GPU cluster would get are computed here exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from distmed import resources
from distmed.config import ExperimentConfig, ScalingSection
from distmed.errors import UserError
from distmed.loop import loader_workers, resolve_amp, resolve_channels_last
from distmed.resources import cluster_capacity, concurrency_limit, plan_workers

CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it


@pytest.fixture
def fake_cluster(monkeypatch, tmp_path: Path):
    """Install a fake cluster: `fake_cluster(nodes, node_types=None)`."""

    def install(nodes: list[dict[str, float]], node_types: dict | None = None) -> None:
        total: dict[str, float] = {}
        for node in nodes:
            for key, value in node.items():
                total[key] = total.get(key, 0.0) + value
        monkeypatch.setattr(resources.ray, "cluster_resources", lambda: dict(total))
        monkeypatch.setattr(
            resources.ray, "nodes", lambda: [{"Alive": True, "Resources": n} for n in nodes]
        )
        bootstrap = tmp_path / "ray_bootstrap_config.yaml"
        if node_types is not None:
            config = {"head_node_type": "head", "available_node_types": node_types}
            bootstrap.write_text(yaml.safe_dump(config))
        monkeypatch.setattr(resources, "BOOTSTRAP_CONFIG", bootstrap)

    return install


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize(("bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_amp_auto_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert resolve_amp("auto", CUDA) == expected


def test_amp_explicit_setting_wins_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_amp("fp16", CUDA) == "fp16"
    assert resolve_amp("off", CUDA) == "off"


def test_channels_last_always_on_cuda_but_not_at_32px_on_cpu():
    small = ExperimentConfig.model_validate({"data": {"image_size": 32}})
    assert resolve_channels_last(small, CUDA) is True
    assert resolve_channels_last(small, torch.device("cpu")) is False


def test_loader_processes_only_on_a_gpu_from_the_workers_spare_cpus():
    assert loader_workers(torch.device("cpu"), 16) == 0  # the model needs every core
    assert loader_workers(CUDA, 1) == 0
    assert loader_workers(CUDA, 4) == 3  # one CPU drives the GPU
    assert loader_workers(CUDA, 32) == 8


def test_fp16_grad_scaler_scales_and_bf16_does_not():
    # The worker enables the scaler for fp16 only: bf16 has fp32's range.
    assert torch.amp.GradScaler("cpu", enabled=True).is_enabled()
    assert not torch.amp.GradScaler("cpu", enabled=False).is_enabled()


# --------------------------------------------------------------------------- GPU layouts


def test_one_gpu_per_worker_and_the_gpu_resource_that_makes_ray_pick_nccl(fake_cluster):
    fake_cluster([{"CPU": 4}, {"CPU": 16, "GPU": 2}])
    layout = plan_workers(ScalingSection(num_workers=2))
    assert layout.use_gpu and layout.gpus_per_worker == 1.0
    # Ray's TorchConfig picks NCCL when the per-worker resources hold a GPU.
    assert layout.resources_per_worker["GPU"] == 1.0
    assert layout.cpus_per_worker == 8.0  # the GPU node's 16 CPUs over its 2 GPUs


def test_more_gpus_than_the_cluster_has_is_refused(fake_cluster):
    fake_cluster([{"CPU": 4}, {"CPU": 16, "GPU": 2}])
    with pytest.raises(UserError, match="needs 3 GPUs but the cluster has 2"):
        plan_workers(ScalingSection(num_workers=3))
    with pytest.raises(UserError, match="needs 4 GPUs"):
        plan_workers(ScalingSection(num_workers=2, gpus_per_worker=2))


def test_two_ranks_on_one_gpu_is_refused(fake_cluster):
    fake_cluster([{"CPU": 16, "GPU": 4}])
    with pytest.raises(UserError, match="NCCL"):
        plan_workers(ScalingSection(num_workers=2, gpus_per_worker=0.5))


def test_fractional_gpus_pack_trials_side_by_side_on_one_node(fake_cluster):
    fake_cluster([{"CPU": 4}, {"CPU": 16, "GPU": 2}])
    cfg = ScalingSection(num_workers=1, gpus_per_worker=0.5)
    concurrent = concurrency_limit(8, 10, cfg)
    assert concurrent == 4  # 2 GPUs / 0.5
    layout = plan_workers(cfg, concurrent=concurrent)
    assert layout.gpus_per_worker == 0.5
    # 4 workers x (CPUs, 0.5 GPU) must fit the 16-CPU GPU node together.
    assert 4 * layout.cpus_per_worker <= 16
    assert layout.cpus_per_worker == 4.0


def test_cpu_flag_ignores_gpus(fake_cluster):
    """`--cpu` reaches the planner only through the config (scaling.use_gpu=false)."""
    from distmed.cli import overrides_from_args
    from distmed.config import load_config
    from distmed.train import build_parser

    fake_cluster([{"CPU": 16, "GPU": 2}])
    args = build_parser().parse_args(["--cpu", "--workers", "2"])
    scaling = load_config(None, overrides_from_args(args)).scaling
    layout = plan_workers(scaling)
    assert not layout.use_gpu and "GPU" not in layout.resources_per_worker
    assert concurrency_limit(8, 8, scaling) == 8  # by CPUs: the 2 GPUs bound nothing


# --------------------------------------------------------------------------- autoscaling


GPU_TYPES = {
    "head": {"resources": {"CPU": 8}, "node_config": {}},
    "gpu_1x": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 4, "node_config": {}},
    "gpu_4x": {"resources": {"CPU": 48, "GPU": 4}, "max_workers": 1, "node_config": {}},
}


def test_gpu_nodes_that_scale_from_zero_count_as_the_cluster(fake_cluster):
    fake_cluster([{"CPU": 8}], GPU_TYPES)  # only the head is up
    assert cluster_capacity()["GPU"] == 8  # 4 x 1 + 1 x 4
    cfg = ScalingSection(num_workers=1)
    concurrent = concurrency_limit(16, 16, cfg)
    assert concurrent == 8
    layout = plan_workers(cfg, concurrent=concurrent)
    assert layout.use_gpu  # `auto` sees the GPUs the autoscaler will add
    assert layout.cpus_per_worker == 8.0  # fits a g5.2xlarge-shaped node (8 CPUs, 1 GPU)
    with pytest.raises(UserError, match="needs 10 GPUs but the cluster has 8"):
        plan_workers(ScalingSection(num_workers=5, gpus_per_worker=2))


def test_without_an_autoscaler_no_gpu_means_no_gpu(fake_cluster):
    fake_cluster([{"CPU": 8}])
    assert not plan_workers(ScalingSection()).use_gpu
    with pytest.raises(UserError, match="sees no GPU"):
        plan_workers(ScalingSection(use_gpu=True))


def test_unreadable_bootstrap_config_is_ignored(fake_cluster, tmp_path: Path):
    fake_cluster([{"CPU": 8}], GPU_TYPES)
    resources.BOOTSTRAP_CONFIG.write_text("available_node_types: [not, a, mapping")
    assert cluster_capacity().get("GPU", 0.0) == 0.0


# --------------------------------------------------------------------------- CPU nodes


def test_a_default_cpu_worker_fits_on_one_node(fake_cluster):
    fake_cluster([{"CPU": 1}, {"CPU": 1}])  # 2 CPUs in all, but at most 1 on any node
    layout = plan_workers(ScalingSection(num_workers=1))
    assert layout.cpus_per_worker == 1.0 and layout.threads == 1


def test_one_node_keeps_every_core_for_one_worker(fake_cluster):
    fake_cluster([{"CPU": 2}])
    assert plan_workers(ScalingSection(num_workers=1)).cpus_per_worker == 2.0


def test_two_cpu_workers_on_a_two_plus_one_cpu_cluster_get_one_cpu_each(fake_cluster):
    fake_cluster([{"CPU": 2}, {"CPU": 1}])
    assert plan_workers(ScalingSection(num_workers=1)).cpus_per_worker == 2.0
    # An even share (1.49) would leave the 1-CPU node unusable: two workers could not start.
    assert plan_workers(ScalingSection(num_workers=2)).cpus_per_worker == 1.0
    assert plan_workers(ScalingSection(num_workers=3)).cpus_per_worker == 1.0


def test_capacity_of_the_shipped_aws_cluster_as_ray_up_writes_it(fake_cluster):
    """cluster/gpu.yaml, prepared as `ray up` does, read back as the head's bootstrap file."""
    from ray.autoscaler._private.util import prepare_config

    shipped = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "gpu.yaml").read_text())
    prepared = prepare_config(shipped)
    fake_cluster([{"CPU": 8}], prepared["available_node_types"])
    capacity = cluster_capacity()
    assert capacity["GPU"] == 4 * 1 + 1 * 4  # gpu_1x x 4 and gpu_4x x 1
    assert capacity["CPU"] == 8 + 4 * 8 + 48
    layout = plan_workers(ScalingSection(num_workers=1), concurrent=8)
    assert layout.use_gpu and layout.cpus_per_worker == 8.0


def test_a_streamed_gpu_worker_leaves_its_node_s_cpus_to_the_decoding_tasks(fake_cluster):
    """#35: from the cache a GPU worker takes its GPU's share of the node's CPUs (its loader
    processes use them); streamed, Ray Data decodes on the node's CPUs, so the worker keeps
    two and the rest feed it. A set `cpus_per_worker` is used as given."""
    from distmed.resources import STREAM_GPU_WORKER_CPUS

    fake_cluster([{"CPU": 16, "GPU": 2}, {"CPU": 16, "GPU": 2}])
    scaling = ScalingSection(num_workers=4)
    assert plan_workers(scaling).cpus_per_worker == 8.0
    streamed = plan_workers(scaling, reserve_cpus=1.0)
    assert streamed.use_gpu and streamed.cpus_per_worker == STREAM_GPU_WORKER_CPUS == 2.0
    given = ScalingSection(num_workers=4, cpus_per_worker=6)
    assert plan_workers(given, reserve_cpus=1.0).cpus_per_worker == 6
