"""Plugin discovery: entry points, isolation of broken plugins, in-process registration, the allow-list."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ep_core.plugins import PluginError, UnknownNameError, hookimpl, load

GOOD_PLUGIN = '''
from ep_core import hookimpl
from ep_core.bptt import BPTT


class Halved(BPTT):
    """bptt scaled by one half: a third-party estimator with a known answer."""
    name = "halved"

    def estimate(self, model, batch, *, generator):
        result = super().estimate(model, batch, generator=generator)
        result.grads = {k: 0.5 * v for k, v in result.grads.items()}
        return result


@hookimpl
def register_estimators(register):
    register("halved", Halved)
'''


def install_distribution(root: Path, dist: str, module: str, source: str, entry_name: str) -> None:
    """Make ``root`` hold an installed distribution (a module plus a .dist-info with an epx entry point)."""
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[epx]\n{entry_name} = {module}\n")


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    install_distribution(tmp_path, "broken-epx-plugin", "broken_epx_plugin",
                         "raise RuntimeError('boom on import')\n", "broken")
    install_distribution(tmp_path, "halved-epx-plugin", "halved_epx_plugin", GOOD_PLUGIN, "halved")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("EPX_LOAD_PLUGINS", raising=False)
    monkeypatch.delenv("EPX_STRICT_PLUGINS", raising=False)
    return tmp_path


def test_broken_entry_point_is_reported_and_the_rest_load(third_party):
    registry = load()
    broken = registry.plugin("broken")
    assert broken.status == "failed"
    assert broken.distribution == "broken-epx-plugin"
    assert "RuntimeError: boom on import" in broken.error
    assert {"bptt", "ep", "aep", "adjoint", "halved"} <= set(registry.names("estimator"))
    assert registry.plugin("halved").registered == ["estimator:halved"]
    assert registry.get("estimator", "aep").plugin == "aep"


def test_strict_mode_turns_a_broken_plugin_into_an_error(third_party):
    with pytest.raises(PluginError, match="broken"):
        load(strict=True)


def test_allow_list_limits_entry_points(third_party, monkeypatch):
    monkeypatch.setenv("EPX_LOAD_PLUGINS", "ep,halved-epx-plugin")
    registry = load()
    assert registry.names("estimator") == ["backprop", "bptt", "ep", "halved"]
    monkeypatch.setenv("EPX_LOAD_PLUGINS", "")
    assert load().names("estimator") == ["backprop", "bptt"]


def test_cli_lists_failed_plugin_and_still_compares(third_party):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(third_party), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-m", "epx_cli", "plugins", "--json"], env=env, capture_output=True,
                            text=True, check=True)
    records = {r["name"]: r for r in json.loads(listed.stdout)}
    assert records["broken"]["status"] == "failed"
    assert "boom on import" in records["broken"]["error"]
    assert records["ep"]["status"] == "ok" and records["halved"]["status"] == "ok"

    compared = subprocess.run(
        [sys.executable, "-m", "epx_cli", "compare", "halved", "adjoint", "--model", "toy", "--json",
         "--repeats", "1"], env=env, capture_output=True, text=True, check=False)
    assert compared.returncode == 0, compared.stderr
    result = json.loads(compared.stdout)
    rows = {r["label"]: r for r in result["results"]}
    assert rows["halved"]["metrics"]["norm_ratio"] == pytest.approx(0.5, rel=1e-6)
    assert rows["halved"]["metrics"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows["adjoint"]["metrics"]["cosine"] > 0.999
    assert "plugin(s) failed to load" in compared.stderr


class InProcess:
    """A plugin registered in-process, the way a test suite would."""

    @hookimpl
    def register_estimators(self, register):
        from ep_core.bptt import BPTT
        register("copy-of-bptt", BPTT, summary="bptt under another name")


class RaisesDuringRegistration:
    @hookimpl
    def register_estimators(self, register):
        raise ValueError("cannot register today")


def test_in_process_registration_and_isolation_of_register_errors():
    registry = load(plugins=[("mine", InProcess()), ("bad", RaisesDuringRegistration())], entry_points=False)
    assert registry.get("estimator", "copy-of-bptt").summary == "bptt under another name"
    assert registry.plugin("bad").status == "failed"
    assert "cannot register today" in registry.plugin("bad").error
    assert registry.plugin("mine").status == "ok"


def test_duplicate_name_from_another_plugin_is_a_failure_not_an_override():
    class Impostor:
        @hookimpl
        def register_estimators(self, register):
            register("bptt", object)

    registry = load(plugins=[("impostor", Impostor())], entry_points=False)
    assert registry.plugin("impostor").status == "failed"
    assert "already registered" in registry.plugin("impostor").error
    assert registry.get("estimator", "bptt").plugin == "ep_core"


def test_unknown_name_suggests_the_closest():
    registry = load()
    with pytest.raises(UnknownNameError, match="did you mean 'aep'"):
        registry.get("estimator", "aepp")
    with pytest.raises(UnknownNameError, match="did you mean 'cet'"):
        registry.get("model", "cte")


def test_builtin_estimators_come_from_entry_points():
    registry = load()
    for name in ("ep", "aep", "adjoint"):
        record = registry.plugin(name)
        assert record.distribution == "epx" and record.status == "ok"
