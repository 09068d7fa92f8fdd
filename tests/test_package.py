"""The package as a user gets it: the library loads none of its optional dependencies, and
the version is pyproject.toml's."""
import subprocess
import sys
from importlib import metadata

import qembed

OPTIONAL = ["tqdm", "matplotlib", "triton", "hypothesis", "pytest"]

# In a fresh interpreter: what of the optional packages qembed loads, beyond what torch does
# (torch.hub imports tqdm where it is installed), while building and using a table.
LOADED_BY_QEMBED = f"""
import sys
import torch
before = set(sys.modules)
import qembed
bag = qembed.QuantizedEmbeddingBag(10, 8, mode="sum", bits=4)
assert bag(torch.tensor([1, 2]), torch.tensor([0])).shape == (1, 8)
print(sorted(m for m in set(sys.modules) - before if m.split(".")[0] in {OPTIONAL!r}))
"""


def test_library_loads_no_optional_dependency():
    out = subprocess.run([sys.executable, "-c", LOADED_BY_QEMBED], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_is_the_installed_metadata():
    assert qembed.__version__ == metadata.version("qembed")
