import os
import sys
from pathlib import Path

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)  # the helpers package

os.environ.setdefault("QUANTKIT_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> str:
    """quantkit/data: WikiText-2 and SST-2, shipped with the package."""
    from quantkit.util.data import DATA_DIR
    return DATA_DIR


@pytest.fixture(scope="session")
def bundled_gguf() -> str:
    """The bundled Gemma-3-270M Q4_K_M GGUF, assembled once into quantkit's cache."""
    from quantkit.models.bundled import bundled_path
    return bundled_path()


@pytest.fixture(scope="module")
def one_thread():
    """Small models and short batches: torch's intra-op threads only add synchronisation
    (measured 10x slower on a busy 2-core machine). Use with pytest.mark.usefixtures."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def chromium_present():
    """Not a skip: `make test` installs Debian's chromium; without it the report is untested, a failure."""
    from helpers.chromium import CHROMIUM
    assert CHROMIUM is not None, "chromium not installed: run `make test` (it installs Debian's chromium) or apt-get install -y chromium"


@pytest.fixture(scope="session")
def gptq_llama_dir(tmp_path_factory):
    """A tiny llama on which GPTQ clearly helps (helpers.tiny_models.build_gptq_llama), built once."""
    from helpers.tiny_models import build_gptq_llama
    return build_gptq_llama(tmp_path_factory.mktemp("gptq-gguf"))


@pytest.fixture(scope="session")
def arch_dirs(tmp_path_factory):
    """kind -> a tiny random HF model of that architecture (helpers.tiny_models.build_arch_model),
    built once per session and shared by every test file (read only: copy it to change it)."""
    from helpers.tiny_models import build_arch_model
    root = tmp_path_factory.mktemp("arch")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_arch_model(kind, root)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def arch_f32(arch_dirs, tmp_path_factory):
    """kind -> its F32 GGUF, converted once per session (read only)."""
    from quantkit import api
    root = tmp_path_factory.mktemp("arch-gguf")
    done: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in done:
            out = root / f"{kind}-f32.gguf"
            api.quantize(str(arch_dirs(kind)), out, format="gguf:f32", show_progress=False)
            done[kind] = out
        return done[kind]

    return get
