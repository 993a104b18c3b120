"""The cluster files (``cluster/``), the placement keys and the figures of ``docs/SCALING.md``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
RUN_CONFIGS = sorted(p for p in CLUSTER.glob("*.yaml") if "output_dir" in yaml.safe_load(p.read_text()))
SCALING = (ROOT / "docs" / "SCALING.md").read_text()


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_run_configs_load_and_say_how_to_run(path: Path) -> None:
    submit = "# ray job submit --working-dir . --runtime-env cluster/runtime_env.yaml -- python -m pipeline run"
    assert path.read_text().startswith(f"{submit} cluster/{path.name}\n")
    cfg = load_config(path)
    assert cfg.train.use_gpu and cfg.train.bf16 and cfg.train.gradient_checkpointing
    assert cfg.train.resources_per_worker and cfg.generation.resources  # placed by custom resources
    assert cfg.output_dir.startswith("/mnt/shared/")  # storage every node sees


def test_ray_cluster_config_is_valid_and_advertises_the_placement_resources() -> None:
    pytest.importorskip("ray")
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(cluster))  # Ray's own JSON schema
    advertised = {name for t in cluster["available_node_types"].values() for name in t["resources"]}
    wanted = set()
    for path in RUN_CONFIGS:
        cfg = load_config(path)
        wanted |= set(cfg.train.resources_per_worker) | set(cfg.generation.resources)
    assert wanted and wanted <= advertised


def test_placement_keys_validate() -> None:
    cfg = load_config(None, ["train.placement_strategy=SPREAD", "train.resources_per_worker={node_a: 0.5}"])
    assert cfg.train.placement_strategy == "SPREAD" and cfg.train.resources_per_worker == {"node_a": 0.5}
    assert load_config(None, ["generation.resources={node_b: 0.01}"]).generation.resources == {"node_b": 0.01}
    assert load_config(None).train.placement_strategy == "PACK" and load_config(None).generation.resources == {}
    for bad, key in [
        ("train.placement_strategy=ANYWHERE", "train.placement_strategy"),
        ("train.resources_per_worker={GPU: 1}", "train.resources_per_worker.GPU"),
        ("generation.resources={node_b: -1}", "generation.resources.node_b"),
        ("generation.resources={node_b: lots}", "generation.resources.node_b"),
        ("generation.resources=node_b", "generation.resources"),
    ]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [bad])


def test_storage_path_and_on_node_loss_validate() -> None:
    for ok in ("", "/mnt/shared/ckpt", "file:///mnt/shared/ckpt", "s3://bucket/runs", "gs://bucket/x"):
        assert load_config(None, [f"train.storage_path={ok}"]).train.storage_path == ok
    for bad in ("ckpt", "./ckpt", "ftp://host/x", "s3://", "file://"):  # relative: each node would resolve its own
        with pytest.raises(ConfigError, match=r"train\.storage_path"):
            load_config(None, [f"train.storage_path={bad}"])
    assert load_config(None).train.on_node_loss == "wait"
    with pytest.raises(ConfigError, match=r"train\.on_node_loss=continue is not supported"):
        load_config(None, ["train.on_node_loss=continue"])


def test_checkpoint_storage_is_one_run_folder_per_stage(tmp_path: Path) -> None:
    from pipeline.train.trainer import _delete_run, checkpoint_storage

    stage = tmp_path / "out" / "rounds" / "round-1"
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}"])
    assert checkpoint_storage(cfg, stage) == str(stage / "ray")
    remote = load_config(None, [f"output_dir={tmp_path / 'out'}", "train.storage_path=s3://bucket/runs/"])
    assert checkpoint_storage(remote, stage) == "s3://bucket/runs/rounds/round-1"
    with pytest.raises(ValueError, match="not under output_dir"):
        checkpoint_storage(remote, tmp_path / "elsewhere")
    local = load_config(None, [f"output_dir={tmp_path / 'out'}", f"train.storage_path=file://{tmp_path / 'store'}"])
    run = tmp_path / "store" / "rounds" / "round-1" / "preference"
    (run / "checkpoint_x").mkdir(parents=True)
    _delete_run(checkpoint_storage(local, stage), "preference")  # what a fresh run (force) clears
    assert not run.exists() and run.parent.is_dir()
    _delete_run(checkpoint_storage(local, stage), "preference")  # nothing there: no error
    (stage / "ray" / "preference").mkdir(parents=True)  # the default: a local path, no URI
    _delete_run(checkpoint_storage(cfg, stage), "preference")
    assert not (stage / "ray" / "preference").exists()


def test_wait_is_a_fixed_worker_group_with_the_placement_keys() -> None:
    """on_node_loss=wait: a fixed num_workers (Ray Train's FixedScalingPolicy restarts all of them), not a range."""
    pytest.importorskip("ray")
    from pipeline.train.trainer import scaling_config

    cfg = load_config(None, ["train.num_workers=3", "train.placement_strategy=STRICT_SPREAD",
                             "train.resources_per_worker={train_node: 0.01}"])  # fmt: skip
    sc = scaling_config(cfg.train)
    assert sc.num_workers == 3 and not sc.elasticity_enabled and sc.placement_strategy == "STRICT_SPREAD"
    assert sc.resources_per_worker == {"CPU": cfg.train.cpus_per_worker, "train_node": 0.01}


def _llama_params(h: int, layers: int, heads: int, kv_heads: int, f: int, vocab: int, tied: bool) -> int:
    h_kv = kv_heads * (h // heads)
    return layers * (2 * h * h + 2 * h * h_kv + 3 * h * f + 2 * h) + vocab * h * (1 if tied else 2) + h


def test_scaling_figures_reproduce() -> None:
    """The parameter counts and DeepSpeed's own ZeRO estimates quoted in docs/SCALING.md."""
    p1b = _llama_params(2048, 16, 32, 8, 8192, 128256, tied=True)
    p8b = _llama_params(4096, 32, 32, 8, 14336, 128256, tied=False)
    p70b = _llama_params(8192, 80, 64, 8, 28672, 128256, tied=False)
    for p in (p1b, p8b, p70b):
        assert f"{p:,}" in SCALING
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    gib = 2**30

    def z3(p: int, largest: int, nodes: int, offload: bool = False) -> tuple[float, float]:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            p, largest, num_gpus_per_node=8, num_nodes=nodes, cpu_offload=offload, cpu_offload_params=False
        )
        return round(gpu / gib, 1), round(cpu / gib, 1)

    def z2(p: int, nodes: int) -> float:
        return round(estimate_zero2_model_states_mem_needs(p, 8, nodes, cpu_offload=False)[1] / gib, 1)

    assert z3(p8b, 4096 * 128256, 1) == (18.8, pytest.approx(23.5))
    assert z3(p8b, 4096 * 128256, 1, offload=True) == (3.8, 179.5)
    assert z3(p70b, 8192 * 128256, 4)[0] == 40.9
    assert z3(p70b, 8192 * 128256, 8)[0] == 22.4
    assert z3(p70b, 8192 * 128256, 8, offload=True) == (6.0, 197.1)
    assert (z2(p8b, 1), z2(p70b, 4), z2(p70b, 8)) == (31.8, 168.4, 149.9)
    for figure in ("18.8 GiB", "3.8 GiB", "179.5 GiB", "40.9 GiB", "22.4 GiB", "197.1 GiB", "31.8 GiB", "149.9 GiB"):
        assert figure in SCALING
