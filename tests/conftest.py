import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Same reason as the CLI's --threads default: small-tensor relaxations crawl when OpenMP threads contend.
torch.set_num_threads(1)

# Tables are laid out for $COLUMNS when it is set; the tests that read tables expect the pipe default.
os.environ.pop("COLUMNS", None)

# Tests read real data from ../shared/data unless the caller points elsewhere.
if "EPX_DATA_DIR" not in os.environ and SHARED_DATA.is_dir():
    os.environ["EPX_DATA_DIR"] = str(SHARED_DATA)


@pytest.fixture
def real_data_dir() -> Path:
    path = Path(os.environ.get("EPX_DATA_DIR", SHARED_DATA))
    if not (path / "fashion-mnist").is_dir() and not any(path.glob("train-images-idx3-ubyte*")):
        pytest.skip(f"Fashion-MNIST not found under {path}; set EPX_DATA_DIR")
    return path
