"""Portable expert builds (`bench.portable`): a suite that asks for them fine-tunes each expert in a child process
whose CPU kernels are pinned to the portable level, so every machine builds the same bits (issue 27)."""

from __future__ import annotations

import json
import os
import textwrap

import pytest
import torch

from bench import portable
from bench.weights import state_hash
from tests.conftest import write_entry_point

CHILD_PLUGIN = '''
import json, os, torch
from bench.registry import suites
from toyplugin import ToySuite


@suites.register("toy-portable")
class ToyPortable(ToySuite):
    name = "toy-portable"
    portable_build = True

    def finetune(self, task, body, head=None, **kw):
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        (self.cache_dir / f"built-{task}.json").write_text(json.dumps({
            "pid": os.getpid(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "switches": {k: os.environ.get(k) for k in KEYS}}))
        return super().finetune(task, body, head, **kw)
'''.replace("KEYS", repr(sorted(portable.PORTABLE_KERNELS)))


@pytest.fixture()
def portable_suite(plugin_site, tmp_path, monkeypatch):
    """The toy suite with portable builds: registered for the child (an entry point on sys.path), and the same
    class, unregistered, in this process (so no other test sees an extra suite)."""
    from toyplugin import ToySuite

    site = tmp_path / "site"
    site.mkdir()
    (site / "toyportable.py").write_text(CHILD_PLUGIN)
    write_entry_point(site, "mergearena_toyportable", "toy-portable", "toyportable")
    monkeypatch.syspath_prepend(str(site))

    class Parent(ToySuite):
        name = "toy-portable"
        portable_build = True

    return Parent(cache_dir=tmp_path / "cache")


def test_the_expert_is_fine_tuned_in_a_child_with_the_portable_kernels(portable_suite) -> None:
    expert = portable_suite.expert("t10")
    built = json.loads((portable_suite.cache_dir / "built-t10.json").read_text())
    assert built["pid"] != os.getpid()
    assert built["capability"] == "DEFAULT"  # ATen's vectorised kernels capped at the lowest level
    assert built["threads"] == portable.BUILD_THREADS
    assert built["switches"] == portable.PORTABLE_KERNELS
    # what this process returns is what the child wrote to the cache, and a second suite reads it without a build
    (portable_suite.cache_dir / "built-t10.json").unlink()
    again = type(portable_suite)(cache_dir=portable_suite.cache_dir).expert("t10")
    assert not (portable_suite.cache_dir / "built-t10.json").exists()
    assert state_hash(again.body) == state_hash(expert.body)


def test_the_child_builds_what_a_process_started_with_the_same_switches_builds(portable_suite, tmp_path) -> None:
    """Independent check of 'the child pins the kernels': a plain process started by hand with the switches
    (not through `bench.portable`) fine-tunes the same bits."""
    import subprocess
    import sys

    expert = portable_suite.expert("t20")
    by_hand = tmp_path / "by-hand"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE",
           "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", portable.IN_BUILD: "1",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = textwrap.dedent(f"""
        import torch; torch.set_num_threads(2)
        from bench.registry import suites
        from bench.weights import state_hash
        print(state_hash(suites.get("toy-portable")(cache_dir={str(by_hand)!r}).expert("t20").body))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == state_hash(expert.body)


def test_the_build_environment_is_part_of_the_recipe_hash(portable_suite, monkeypatch) -> None:
    from toyplugin import ToySuite

    plain = ToySuite(cache_dir=portable_suite.cache_dir)
    assert plain.recipe() == portable_suite.recipe()
    pinned = portable_suite.recipe_hash()
    monkeypatch.setattr(portable, "BUILD_THREADS", 4)
    assert portable_suite.recipe_hash() != pinned  # another thread count sums in another order: other experts
    monkeypatch.setattr(portable, "BUILD_THREADS", 2)
    assert portable_suite.recipe_hash() == pinned
    assert type(plain).recipe_hash(plain) != pinned


def test_a_failed_child_build_raises_and_caches_nothing(plugin_site, tmp_path) -> None:
    from toyplugin import ToySuite

    class Unregistered(ToySuite):
        name = "toy-nowhere"  # the child cannot find it
        portable_build = True

    suite = Unregistered(cache_dir=tmp_path / "cache")
    with pytest.raises(portable.PortableBuildError, match="toy-nowhere/t10"):
        suite.expert("t10")
    assert not suite.expert_cached("t10")


def test_a_modified_recipe_is_not_built_from_the_registered_one(portable_suite) -> None:
    portable_suite.steps = 3  # the recipe records it: the child's registered suite would train 40 steps
    with pytest.raises(portable.PortableBuildError, match="toy-portable/t10"):
        portable_suite.expert("t10")
    assert not portable_suite.expert_cached("t10")


def test_child_environment_pins_every_switch_and_leaves_the_rest() -> None:
    env = portable.child_environment({"PATH": "/bin", "ATEN_CPU_CAPABILITY": "avx512", "OMP_NUM_THREADS": "16"})
    assert env["PATH"] == "/bin"
    assert {k: env[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")} == \
        {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2"
    assert env[portable.IN_BUILD] == "1"


def test_the_embedded_suites_build_portably() -> None:
    from tasks.text_minilm import TextMiniLM
    from tasks.text_mix import TextMix
    from tasks.vision_effnet import VisionEffNet

    assert VisionEffNet.portable_build and TextMix.portable_build and TextMiniLM.portable_build
    assert torch.__version__.split("+")[0] == portable.build_environment()["torch"]
