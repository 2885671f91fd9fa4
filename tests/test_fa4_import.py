"""flash-attn-4 is imported with its persistent kernel cache beside Inductor's, unless the user
or torch's own cache settings say otherwise."""

from __future__ import annotations

import os
import sys

import pytest
from torch._inductor import config

from fv_compile.backends.kernels import fa4_import
from fv_compile.backends.kernels.fa4_import import (
    CACHE_DIR,
    CACHE_ENABLED,
    persistent_cache_settings,
)


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv(CACHE_ENABLED, raising=False)
    monkeypatch.delenv(CACHE_DIR, raising=False)
    monkeypatch.delitem(sys.modules, "flash_attn.cute", raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.sep, "inductor-cache"))
    with config.patch(fx_graph_cache=True, force_disable_caches=False):
        yield monkeypatch


def test_the_kernel_cache_goes_beside_inductors_when_torch_caches_are_on(clean_env):
    assert persistent_cache_settings() == {
        CACHE_ENABLED: "1",
        CACHE_DIR: os.path.join(os.sep, "inductor-cache", "flash_attn_cute"),
    }


def test_a_cache_folder_the_user_chose_is_kept(clean_env):
    clean_env.setenv(CACHE_DIR, "elsewhere")
    assert persistent_cache_settings() == {CACHE_ENABLED: "1"}


@pytest.mark.parametrize("choice", ["0", "1"])
def test_the_users_own_choice_wins(clean_env, choice):
    clean_env.setenv(CACHE_ENABLED, choice)
    assert persistent_cache_settings() == {}


def test_no_kernel_cache_when_torchs_caches_are_off(clean_env):
    with config.patch(force_disable_caches=True):
        assert persistent_cache_settings() == {}
    with config.patch(fx_graph_cache=False):
        assert persistent_cache_settings() == {}


def test_nothing_changes_once_flash_attn_cute_is_imported(clean_env):
    clean_env.setitem(sys.modules, "flash_attn.cute", object())
    assert persistent_cache_settings() == {}


def test_a_failed_import_leaves_the_environment_as_it_was(clean_env):
    clean_env.setitem(sys.modules, "flash_attn", None)  # as if not installed
    before = dict(os.environ)
    with pytest.raises(ModuleNotFoundError):
        fa4_import.import_flash_attn_cute()
    assert dict(os.environ) == before


def test_a_report_variants_throwaway_cache_never_becomes_the_kernel_cache(clean_env):
    # the report compiles each variant in an Inductor cache directory it deletes afterwards; a
    # first import of flash-attn-4 there must not pin its kernel cache to that directory
    from fv_compile.report.variants import fresh_inductor_cache

    with fresh_inductor_cache(True):
        assert persistent_cache_settings() == {}
    assert CACHE_ENABLED not in os.environ
    assert persistent_cache_settings()[CACHE_ENABLED] == "1"
