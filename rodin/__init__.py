"""rodin: train a French LLaMA from scratch and ship it to llama.cpp, Ollama and transformers.

The library, by stage; imports run one way, from each package to those before it only:

    model, config, io  <-  data  <-  train  <-  spot  <-  ship  <-  eval

- rodin.model (the LLaMA, imports only torch), rodin.config (the presets), rodin.io (atomic
  writes and figures): the base every stage stands on;
- rodin.data, rodin.train, rodin.spot, rodin.ship, rodin.eval: see each package's docstring.
The scripts (train.py, sft.py, export.py, data/*.py, bench/*.py) import the library, never the
reverse. tests/test_layers.py reads every import and holds the library to this order.
`rodin COMMAND` (rodin/__main__.py) runs the library's own commands: chat, eval, report, publish, supervise.
"""

import re

import torch

# The oldest torch rodin runs on: 2.9 brought torch.optim.Muon, whose step and Newton-Schulz
# (torch.optim._muon) rodin's Muon shares; 2.8 has neither. Checked here, when rodin is first
# imported, because the optimizers import them before any run could check anything.
MIN_TORCH = (2, 9)


def torch_too_old(version):
    """The one line that says a torch version is older than rodin needs, or None when it is not."""
    found = re.match(r"(\d+)\.(\d+)", version)
    if found and tuple(map(int, found.groups())) < MIN_TORCH:
        floor = ".".join(map(str, MIN_TORCH))
        return (f"error: rodin needs torch >= {floor} (torch.optim.Muon), this is torch {version}: "
                f"pip install 'torch>={floor}' (the build for your CUDA driver)")
    return None


if torch_too_old(torch.__version__):
    raise SystemExit(torch_too_old(torch.__version__))
