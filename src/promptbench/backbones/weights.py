"""Resolve `pretrained` (open_clip tag, hf-hub id, local file) to weights, offline-first and fail-fast.

A model hub that cannot be reached must not cost minutes of retries: we probe the host once with a
short timeout, and when it is down we only look in the local caches.
"""

from __future__ import annotations

import os
import socket
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import torch

from promptbench.errors import PromptbenchError

HUB_PROBE_TIMEOUT_S = 3.0
# A compact export (promptbench pretrain-mini) stores only the token-embedding rows its captions used.
EMBEDDING_ROWS_KEY = "token_embedding.rows"
EMBEDDING_IDS_KEY = "token_embedding.ids"
# Keys that OpenAI's TorchScript archives carry in their state dict besides the weights.
_JIT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def offline_requested() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}


def host_reachable(url_or_host: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    host = urlparse(url_or_host).hostname or url_or_host
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_host() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub answer from its cache only, for the duration of the block."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def hub_available() -> bool:
    return not offline_requested() and host_reachable(hub_host())


def offline_error(backbone: str, pretrained: str, cause: Exception | None = None) -> PromptbenchError:
    detail = f" ({type(cause).__name__}: {cause})" if cause else ""
    return PromptbenchError(
        f"backbone '{backbone}': weights '{pretrained}' are not in the local cache and the model hub "
        f"cannot be reached (offline){detail}.\n"
        f"  Fix: copy the checkpoint to this machine and pass its path, e.g.\n"
        f"    python run.py backbone={backbone} backbone.pretrained=/path/to/{backbone}.pt\n"
        f"  (OpenAI .pt archives, OpenAI-format state dicts and open_clip checkpoints all work), or fill the\n"
        f"  cache on a machine with internet (HF_HOME / backbone.cache_dir) and copy it here."
    )


def is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Weights from a local file: OpenAI TorchScript archive, OpenAI state dict, or open_clip checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise PromptbenchError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif is_torchscript_archive(path):
            state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise PromptbenchError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from error
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise PromptbenchError(f"checkpoint {path} holds no state dict (found {type(state).__name__})")
    state = {key.removeprefix("module."): value for key, value in state.items() if key not in _JIT_EXTRA_KEYS}
    return state


def expand_compact_embedding(state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """Rebuild the full token-embedding table of a compact export; tokens never trained get zero vectors."""
    ids, rows = state.pop(EMBEDDING_IDS_KEY), state.pop(EMBEDDING_ROWS_KEY)
    table = torch.zeros(vocab_size, rows.shape[1], dtype=rows.dtype)
    table[ids.long()] = rows
    state["token_embedding.weight"] = table
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load `state`, adapting the scalar-vs-1d logit_scale difference between formats."""
    own = model.state_dict()
    if EMBEDDING_IDS_KEY in state:
        state = expand_compact_embedding(dict(state), own["token_embedding.weight"].shape[0])
    state = {key: value.to(own[key].dtype) if key in own and value.is_floating_point() else value
             for key, value in state.items()}
    # Traced archives also save non-persistent buffers (e.g. the causal mask), which the model rebuilds itself.
    transient = {name for name, _ in model.named_buffers()} - set(own)
    state = {key: value for key, value in state.items() if key not in transient}
    if "logit_scale" in state and "logit_scale" in own:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    if missing or unexpected:
        raise PromptbenchError(
            f"checkpoint {source} does not match the model architecture: "
            f"{len(missing)} missing keys (e.g. {sorted(missing)[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {sorted(unexpected)[:3]}). "
            f"Check that backbone.model_name matches the checkpoint."
        )
    mismatched = [k for k in own if own[k].shape != state[k].shape]
    if mismatched:
        raise PromptbenchError(
            f"checkpoint {source} has other tensor shapes than model {type(model).__name__} "
            f"(e.g. {mismatched[0]}: {tuple(state[mismatched[0]].shape)} vs {tuple(own[mismatched[0]].shape)})."
        )
    model.load_state_dict(state, strict=True)
