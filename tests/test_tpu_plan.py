"""TPU plans without a TPU (scaling/tpu_plan.py): topology names, the roofline by hand, and
(with the tpu extra, which `make test` installs) a micro rung compiled by the TPU compiler for a
v5e:2x2 slice, FSDP-sharded, and a plan that cannot fit reported as such."""

from __future__ import annotations

import importlib.util
import json

import pytest

from onerec_jax import cli
from scaling import tpu_plan

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="the tpu extra (make install-tpu)"
)


def test_topologies_are_parsed_and_a_misspelt_one_lists_the_known(capsys):
    assert tpu_plan.parse_topology("v5p:4x4x4") == ("v5p", 64)
    assert tpu_plan.parse_topology("v5e:16x16") == ("v5e", 256)
    for bad in ("v5x:2x2", "v5e:2x2x1", "v4:4x4", "v6e:2by2", "tpu"):
        with pytest.raises(ValueError, match=r"unknown TPU topology .* e\.g\. v4:2x2x1"):
            tpu_plan.parse_topology(bad)
    assert cli.main(["plan", "--rung", "v1-0.07m", "--topology", "v5x:2x2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown TPU topology 'v5x:2x2'" in err[0]


def test_roofline_by_hand():
    peak, _, bw = tpu_plan.CHIPS["v5p"]
    # 8 chips, 1e15 FLOPs: compute 1e15 / (8 peak); 1e9 bytes per chip: memory 1e9 / bw
    r = tpu_plan.roofline("v5p", 8, 1e15, 1e9)
    assert r["est_compute_s"] == pytest.approx(1e15 / (8 * peak))
    assert r["est_memory_s"] == pytest.approx(1e9 / bw)
    assert r["est_step_s"] == max(r["est_compute_s"], r["est_memory_s"])
    assert r["bound"] == "compute" and r["est_mfu"] == pytest.approx(1.0)
    m = tpu_plan.roofline("v5e", 4, 1e12, 1e10)  # memory-bound: MFU = compute / memory time
    assert m["bound"] == "memory"
    assert m["est_mfu"] == pytest.approx(m["est_compute_s"] / m["est_memory_s"])
    none = tpu_plan.roofline("v5e", 4, 1e12, None)  # no byte count: no MFU claimed
    assert none["est_mfu"] is None and none["est_step_s"] == none["est_compute_s"]


def test_candidate_meshes_cover_the_devices_and_split_the_batch():
    for devices, batch, experts in ((4, 32, 0), (256, 64, 53), (256, 256, 64), (8, 1, 0)):
        meshes = tpu_plan.candidate_meshes(devices, batch, experts)
        for m in meshes:
            assert m["data"] * m["fsdp"] * m["tensor"] * m["expert"] == devices
            assert batch % (m["fsdp"] * m["expert"]) == 0 and m["data"] == 1
            assert experts % m["expert"] == 0
        # experts split only where a power of two divides both their count and the shards
        assert max(m["expert"] for m in meshes) == {0: 1, 53: 1, 64: 64}[experts]


@needs_libtpu
def test_a_micro_rung_compiles_for_a_v5e_slice_with_fsdp_sharded_state():
    # v4 and v5p are laid out "megacore": one device per chip, as jobs run on them
    assert len(tpu_plan.topology_devices("v4:2x2x1")) == 4
    mesh = {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
    row = tpu_plan.tpu_plan("v1-0.07m", "v5e:2x2", mesh, batch=32, n_items=500)
    assert row["devices"] == row["chips"] == 4 and row["fits"]
    assert row["hbm_per_chip"] == 16 * 2**30 and row["per_device_bytes"] < row["hbm_per_chip"]
    # params and the two AdamW moments (float32) split over 4 chips: about a quarter each
    whole = 12 * row["params_total"]
    assert 0.2 < row["per_device_arguments_bytes"] / whole < 0.35
    assert row["est_step_s"] > 0 and 0 < row["est_mfu"] <= 1
    assert row["est_bytes_per_chip"] >= row["per_device_arguments_bytes"]
    assert row["est_target_tokens_per_s"] == pytest.approx(
        32 * row["target_tokens_per_sample"] / row["est_step_s"]
    )


@needs_libtpu
@pytest.mark.slow
def test_a_plan_that_cannot_fit_says_so_and_search_finds_the_smallest_slice(capsys):
    row = tpu_plan.tpu_plan("v1-0.07m", "v5e:2x2", None, batch=2**18, n_items=500)
    assert row["fits"] is False  # over HBM, or refused by the compiler: never a crash
    with pytest.raises(ValueError, match="does not split"):  # a real error is not "fits: false"
        tpu_plan.tpu_plan("v1-0.07m", "v5e:2x2", {"fsdp": 4}, batch=6, n_items=500)
    argv = ["plan", "--rung", "v1-0.07m", "--search", "--generations", "v5e", "--json"]
    argv += ["--batch", "32", "--items", "500"]
    assert cli.main(argv) == 0
    (found,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert found["topology"] == "v5e:2x2" and found["fits"]


@needs_libtpu
def test_without_a_tpu_the_extra_does_not_make_jax_look_for_one():
    import glob
    import os
    import subprocess
    import sys

    if glob.glob("/dev/accel*") or os.path.exists("/dev/vfio"):
        pytest.skip("a TPU VM: JAX should look for its TPU")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = "import os, onerec_jax, jax; "
    code += "print(os.environ['JAX_PLATFORMS'], jax.devices()[0].platform)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["cuda,cpu", "cpu"] or out.stdout.split()[1] == "gpu"
    assert "libtpu" not in out.stderr and "TPU_WORKER_HOSTNAMES" not in out.stderr
